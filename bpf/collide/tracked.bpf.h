/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the tuples of collisions in progress (map `tracked`):
 * looking a socket's tuple up, registering a collision, and the events that
 * matter only on a tracked tuple, from either end.
 */

/* The entry of a socket's tuple (`t`, as the socket sees it: local first)
 * in either orientation, or NULL. *server_end: the socket is the server's
 * end. (Swaps `t` for the second lookup.) */
static __always_inline struct tc_track *tc_tuple_entry(struct tc_tuple *t, int *server_end)
{
	struct tc_track *tr = tracked.lookup(t);
	__u8 a[16];
	__u16 p;

	*server_end = 1;
	if (tr)
		return tr;
	*server_end = 0;
	p = t->sport;
	t->sport = t->cport;
	t->cport = p;
	__builtin_memcpy(a, t->saddr, 16);
	__builtin_memcpy(t->saddr, t->caddr, 16);
	__builtin_memcpy(t->caddr, a, 16);
	return tracked.lookup(t);
}

/* Is this tuple tracked in either orientation? (Swaps `t` for the second.) */
static __always_inline int tc_tuple_tracked(struct tc_tuple *t)
{
	int server_end;

	return tc_tuple_entry(t, &server_end) != 0;
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

/* Add a tuple that was not tracked: 1 when this added it (counted: a full
 * LRU map evicts another entry to make room, and user space tells the
 * evictions from the entries added, deleted and left), 0 when another CPU
 * added it just before (EEXIST), -1 when the map refused it. */
static __always_inline int tc_track_add(const struct tc_tuple *t, const struct tc_track *tr)
{
	int err = tracked.insert(t, tr);

	if (err == -17) /* EEXIST */
		return 0;
	if (err)
		return -1;
	tc_stat(TC_STAT_TRACK_ADDED);
	return 1;
}

/* Register a collision of lingering socket `skaddr` on tuple `t`: 1 when it
 * is new (the tuple was not tracked for this socket), 0 when already
 * tracked, -1 when the map refused it. */
static __always_inline int tc_track(const struct tc_tuple *t, __u64 skaddr)
{
	struct tc_track tr = {};
	struct tc_track *old;
	int fresh = 0;

	tr.first_ns = bpf_ktime_get_ns();
	tr.skaddr = skaddr;
	old = tracked.lookup(t);
	if (!old)
		fresh = tc_track_add(t, &tr);
	else if (old->skaddr != skaddr)
		fresh = tracked.update(t, &tr) ? -1 : 1;
	tc_open_window();
	return fresh;
}

/* Stream one event about a socket of a tracked tuple: 0 when it went to
 * user space. */
static __always_inline int tc_emit(void *ctx, const void *sk, __u32 type, __u32 hook, int oldstate, int newstate,
				   const void *skb)
{
	/* declared here: clang zeroes a local where it is declared, and the
	 * untracked path must not pay for a few hundred bytes of stores */
	struct tc_event ev = {};

	if (tc_fill_sock(sk, &ev))
		return 1;
	ev.type = type;
	ev.hook = hook;
	if (type == TC_EV_RST_SENT)
		ev.seq = tc_rst_seq(skb);
	if (oldstate >= 0)
		ev.oldstate = oldstate;
	if (newstate >= 0)
		ev.newstate = newstate;
	return tc_submit(ctx, &ev);
}

/* Any socket event that matters only when it is about a tracked tuple. */
static __always_inline int tc_on_tracked(void *ctx, const void *sk, __u32 type, __u32 hook,
					 int oldstate, int newstate, const void *skb)
{
	struct tc_tuple t = {};
	struct tc_track *tr;
	int server_end;

	if (!sk || !tc_tracking() || tc_sock_tuple(sk, &t))
		return 0;
	tr = tc_tuple_entry(&t, &server_end);
	if (!tr)
		return 0;
	/* counted on tracked tuples only, to keep the untracked path to one
	 * lookup: the self-test's collision exercises every such hook */
	tc_fired(hook);
	if (!tc_emit(ctx, sk, type, hook, oldstate, newstate, skb) && type == TC_EV_RST_RECEIVED && server_end &&
	    (__u64)sk == tr->skaddr)
		tr->seen |= TC_SEEN_RST; /* tcp_reset() ends in tcp_done(): user space takes the kill from this RST */
	return 0;
}

/* tcp_set_state(): report transitions of tracked tuples. Every state change
 * of the host comes through here, so outside a collision it costs one array
 * lookup (tc_tracking). `oldstate` < 0: still in sk, read it only for a
 * tracked socket. Nothing is kept per transition: the age of a lingering
 * socket is read from the socket itself when a SYN hits it (tp->rcv_tstamp,
 * tc_on_syn_challenged).
 *
 * Once an end of the new connection was streamed arriving in ESTABLISHED,
 * the rest of its life (ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> CLOSE, or
 * -> CLOSE_WAIT -> LAST_ACK) stays here, counted (TC_STAT_NOT_STREAMED):
 * user space learns nothing from it, and it was a third of a collision's
 * events. An end whose arrival was not streamed (a BPF run the kernel
 * skipped) still streams its departure from ESTABLISHED: that is how user
 * space learns of the skipped run. Nor are two changes that tell user space
 * nothing another event does not: a child's LISTEN -> SYN_RECV (it moves
 * to ESTABLISHED in the same softirq), a connecting socket's CLOSE ->
 * SYN_SENT (its collision, if any, starts with its SYN), and the lingering socket's CLOSE
 * once its received RST was streamed (tcp_reset() ends in tcp_done()). The
 * lingering socket's other changes always stream. */
static __always_inline int tc_on_set_state(void *ctx, const void *sk, int oldstate, int newstate, __u32 hook)
{
	struct tc_tuple t = {};
	struct tc_track *tr;
	__u8 state = 0;
	__u32 bit;
	int server_end = 0;

	if (!sk || !tc_tracking() || tc_sock_tuple(sk, &t))
		return 0;
	tr = tc_tuple_entry(&t, &server_end);
	if (!tr)
		return 0;
	tc_fired(hook);
	if (oldstate < 0) {
		tc_read(state, sk, OFF_SKC_STATE);
		oldstate = state;
	}
	if (server_end && (__u64)sk == tr->skaddr && newstate == K_TCP_CLOSE && (tr->seen & TC_SEEN_RST)) {
		tc_stat(TC_STAT_NOT_STREAMED); /* the kill of the lingering socket, streamed as its RST */
		return 0;
	}
	if ((__u64)sk != tr->skaddr) {
		if ((oldstate == K_TCP_LISTEN && newstate == K_TCP_SYN_RECV) ||
		    (oldstate == K_TCP_CLOSE && newstate == K_TCP_SYN_SENT)) {
			/* a child of the listener on the tuple: made as the handshake's
			 * last ACK arrives, and moved to ESTABLISHED in the same softirq,
			 * whose event tells user space all this one would; or a client's
			 * connect() on a tuple still tracked (a client reconnecting from
			 * the same port, its last collision's incident not ended yet):
			 * a collision of it starts with its SYN challenged, not here */
			tc_stat(TC_STAT_NOT_STREAMED);
			return 0;
		}
		bit = server_end ? TC_SEEN_SERVER : TC_SEEN_CLIENT;
		if (newstate == K_TCP_ESTABLISHED && (oldstate == K_TCP_SYN_SENT || oldstate == K_TCP_SYN_RECV)) {
			tr->seen |= bit; /* racing CPUs may lose a bit: then one more event streams, harmless */
		} else if ((oldstate == K_TCP_ESTABLISHED && (tr->seen & bit)) || oldstate == K_TCP_FIN_WAIT1 ||
			   oldstate == K_TCP_FIN_WAIT2 || oldstate == K_TCP_CLOSING ||
			   ((oldstate == K_TCP_CLOSE_WAIT || oldstate == K_TCP_LAST_ACK) && (tr->seen & bit))) {
			tc_stat(TC_STAT_NOT_STREAMED);
			return 0;
		}
	}
	tc_emit(ctx, sk, TC_EV_STATE, hook, oldstate, newstate, 0);
	return 0;
}
