/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the server's side of a collision: the lingering socket
 * challenging a SYN (a full socket, or a TIME_WAIT one), its challenge ACK,
 * and the retried connection joining the listener's accept queue.
 */

/* __tcp_oow_rate_limited() stamps tp->last_oow_ack_time only when it lets an
 * out-of-window ACK (the challenge ACK) through; a stamp from this tick (or
 * the one before, should a tick have passed since) means one went out now. */
static __always_inline int tc_challenge_passed(__u32 last_oow, __u32 now_j)
{
	return last_oow && now_j - last_oow <= 1;
}

/* A SYN challenged by a lingering socket, past the user's filters: count it
 * (`fresh`: tc_track()'s answer), whatever becomes of its event. */
static __always_inline void tc_count_syn(const struct tc_event *ev, int fresh)
{
	struct tc_count_key key = {};
	struct tc_count zero = {}, *c;

	key.netns = ev->netns;
	key.family = ev->family;
	key.sport = ev->lport;
	key.state = ev->oldstate;
	tc_stat(TC_STAT_SYN_HITS);
	if (fresh)
		tc_stat(fresh > 0 ? TC_STAT_COLLISIONS : TC_STAT_UNTRACKED);
	c = counts.lookup_or_try_init(&key, &zero);
	if (!c) {
		if (fresh)
			tc_stat(TC_STAT_UNCOUNTED);
		return;
	}
	c->syn_hits += 1;
	if (fresh)
		c->collisions += 1;
}

#ifdef TC_USE_CHALLENGE
/* The challenge hook's entry and return: the socket's segs_out on entry,
 * kept by socket (the socket is locked for the whole call: no second call on
 * it runs meanwhile, while calls on other sockets may nest or interleave on
 * one CPU: a softirq interrupting the backlog processed in process context,
 * a preempted softirq thread on PREEMPT_RT), and on return whether segs_out
 * moved: the ACK was transmitted, past the per-socket limiter
 * (tcp_invalid_ratelimit) and the challenge-ACK limit (host-wide before
 * Linux 6.0) alike. No clock is involved: a stamp compared with jiffies
 * misjudges a call stretched over a tick boundary (a vCPU stalled by its
 * host, a preempted softirq thread). */
BPF_TABLE("lru_hash", __u64, __u32, challenge_segs, 256); /* calls in progress: a few per CPU at most */

static __always_inline void tc_challenge_enter(const void *sk)
{
	__u64 key = (__u64)sk;
	__u32 segs_out = 0;

	tc_read(segs_out, sk, OFF_TP_SEGS_OUT);
	challenge_segs.update(&key, &segs_out);
}

/* tcp_send_challenge_ack() returned: report whether the ACK went out. */
static __always_inline int tc_on_challenge(void *ctx, const void *sk, __u32 hook)
{
	struct tc_event ev = {};
	__u64 key = (__u64)sk;
	__u32 *before, segs_before, segs_out = 0;

	before = challenge_segs.lookup(&key);
	if (!before)
		return 0;
	segs_before = *before;
	challenge_segs.delete(&key);
	tc_fired(hook);
	if (!tc_sock_tracked(sk) || tc_fill_sock(sk, &ev))
		return 0;
	ev.type = TC_EV_CHALLENGE_ACK;
	ev.hook = hook;
	tc_read(ev.seq, sk, OFF_TP_SND_NXT);
	tc_read(ev.ack, sk, OFF_TP_RCV_NXT);
	tc_read(segs_out, sk, OFF_TP_SEGS_OUT);
	if (segs_out != segs_before)
		ev.flags |= TC_F_CHALLENGE_PASSED;
	tc_submit(ctx, &ev);
	return 0;
}
#endif

/* A SYN was dropped by a socket that is not listening (skb drop reason
 * TCP_INVALID_SYN): tcp_validate_incoming() has just called
 * tcp_send_challenge_ack(). The collision starts here. */
static __always_inline int tc_on_syn_challenged(void *ctx, const void *sk, __u32 hook)
{
	struct tc_event ev = {};
	struct tc_tuple t = {};
	__u32 now_j, rcv_tstamp = 0, last_oow = 0, copied = 0, unread;

	int fresh;

	tc_fired(hook); /* counted before the user's filters: the self-test runs in its own netns */
	if (tc_sock_tuple(sk, &t))
		return 0;
	fresh = tc_track(&t, (__u64)sk);
	if (tc_fill_sock(sk, &ev))
		return 0;
	tc_count_syn(&ev, fresh);
	ev.type = TC_EV_SYN_CHALLENGED;
	ev.hook = hook;
	tc_read(ev.seq, sk, OFF_TP_SND_NXT);
	tc_read(ev.ack, sk, OFF_TP_RCV_NXT);
	tc_read(copied, sk, OFF_TP_COPIED_SEQ);
	/* what `ss` shows as Recv-Q; the peer's FIN (it is why the socket lingers
	 * in CLOSE_WAIT, LAST_ACK or CLOSING) took one sequence number */
	unread = ev.ack - copied;
	if (unread && (ev.oldstate == K_TCP_CLOSE_WAIT || ev.oldstate == K_TCP_LAST_ACK || ev.oldstate == K_TCP_CLOSING))
		unread -= 1;
	ev.unread = (__s32)unread > 0 ? unread : 0;
	now_j = (__u32)bpf_jiffies64();
	tc_read(rcv_tstamp, sk, OFF_TP_RCV_TSTAMP);
	tc_read(last_oow, sk, OFF_TP_LAST_OOW_ACK_TIME);
	if (rcv_tstamp) {
		ev.age_jiffies = now_j - rcv_tstamp;
		ev.flags |= TC_F_AGE_JIFFIES;
	}
#ifdef TC_USE_CHALLENGE
	/* the challenge hook reports the ACK itself (TC_EV_CHALLENGE_ACK) */
	ev.flags |= TC_F_CHALLENGE_SEEN;
#else
	if (tc_challenge_passed(last_oow, now_j))
		ev.flags |= TC_F_CHALLENGE_PASSED;
#endif
	tc_submit(ctx, &ev);
	return 0;
}

/* tcp_rcv_state_process() entry: a SYN (without RST) reaching a socket in a
 * lingering state is always challenged (tcp_validate_incoming, RFC 5961 4.2;
 * before 6.4 a SYN failing PAWS gets a dupack instead, with the same numbers). */
static __always_inline int tc_on_rcv_state(void *ctx, const void *sk, const void *skb, __u32 hook)
{
	int flags = tc_segment_flags(sk, skb, TC_STATE_BIT(K_TCP_CLOSE_WAIT) | TC_STATE_BIT(K_TCP_LAST_ACK) |
					       TC_STATE_BIT(K_TCP_FIN_WAIT1) | TC_STATE_BIT(K_TCP_FIN_WAIT2) |
					       TC_STATE_BIT(K_TCP_CLOSING));

	if (flags < 0 || (flags & (TC_TH_SYN | TC_TH_RST)) != TC_TH_SYN)
		return 0;
#ifdef TC_USE_FE_CHALLENGE_RCV
	tc_challenge_enter(sk); /* the challenge ACK is judged at this call's return */
#endif
	return tc_on_syn_challenged(ctx, sk, hook);
}

/* (tc_on_tw_syn) the event, set up only for a SYN on a TIME_WAIT socket:
 * clang zeroes a local where it is declared */
static __always_inline int tc_tw_syn_challenged(void *ctx, const void *tw, __u32 hook)
{
	struct tc_event ev = {};
	struct tc_tuple t = {};
	__u32 last_oow = 0;

	tc_fired(hook);
	if (tc_fill_sock_tw(tw, &ev, 1))
		return 0;
	ev.type = TC_EV_SYN_CHALLENGED;
	ev.hook = hook;
	tc_read(ev.seq, tw, OFF_SKC_TW_SND_NXT);
	tc_read(ev.ack, tw, OFF_SKC_TW_RCV_NXT);
	tc_read(last_oow, tw, OFF_TW_LAST_OOW_ACK_TIME);
	if (tc_challenge_passed(last_oow, (__u32)bpf_jiffies64()))
		ev.flags |= TC_F_CHALLENGE_PASSED;
	tc_tuple_of(&ev, 1, &t);
	tc_count_syn(&ev, tc_track(&t, ev.skaddr));
	tc_submit(ctx, &ev);
	return 0;
}

/* A SYN freed with a TIME_WAIT socket as its receiver (skb:kfree_skb,
 * rx_sk): tcp_timewait_state_process() did not take it as a new connection
 * (its sequence number is not above the old connection's, and it has no newer
 * timestamp), so the socket answered with an ACK carrying the old numbers
 * (TCP_TW_ACK), unless its rate limiter held that back. A SYN it accepts goes
 * on to the listener and is never freed here. */
static __always_inline int tc_on_tw_syn(void *ctx, const void *tw, const void *skb, __u32 hook)
{
	int flags = tc_segment_flags(tw, skb, TC_STATE_BIT(K_TCP_TIME_WAIT));

	if (flags < 0 || (flags & (TC_TH_SYN | TC_TH_RST | TC_TH_ACK)) != TC_TH_SYN)
		return 0;
	return tc_tw_syn_challenged(ctx, tw, hook);
}

/* A child joined its listener's accept queue (sk_ack_backlog++). `added`:
 * the backlog already counts it (fexit), else it is about to (entry). */
static __always_inline int tc_on_queued(void *ctx, const void *listener, const void *child, __u32 hook, int added)
{
	struct tc_event ev = {};

	if (!tc_sock_tracked(child))
		return 0;
	tc_fired(hook); /* on tracked tuples only (tc_on_tracked says why) */
	if (tc_fill_sock(child, &ev))
		return 0;
	ev.type = TC_EV_QUEUED;
	ev.hook = hook;
	tc_read(ev.backlog, listener, OFF_SK_ACK_BACKLOG);
	tc_read(ev.max_backlog, listener, OFF_SK_MAX_ACK_BACKLOG);
	if (!added)
		ev.backlog += 1;
	tc_submit(ctx, &ev);
	return 0;
}
