/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the tracepoint backend. Works on kernels without kprobes
 * or fentry. Each program only extracts the socket and hands over to the
 * shared logic in collide.bpf.h; tracer/kernel/hooks.py compiles in the ones it
 * selected (TC_USE_TP_<HOOK>), and defines TC_HAVE_<EVENT>_<FIELD> for the
 * fields each tracepoint's format file lists.
 *
 * Each event is attached as a raw tracepoint where the kernel's BTF gives
 * the event's prototype (TC_RAW_<EVENT>, and TC_RAW_<EVENT>_<ARG> = the
 * argument's position, from tracer/kernel/hooks.py): the program gets the
 * tracepoint's own arguments, and the kernel skips filling a trace record
 * for it on every call, which is most of what a tracepoint costs a host's
 * ordinary connections. Without BTF (the kernel-headers path) the classic
 * tracepoint with its format-file record (`args->field`) is used.
 */

#define TC_RAW_ARG(event, arg) (ctx->args[TC_RAW_##event##_##arg])

#ifdef TC_USE_TP_SET_STATE
/* every tcp_set_state() goes through inet_sk_state_store() and this event */
#ifdef TC_RAW_INET_SOCK_SET_STATE
static __always_inline int tc_raw_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	const void *sk = (const void *)TC_RAW_ARG(INET_SOCK_SET_STATE, SK);
	__u16 protocol = 0;

	if (!sk || !tc_tracking()) /* the protocol is worth a read only in a collision window */
		return 0;
	tc_read(protocol, sk, OFF_SK_PROTOCOL);
	if (protocol != K_IPPROTO_TCP)
		return 0;
	return tc_on_set_state(ctx, sk, (int)TC_RAW_ARG(INET_SOCK_SET_STATE, OLDSTATE),
			       (int)TC_RAW_ARG(INET_SOCK_SET_STATE, NEWSTATE), TC_HOOK_TP_SET_STATE);
}

/* The state change the first program last took on this CPU (a token: the
 * socket's address with both states in its top bits, which a kernel address
 * never needs). The kernel runs a raw tracepoint's program only once at a
 * time per CPU: a softirq that changes a socket's state while the program
 * runs in process context (a connect() or a close() interrupted by the
 * packets of a storm) skips it (recursion_misses), and that state change
 * would be lost. Its twin below, attached to the same tracepoint after it
 * (tracer/kernel/statehook.py), runs the same logic for every state change
 * the first program did not take: the kernel calls the twin right after the
 * first program for the same change, so a token other than this change's
 * means the first was skipped.
 *
 * (It used to be a "the first program is running" flag, set by its first
 * instruction and cleared by its last. The kernel's recursion guard is held
 * longer than that: from before the program's first instruction to after its
 * last, with the run's bookkeeping around it. A softirq that interrupted the
 * first program there found it skipped and the flag clear, so the twin let
 * the change go too; measured in a 3,000/s storm: 707 skipped runs, 665
 * covered, and a nested softirq's whole batch of arrivals in ESTABLISHED
 * lost. A token compares the change itself, wherever the first program was
 * interrupted. The one duplicate it can make: a twin interrupted before it
 * reads the token, by a softirq whose first program takes a new one, runs
 * its change again: one more event, harmless.)
 */
BPF_PERCPU_ARRAY(set_state_taken, __u64, 1);

static __always_inline __u64 tc_state_token(struct bpf_raw_tracepoint_args *ctx)
{
	return (__u64)TC_RAW_ARG(INET_SOCK_SET_STATE, SK) ^ ((__u64)(__u8)TC_RAW_ARG(INET_SOCK_SET_STATE, OLDSTATE) << 56) ^
	       ((__u64)(__u8)TC_RAW_ARG(INET_SOCK_SET_STATE, NEWSTATE) << 48);
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
	int zero = 0;
	__u64 *taken = set_state_taken.lookup(&zero);

	if (taken)
		*taken = tc_state_token(ctx);
	return tc_raw_set_state(ctx);
}

int tc_set_state_twin(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0;
	__u64 *taken = set_state_taken.lookup(&zero);

	if (!taken || *taken == tc_state_token(ctx))
		return 0; /* the first program took this state change */
	tc_stat(TC_STAT_STATE_COVERED);
	return tc_raw_set_state(ctx);
}
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != K_IPPROTO_TCP)
		return 0;
	return tc_on_set_state(args, args->skaddr, args->oldstate, args->newstate, TC_HOOK_TP_SET_STATE);
}
#endif
#endif

#if (defined(TC_USE_TP_SYN_CHALLENGED) || defined(TC_USE_TP_TIMEWAIT_SYN)) && defined(TC_HAVE_KFREE_SKB_RX_SK)
/* a SYN dropped with SKB_DROP_REASON_TCP_INVALID_SYN by the socket rx_sk;
 * or a SYN a TIME_WAIT socket (rx_sk) answered with the old numbers */
static __always_inline int tc_on_kfree_skb(void *ctx, const void *skb, const void *rx_sk, int reason)
{
	if (!rx_sk)
		return 0;
#ifdef TC_USE_TP_SYN_CHALLENGED
#ifndef K_SKB_DROP_REASON_TCP_INVALID_SYN
#error "skb:kfree_skb as the collision's hook needs the drop reason TCP_INVALID_SYN, which this kernel lacks"
#endif
	if (reason == K_SKB_DROP_REASON_TCP_INVALID_SYN)
		return tc_on_syn_challenged(ctx, rx_sk, TC_HOOK_TP_KFREE_SKB);
#endif
#ifdef TC_USE_TP_TIMEWAIT_SYN
	return tc_on_tw_syn(ctx, rx_sk, skb, TC_HOOK_TP_KFREE_TW);
#else
	return 0;
#endif
}

#ifdef TC_RAW_KFREE_SKB
RAW_TRACEPOINT_PROBE(kfree_skb)
{
	return tc_on_kfree_skb(ctx, (const void *)TC_RAW_ARG(KFREE_SKB, SKB), (const void *)TC_RAW_ARG(KFREE_SKB, RX_SK),
			       (int)TC_RAW_ARG(KFREE_SKB, REASON));
}
#else
TRACEPOINT_PROBE(skb, kfree_skb)
{
	return tc_on_kfree_skb(args, args->skbaddr, args->rx_sk, args->reason);
}
#endif
#endif

#if defined(TC_USE_TP_SEND_RESET) && defined(TC_HAVE_TCP_SEND_RESET_SKADDR)
#ifdef TC_RAW_TCP_SEND_RESET
RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
	const void *sk = (const void *)TC_RAW_ARG(TCP_SEND_RESET, SK);
	const void *skb = (const void *)TC_RAW_ARG(TCP_SEND_RESET, SKB);

	/* the client's side of a collision starts here (a SYN-SENT socket
	 * resetting a challenge ACK); any other reset matters only on a tracked tuple */
	if (tc_on_client_reset(ctx, sk, skb, TC_HOOK_TP_SEND_RESET))
		return 0;
	return tc_on_tracked(ctx, sk, TC_EV_RST_SENT, TC_HOOK_TP_SEND_RESET, -1, -1, skb);
}
#else
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	if (tc_on_client_reset(args, args->skaddr, args->skbaddr, TC_HOOK_TP_SEND_RESET))
		return 0;
	return tc_on_tracked(args, args->skaddr, TC_EV_RST_SENT, TC_HOOK_TP_SEND_RESET, -1, -1, args->skbaddr);
}
#endif
#endif

#if defined(TC_USE_TP_RECEIVE_RESET) && defined(TC_HAVE_TCP_RECEIVE_RESET_SKADDR)
#ifdef TC_RAW_TCP_RECEIVE_RESET
RAW_TRACEPOINT_PROBE(tcp_receive_reset)
{
	return tc_on_tracked(ctx, (const void *)TC_RAW_ARG(TCP_RECEIVE_RESET, SK), TC_EV_RST_RECEIVED,
			     TC_HOOK_TP_RECEIVE_RESET, -1, -1, 0);
}
#else
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	return tc_on_tracked(args, args->skaddr, TC_EV_RST_RECEIVED, TC_HOOK_TP_RECEIVE_RESET, -1, -1, 0);
}
#endif
#endif

#if defined(TC_USE_TP_RETRANSMIT) && defined(TC_HAVE_TCP_RETRANSMIT_SKB_STATE)
/* only the SYN-SENT socket's retransmissions (the client's retried SYN) */
#ifdef TC_RAW_TCP_RETRANSMIT_SKB
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb)
{
	const void *sk = (const void *)TC_RAW_ARG(TCP_RETRANSMIT_SKB, SK);
	__u8 state = 0;

	if (!tc_sock_tracked(sk))
		return 0;
	tc_read(state, sk, OFF_SKC_STATE);
	if (state != K_TCP_SYN_SENT)
		return 0;
	return tc_on_tracked(ctx, sk, TC_EV_RETRANSMIT, TC_HOOK_TP_RETRANSMIT, -1, -1, 0);
}
#else
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	if (args->state != K_TCP_SYN_SENT)
		return 0;
	return tc_on_tracked(args, args->skaddr, TC_EV_RETRANSMIT, TC_HOOK_TP_RETRANSMIT, -1, -1, 0);
}
#endif
#endif
