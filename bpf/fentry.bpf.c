/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the fentry/fexit backend (BPF trampolines: kernels with
 * BTF and BPF_PROG_TYPE_TRACING allowed). Cheaper than kprobes; bcc attaches
 * each KFUNC_PROBE/KRETFUNC_PROBE by its BTF name. Only the selected ones are
 * compiled in (TC_USE_FE_<HOOK>).
 */

#ifdef TC_USE_FE_SET_STATE
KFUNC_PROBE(tcp_set_state, void *sk, int state)
{
	return tc_on_set_state(ctx, sk, -1, state, TC_HOOK_FE_SET_STATE);
}
#endif

#ifdef TC_USE_FE_SYN_CHALLENGED
KFUNC_PROBE(tcp_rcv_state_process, void *sk, void *skb)
{
	return tc_on_rcv_state(ctx, sk, skb, TC_HOOK_FE_RCV_STATE);
}
#endif

#ifdef TC_USE_FE_CHALLENGE_RCV
/* the return of the call whose SYN tc_on_rcv_state() found challenged
 * (tc_challenge_enter): the challenge ACK was sent in between, or held back */
KRETFUNC_PROBE(tcp_rcv_state_process, void *sk)
{
	return tc_on_challenge(ctx, sk, TC_HOOK_FE_RCV_EXIT);
}
#endif

#ifdef TC_USE_FE_CHALLENGE
KFUNC_PROBE(tcp_send_challenge_ack, void *sk)
{
	tc_challenge_enter(sk);
	return 0;
}

KRETFUNC_PROBE(tcp_send_challenge_ack, void *sk)
{
	return tc_on_challenge(ctx, sk, TC_HOOK_FE_CHALLENGE);
}
#endif

#ifdef TC_USE_FE_CONNECT
KFUNC_PROBE(tcp_v4_connect, void *sk)
{
	return tc_on_connect(sk, TC_HOOK_FE_CONNECT);
}

#ifdef TC_USE_FE_CONNECT6
KFUNC_PROBE(tcp_v6_connect, void *sk)
{
	return tc_on_connect(sk, TC_HOOK_FE_CONNECT);
}
#endif
#endif

#ifdef TC_USE_FE_QUEUE_ADD
KRETFUNC_PROBE(inet_csk_reqsk_queue_add, void *sk, void *req, void *child, void *ret)
{
	if (!ret)
		return 0;
	return tc_on_queued(ctx, sk, child, TC_HOOK_FE_QUEUE_ADD, 1);
}
#endif

#ifdef TC_USE_FE_HASHDANCE
KRETFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child, void *req, bool own_req, void *ret)
{
	if (!ret || !own_req)
		return 0;
	return tc_on_queued(ctx, sk, child, TC_HOOK_FE_HASHDANCE, 1);
}
#endif
