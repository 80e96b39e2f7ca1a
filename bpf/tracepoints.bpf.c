/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the tracepoint backend. Works on kernels without kprobes
 * or fentry. Each program only extracts the socket and hands over to the
 * shared logic in collide.bpf.h; tracer/hooks.py compiles in the ones it
 * selected (TC_USE_TP_<HOOK>), and defines TC_HAVE_<EVENT>_<FIELD> for the
 * fields each tracepoint's format file lists.
 */

#ifdef TC_USE_TP_SET_STATE
/* every tcp_set_state() goes through inet_sk_state_store() and this event */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != K_IPPROTO_TCP)
		return 0;
	return tc_on_set_state(args, args->skaddr, args->oldstate, args->newstate, TC_HOOK_TP_SET_STATE);
}
#endif

#if (defined(TC_USE_TP_SYN_CHALLENGED) || defined(TC_USE_TP_TIMEWAIT_SYN)) && defined(TC_HAVE_KFREE_SKB_RX_SK)
/* a SYN dropped with SKB_DROP_REASON_TCP_INVALID_SYN by the socket rx_sk;
 * or a SYN a TIME_WAIT socket (rx_sk) answered with the old numbers */
TRACEPOINT_PROBE(skb, kfree_skb)
{
	if (!args->rx_sk)
		return 0;
#ifdef TC_USE_TP_SYN_CHALLENGED
	if (args->reason == K_SKB_DROP_REASON_TCP_INVALID_SYN)
		return tc_on_syn_challenged(args, args->rx_sk, TC_HOOK_TP_KFREE_SKB);
#endif
#ifdef TC_USE_TP_TIMEWAIT_SYN
	return tc_on_tw_syn(args, args->rx_sk, args->skbaddr, TC_HOOK_TP_KFREE_TW);
#else
	return 0;
#endif
}
#endif

#if defined(TC_USE_TP_SEND_RESET) && defined(TC_HAVE_TCP_SEND_RESET_SKADDR)
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	tc_fired(TC_HOOK_TP_SEND_RESET);
	/* the client's side of a collision starts here (a SYN-SENT socket
	 * resetting a challenge ACK); any other reset matters only on a tracked tuple */
	if (tc_on_client_reset(args, args->skaddr, args->skbaddr, TC_HOOK_TP_SEND_RESET))
		return 0;
	return tc_on_tracked(args, args->skaddr, TC_EV_RST_SENT, TC_HOOK_TP_SEND_RESET, -1, -1,
			     tc_rst_seq(args->skbaddr));
}
#endif

#if defined(TC_USE_TP_RECEIVE_RESET) && defined(TC_HAVE_TCP_RECEIVE_RESET_SKADDR)
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	tc_fired(TC_HOOK_TP_RECEIVE_RESET);
	return tc_on_tracked(args, args->skaddr, TC_EV_RST_RECEIVED, TC_HOOK_TP_RECEIVE_RESET, -1, -1, 0);
}
#endif

#if defined(TC_USE_TP_RETRANSMIT) && defined(TC_HAVE_TCP_RETRANSMIT_SKB_STATE)
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	if (args->state != K_TCP_SYN_SENT)
		return 0;
	tc_fired(TC_HOOK_TP_RETRANSMIT);
	return tc_on_tracked(args, args->skaddr, TC_EV_RETRANSMIT, TC_HOOK_TP_RETRANSMIT, -1, -1, 0);
}
#endif
