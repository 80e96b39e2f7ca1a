/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the collision logic shared by every hook backend.
 *
 * Not a real header: tracer/program.py inlines it into the backend source,
 * because bcc rewrites map operations only in the main translation unit.
 *
 * A backend (tracepoints.bpf.c today) only extracts the socket pointer and the
 * hook's arguments, then calls the tc_on_*() handlers below. Everything read
 * from a kernel struct goes through tc_read() with an offset from the running
 * kernel (macros OFF_*, defined by tracer/offsets.py from BTF), and every
 * kernel enum value comes from the running kernel too (macros K_*).
 *
 * Filtering happens here, in the kernel: a host churning thousands of
 * ordinary connections streams nothing. Only a SYN challenged by a
 * non-listening socket starts a collision; it registers the connection's tuple
 * in `tracked`, and only events on tracked tuples reach user space.
 */
#include "tcpcollide.h"

#ifndef __always_inline /* the compat tree has no linux/compiler_types.h */
#define __always_inline inline __attribute__((always_inline))
#endif

#define TC_AF_INET 2   /* ABI constants (UAPI), identical on every kernel */
#define TC_AF_INET6 10

/* The connection a collision is about, oriented: server = the end that owns
 * the lingering socket and the listener; client = the end reusing the port. */
struct tc_tuple {
	__u16 family;
	__u16 sport;
	__u16 cport;
	__u16 pad;
	__u8 saddr[16];
	__u8 caddr[16];
};

struct tc_track {
	__u64 first_ns; /* when the tuple was registered or taken over (user space keeps a newer one) */
	__u64 skaddr;   /* the lingering socket */
};

struct tc_conn {
	__u32 pid;
	char comm[16];
};

BPF_PERF_OUTPUT(events);
/* how often each kernel hook ran, whatever it saw: proof that a hook fires
 * (per CPU: a shared counter would bounce its cache line between CPUs on
 * every state change of the host) */
BPF_PERCPU_ARRAY(hook_fired, __u64, TC_HOOK_MAX);
/* Whether a collision may be in progress. Outside this window `tracked` is
 * empty, and the hooks that only care about tracked tuples return after two
 * array lookups: all a host's ordinary connections cost. Entry TC_WIN_UNTIL
 * (jiffies, enum tc_window in tcpcollide.h) is pushed forward here when a
 * collision starts; TC_WIN_KEEP is set by user space while it has incidents open (tracer/session.py). Each
 * entry has one writer, so neither side can undo what the other granted. */
BPF_ARRAY(tracking, __u64, 2);
/* connecting socket -> the process that called connect() (connect hook) */
BPF_TABLE("lru_hash", __u64, struct tc_conn, connectors, TC_CONN_MAP_SIZE);
/* collisions in progress; user space deletes an entry when its incident ends */
BPF_TABLE("lru_hash", struct tc_tuple, struct tc_track, tracked, TC_TRACK_MAP_SIZE);

static __always_inline void tc_fired(__u32 hook)
{
	__u64 *n = hook_fired.lookup(&hook);

	if (n)
		*n += 1;
}

/* Is a collision in progress anywhere (see `tracking`)? */
static __always_inline int tc_tracking(void)
{
	int until = TC_WIN_UNTIL, keep = TC_WIN_KEEP;
	__u64 *k = tracking.lookup(&keep), *u;

	if (k && *k)
		return 1;
	u = tracking.lookup(&until);
	return u && *u && *u > bpf_jiffies64(); /* 0: no collision since the tracer started */
}

#define tc_read(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

static __always_inline int tc_v4_mapped(const __u8 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 && a[6] == 0 &&
	       a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* Fill the socket part of an event. Returns 0 when the event passes the
 * user's filters (compile-time macros TC_FILTER_*), non-zero otherwise.
 * `tw`: sk is a TIME_WAIT socket (only its struct sock_common is there). */
static __always_inline int tc_fill_sock_tw(const void *sk, struct tc_event *ev, int tw)
{
	__u16 family = 0, sport_be = 0, dport_be = 0;
	__u8 state = 0;
	void *net = 0;
	void *sock = 0;

	tc_read(family, sk, OFF_SKC_FAMILY);
	if (family != TC_AF_INET && family != TC_AF_INET6)
		return 1;
	tc_read(dport_be, sk, OFF_SKC_DPORT);
	ev->family = family;
	if (tw) {
		tc_read(ev->lport, sk, OFF_SKC_NUM); /* host order */
	} else {
		tc_read(sport_be, sk, OFF_INET_SPORT);
		ev->lport = (__u16)((sport_be >> 8) | (sport_be << 8));
	}
	ev->rport = (__u16)((dport_be >> 8) | (dport_be << 8));
#ifdef TC_FILTER_PORT
	if (ev->lport != TC_FILTER_PORT && ev->rport != TC_FILTER_PORT)
		return 1;
#endif
	tc_read(net, sk, OFF_SKC_NET);
	if (net)
		tc_read(ev->netns, net, OFF_NET_NS_INUM);
#ifdef TC_FILTER_NETNS
	if (ev->netns != TC_FILTER_NETNS)
		return 1;
#endif
	if (family == TC_AF_INET) {
		bpf_probe_read_kernel(ev->laddr, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
		bpf_probe_read_kernel(ev->raddr, 4, (const char *)sk + OFF_SKC_DADDR);
	} else {
		bpf_probe_read_kernel(ev->laddr, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
		bpf_probe_read_kernel(ev->raddr, 16, (const char *)sk + OFF_SKC_V6_DADDR);
		if (tc_v4_mapped(ev->raddr)) {
			/* a dual-stack socket talking IPv4 (::ffff:a.b.c.d): the wire and the
			 * peer's socket are IPv4, so describe it as IPv4, or the two ends
			 * of one connection would not meet in `tracked` */
			ev->family = TC_AF_INET;
			bpf_probe_read_kernel(ev->laddr, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
			bpf_probe_read_kernel(ev->raddr, 4, (const char *)sk + OFF_SKC_DADDR);
			__builtin_memset(ev->laddr + 4, 0, 12);
			__builtin_memset(ev->raddr + 4, 0, 12);
		}
	}
#ifdef TC_FILTER_FAMILY
	if (ev->family != TC_FILTER_FAMILY)
		return 1;
#endif
	tc_read(state, sk, OFF_SKC_STATE);
	ev->oldstate = state;
	ev->newstate = state;
	if (!tw) {
		tc_read(sock, sk, OFF_SK_SOCKET);
		if (sock)
			tc_read(ev->sk_ino, sock, OFF_SOCKET_INODE_INO);
	}
	ev->skaddr = (__u64)sk;
	{
		__u64 skp = (__u64)sk;
		struct tc_conn *conn = connectors.lookup(&skp);

		if (conn) {
			ev->conn_pid = conn->pid;
			__builtin_memcpy(ev->conn_comm, conn->comm, sizeof(ev->conn_comm));
		}
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cpu = bpf_get_smp_processor_id();
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	return 0;
}

static __always_inline int tc_fill_sock(const void *sk, struct tc_event *ev)
{
	return tc_fill_sock_tw(sk, ev, 0);
}

static __always_inline void tc_tuple_of(const struct tc_event *ev, int local_is_server, struct tc_tuple *t)
{
	t->family = ev->family;
	if (local_is_server) {
		t->sport = ev->lport;
		t->cport = ev->rport;
		__builtin_memcpy(t->saddr, ev->laddr, 16);
		__builtin_memcpy(t->caddr, ev->raddr, 16);
	} else {
		t->sport = ev->rport;
		t->cport = ev->lport;
		__builtin_memcpy(t->saddr, ev->raddr, 16);
		__builtin_memcpy(t->caddr, ev->laddr, 16);
	}
}

/* The tuple of a full socket, oriented with its own end as the server, read
 * with the fewest reads: the same key tc_tuple_of() makes from a filled event
 * (v4-mapped IPv6 described as IPv4, addresses zero-padded). Non-zero when sk
 * is not an inet socket. */
static __always_inline int tc_sock_tuple(const void *sk, struct tc_tuple *t)
{
	__u16 family = 0, sport_be = 0, dport_be = 0;

	tc_read(family, sk, OFF_SKC_FAMILY);
	if (family != TC_AF_INET && family != TC_AF_INET6)
		return 1;
	tc_read(sport_be, sk, OFF_INET_SPORT);
	tc_read(dport_be, sk, OFF_SKC_DPORT);
	t->sport = (__u16)((sport_be >> 8) | (sport_be << 8));
	t->cport = (__u16)((dport_be >> 8) | (dport_be << 8));
	t->family = family;
	if (family == TC_AF_INET6) {
		bpf_probe_read_kernel(t->saddr, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
		bpf_probe_read_kernel(t->caddr, 16, (const char *)sk + OFF_SKC_V6_DADDR);
		if (!tc_v4_mapped(t->caddr))
			return 0;
		t->family = TC_AF_INET;
		__builtin_memset(t->saddr, 0, 16);
		__builtin_memset(t->caddr, 0, 16);
	}
	bpf_probe_read_kernel(t->saddr, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
	bpf_probe_read_kernel(t->caddr, 4, (const char *)sk + OFF_SKC_DADDR);
	return 0;
}

/* Is this tuple tracked in either orientation? (Swaps `t` for the second.) */
static __always_inline int tc_tuple_tracked(struct tc_tuple *t)
{
	__u8 a[16];
	__u16 p;

	if (tracked.lookup(t))
		return 1;
	p = t->sport;
	t->sport = t->cport;
	t->cport = p;
	__builtin_memcpy(a, t->saddr, 16);
	__builtin_memcpy(t->saddr, t->caddr, 16);
	__builtin_memcpy(t->caddr, a, 16);
	return tracked.lookup(t) != 0;
}

/* Is this full socket an end of a tracked collision? The hot path of every
 * hook that only cares about tracked tuples: one array lookup while no
 * collision is in progress, a few reads and two hash lookups while one is. */
static __always_inline int tc_sock_tracked(const void *sk)
{
	struct tc_tuple t = {};

	if (!sk || !tc_tracking())
		return 0;
	return !tc_sock_tuple(sk, &t) && tc_tuple_tracked(&t);
}

/* __tcp_oow_rate_limited() stamps tp->last_oow_ack_time only when it lets an
 * out-of-window ACK (the challenge ACK) through; a stamp from this tick (or
 * the one before, should a tick have passed since) means one went out now. */
static __always_inline int tc_challenge_passed(__u32 last_oow, __u32 now_j)
{
	return last_oow && now_j - last_oow <= 1;
}

/* A collision starts (or goes on): register its tuple (oriented: `t`'s
 * server end is the lingering socket `skaddr`), so that events on it reach
 * user space, and open the tracking window. A repeat on the same socket
 * keeps its entry; a new lingering socket on the same tuple (the port
 * colliding again) takes it over. Collisions the user's filters leave out
 * are registered too: the hooks count firing on tracked tuples (tc_on_tracked),
 * and the self-test's collision runs in a namespace of its own; their events
 * are dropped by the filters in tc_fill_sock() like any other. */
static __always_inline void tc_open_window(void)
{
	int until = TC_WIN_UNTIL;
	__u64 *u = tracking.lookup(&until);
	__u64 until_j = bpf_jiffies64() + TC_TRACKING_J;

	if (u && *u < until_j)
		*u = until_j;
}

static __always_inline void tc_track(const struct tc_tuple *t, __u64 skaddr)
{
	struct tc_track tr = {};
	struct tc_track *old;

	tr.first_ns = bpf_ktime_get_ns();
	tr.skaddr = skaddr;
	old = tracked.lookup(t);
	if (!old || old->skaddr != skaddr)
		tracked.update(t, &tr);
	tc_open_window();
}

/* A SYN was dropped by a socket that is not listening (skb drop reason
 * TCP_INVALID_SYN): tcp_validate_incoming() has just called
 * tcp_send_challenge_ack(). The collision starts here. */
static __always_inline int tc_on_syn_challenged(void *ctx, const void *sk, __u32 hook)
{
	struct tc_event ev = {};
	struct tc_tuple t = {};
	__u32 now_j, rcv_tstamp = 0, last_oow = 0, copied = 0, unread;

	tc_fired(hook); /* counted before the user's filters: the self-test runs in its own netns */
	if (tc_sock_tuple(sk, &t))
		return 0;
	tc_track(&t, (__u64)sk);
	if (tc_fill_sock(sk, &ev))
		return 0;
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
	events.perf_submit(ctx, &ev, sizeof(ev));
	return 0;
}

/* The TCP header of `skb` (skb->head + skb->transport_header), or NULL. */
static __always_inline const unsigned char *tc_tcp_header(const void *skb)
{
	unsigned char *head = 0;
	__u16 thoff = 0;

	if (!skb)
		return 0;
	tc_read(head, skb, OFF_SKB_HEAD);
	tc_read(thoff, skb, OFF_SKB_TRANSPORT_HEADER);
	if (!head || thoff == 0xffff) /* 0xffff: not set */
		return 0;
	return head + thoff;
}

/* The RST a socket sends in reply to `skb` (tcp_v4/v6_send_reset): its
 * sequence number is the ack number of the segment that provoked it. */
static __always_inline __u32 tc_rst_seq(const void *skb)
{
	const unsigned char *th = tc_tcp_header(skb);
	__u32 ack_seq_be = 0;

	if (!th)
		return 0;
	/* struct tcphdr: ack_seq is the third 32-bit word */
	bpf_probe_read_kernel(&ack_seq_be, 4, th + 8);
	return __builtin_bswap32(ack_seq_be);
}

/* Any socket event that matters only when it is about a tracked tuple. */
static __always_inline int tc_on_tracked(void *ctx, const void *sk, __u32 type, __u32 hook,
					 int oldstate, int newstate, const void *skb)
{
	if (!tc_sock_tracked(sk))
		return 0;
	{
		/* declared here: clang zeroes a local where it is declared, and the
		 * untracked path must not pay for a few hundred bytes of stores */
		struct tc_event ev = {};

		/* counted on tracked tuples only, to keep the untracked path to one
		 * lookup: the self-test's collision exercises every such hook */
		tc_fired(hook);
		if (tc_fill_sock(sk, &ev))
			return 0;
		ev.type = type;
		ev.hook = hook;
		if (type == TC_EV_RST_SENT)
			ev.seq = tc_rst_seq(skb);
		if (oldstate >= 0)
			ev.oldstate = oldstate;
		if (newstate >= 0)
			ev.newstate = newstate;
		events.perf_submit(ctx, &ev, sizeof(ev));
		return 0;
	}
}

/* tcp_set_state(): report transitions of tracked tuples. Every state change
 * of the host comes through here, so outside a collision it costs one array
 * lookup (tc_sock_tracked). `oldstate` < 0: still in sk, read it only for a
 * tracked socket. (The age of a lingering socket is read from the socket
 * itself when a SYN hits it, tp->rcv_tstamp, rather than kept in a map on
 * every CLOSE_WAIT transition: that cost 0.55 us per connection on a
 * CLOSE_WAIT churn.) */
static __always_inline int tc_on_set_state(void *ctx, const void *sk, int oldstate, int newstate, __u32 hook)
{
	__u8 state = 0;

	if (oldstate < 0 && tc_sock_tracked(sk)) {
		tc_read(state, sk, OFF_SKC_STATE);
		oldstate = state;
	}
	return tc_on_tracked(ctx, sk, TC_EV_STATE, hook, oldstate, newstate, 0);
}

/* TCP header flags (struct tcphdr byte 13) */
#define TC_TH_SYN 0x02
#define TC_TH_RST 0x04
#define TC_TH_ACK 0x10
#define TC_STATE_BIT(s) (1U << (s))

/* The flags byte of the segment `skb` when socket `sk` is in one of the
 * states of the mask `states` (TC_STATE_BIT), else -1: the first question of
 * every hook on received or answered segments, asked with the fewest reads
 * (the state first: most calls stop there). */
static __always_inline int tc_segment_flags(const void *sk, const void *skb, __u32 states)
{
	const unsigned char *th;
	__u8 state = 0, flags = 0;

	if (!sk)
		return -1;
	tc_read(state, sk, OFF_SKC_STATE);
	if (state >= 32 || !(TC_STATE_BIT(state) & states))
		return -1;
	th = tc_tcp_header(skb);
	if (!th)
		return -1;
	bpf_probe_read_kernel(&flags, 1, th + 13);
	return flags;
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
	tc_track(&t, ev.skaddr);
	events.perf_submit(ctx, &ev, sizeof(ev));
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

/* tcp_send_challenge_ack() returned: report whether the ACK went out. */
static __always_inline int tc_on_challenge(void *ctx, const void *sk, __u32 hook)
{
	struct tc_event ev = {};
	__u32 last_oow = 0, now_j = (__u32)bpf_jiffies64();

	tc_fired(hook);
	if (!tc_sock_tracked(sk) || tc_fill_sock(sk, &ev))
		return 0;
	ev.type = TC_EV_CHALLENGE_ACK;
	ev.hook = hook;
	tc_read(ev.seq, sk, OFF_TP_SND_NXT);
	tc_read(ev.ack, sk, OFF_TP_RCV_NXT);
	tc_read(last_oow, sk, OFF_TP_LAST_OOW_ACK_TIME);
	if (tc_challenge_passed(last_oow, now_j))
		ev.flags |= TC_F_CHALLENGE_PASSED;
	events.perf_submit(ctx, &ev, sizeof(ev));
	return 0;
}

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
	events.perf_submit(ctx, &ev, sizeof(ev));
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
			ev.age_ns = ev.ts_ns - syn_ns;
			ev.flags |= TC_F_SYN_STAMP;
		} else if (syn_ns > ev.ts_ns && syn_ns - ev.ts_ns <= unit / 2) {
			ev.age_ns = 0; /* the SYN left in this very unit */
			ev.flags |= TC_F_SYN_STAMP;
		}
	}
	/* a collision the server's side already registered keeps its entry */
	tc_tuple_of(&ev, 0, &t);
	if (!tracked.lookup(&t)) {
		tr.first_ns = ev.ts_ns;
		tr.skaddr = ev.skaddr;
		tracked.update(&t, &tr);
	}
	tc_open_window();
	events.perf_submit(ctx, &ev, sizeof(ev));
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
