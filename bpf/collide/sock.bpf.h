/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: reading a socket. Every kernel struct read goes through
 * tc_read() with an offset of the running kernel (OFF_*); the connection's
 * tuple is described the same way from a filled event and from a socket.
 */

#define tc_read(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

static __always_inline int tc_v4_mapped(const __u8 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 && a[6] == 0 &&
	       a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* Fill the socket part of an event. Returns 0 when the event passes the
 * user's filters (map `filters`), non-zero otherwise.
 * `tw`: sk is a TIME_WAIT socket (only its struct sock_common is there). */
static __always_inline int tc_fill_sock_tw(const void *sk, struct tc_event *ev, int tw)
{
	__u16 family = 0, sport_be = 0, dport_be = 0;
	__u8 state = 0;
	void *net = 0;
	void *sock = 0;
	__u32 zero = 0;
	struct tc_filters *flt = filters.lookup(&zero);

	if (!flt)
		return 1;
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
	if (flt->port && ev->lport != flt->port && ev->rport != flt->port)
		return 1;
	tc_read(net, sk, OFF_SKC_NET);
	if (net)
		tc_read(ev->netns, net, OFF_NET_NS_INUM);
	if (flt->netns && ev->netns != flt->netns)
		return 1;
	if (flt->netns_set && !netns_allowed.lookup(&ev->netns))
		return 1;
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
	if (flt->family && ev->family != flt->family)
		return 1;
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
