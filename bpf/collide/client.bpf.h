/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the client's side of a collision, seen from the client's
 * own kernel: who connects a socket, and its SYN-SENT socket resetting the
 * challenge ACK of a remote socket that still holds the tuple.
 */

/* tcp_v4_connect()/tcp_v6_connect(): remember who connects this socket. */
static __always_inline int tc_on_connect(const void *sk, __u32 hook)
{
	__u64 skp = (__u64)sk;
	struct tc_conn conn = {};

	tc_fired(hook);
	conn.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(conn.comm, sizeof(conn.comm));
	connectors.update(&skp, &conn);
	return 0;
}

/* (tc_on_client_reset) the event, set up only for the narrow case: clang
 * zeroes a local where it is declared. Returns 1. */
static __always_inline int tc_client_challenged(void *ctx, const void *sk, const void *skb, __u32 hook)
{
	struct tc_event ev = {};
	struct tc_tuple t = {};
	struct tc_track tr = {};
	const unsigned char *th = tc_tcp_header(skb);
	__u32 seq_be = 0, ack_be = 0, stamp = 0;

	if (!th)
		return 1;
	if (tc_fill_sock(sk, &ev))
		return 1;
	ev.type = TC_EV_CLIENT_CHALLENGED;
	ev.hook = hook;
	bpf_probe_read_kernel(&seq_be, 4, th + 4);
	bpf_probe_read_kernel(&ack_be, 4, th + 8);
	ev.seq = __builtin_bswap32(seq_be);
	ev.ack = __builtin_bswap32(ack_be);
	tc_read(stamp, sk, OFF_TP_RETRANS_STAMP);
	if (stamp) {
		__u64 unit = 1000000, now_units, syn_ns;
#ifdef OFF_TP_USEC_TS
		__u8 bits = 0;

		tc_read(bits, sk, OFF_TP_USEC_TS);
		if (bits & TC_TP_USEC_TS_MASK)
			unit = 1000;
#endif
		now_units = ev.ts_ns / unit;
		/* the stamp is the low 32 bits of the SYN's time in `unit`s, truncated:
		 * the SYN left within that unit; take its middle */
		syn_ns = (now_units - (__u32)((__u32)now_units - stamp)) * unit + unit / 2;
		if (syn_ns <= ev.ts_ns && ev.ts_ns - syn_ns < 3600ULL * 1000000000ULL) {
			ev.syn_age_ns = ev.ts_ns - syn_ns;
			ev.flags |= TC_F_SYN_STAMP;
		} else if (syn_ns > ev.ts_ns && syn_ns - ev.ts_ns <= unit / 2) {
			ev.syn_age_ns = 0; /* the SYN left in this very unit */
			ev.flags |= TC_F_SYN_STAMP;
		}
	}
	/* a collision the server's side already registered keeps its entry */
	tc_tuple_of(&ev, 0, &t);
	if (!tracked.lookup(&t)) {
		tr.first_ns = ev.ts_ns;
		tr.skaddr = ev.skaddr;
		tc_track_add(&t, &tr);
	}
	tc_open_window();
	tc_submit(ctx, &ev);
	return 1;
}

/* The client's side of a collision, seen from the client's own kernel.
 *
 * A SYN-SENT socket that receives an ACK not acknowledging its SYN (the
 * challenge ACK of a remote socket that still holds the tuple) makes
 * tcp_rcv_synsent_state_process() return 1, and tcp_v4/v6_do_rcv() answer
 * with a RST from this socket (tcp_v4/v6_send_reset(sk, skb): `sk` is the
 * connecting socket, `skb` the ACK). Nothing else makes a SYN-SENT socket
 * reset a bare ACK, so only this narrow case streams anything.
 *
 * The event carries the ACK's numbers as received (its seq is the remote
 * socket's snd_nxt, its ack the RST's seq) and the time since the first SYN:
 * tcp_connect() sets tp->retrans_stamp to tcp_time_stamp_ts() when it sends
 * the SYN, milliseconds of tcp_clock_ns() (ktime_get_ns(), the clock of
 * bpf_ktime_get_ns()) truncated to 32 bits, or microseconds when the route
 * negotiated usec timestamps (tp->tcp_usec_ts, Linux >= 6.7); a retransmission
 * keeps it. The tuple is registered in `tracked` (server = the remote end) so
 * the client's retransmissions and state changes reach user space.
 *
 * Returns 1 when it handled the reset (submitted, or filtered out), 0 when
 * the reset is something else. */
static __always_inline int tc_on_client_reset(void *ctx, const void *sk, const void *skb, __u32 hook)
{
	int flags = tc_segment_flags(sk, skb, TC_STATE_BIT(K_TCP_SYN_SENT));

	if (flags < 0 || (flags & (TC_TH_SYN | TC_TH_RST | TC_TH_ACK)) != TC_TH_ACK)
		return 0;
	return tc_client_challenged(ctx, sk, skb, hook);
}
