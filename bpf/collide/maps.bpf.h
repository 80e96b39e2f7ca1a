/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the maps shared by the hooks and user space, their key
 * and value types, and the two questions asked of them on every hook: count
 * that it fired, and whether a collision is in progress at all.
 */

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
	__u64 skaddr;   /* the lingering socket (the connecting one where the client registered it) */
	__u32 seen;     /* TC_SEEN_*: the ends of the new connection streamed arriving in ESTABLISHED, the RST */
	__u32 pad;
};

#define TC_SEEN_SERVER 1
#define TC_SEEN_CLIENT 2
#define TC_SEEN_RST 4 /* the lingering socket's received RST was streamed: its CLOSE says nothing more */

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
/* The user's filters, applied to every event before it is filled further
 * (tc_fill_sock_tw()): written by user space once, right after the load
 * (tracer/kernel/program.py Filters.apply), so that one compiled object
 * serves every filter value (tracer/kernel/objcache.py). 0: no filter. */
struct tc_filters {
	__u32 netns;     /* --netns: only this network namespace (inode number) */
	__u32 netns_set; /* --container/--pod/--unit: only the namespaces in `netns_allowed` */
	__u16 port;      /* -p: only connections with this local or remote port */
	__u16 family;    /* -4/-6: only AF_INET or AF_INET6 */
	__u32 pad;
};
BPF_ARRAY(filters, struct tc_filters, 1);
/* --container/--pod/--unit: the network namespaces their processes run in,
 * kept current by user space (tracer/host/workload.py Selection) */
BPF_HASH(netns_allowed, __u32, __u8, TC_NETNS_SET_SIZE);
/* collisions in progress; user space deletes an entry when its incident ends */
BPF_TABLE("lru_hash", struct tc_tuple, struct tc_track, tracked, TC_TRACK_MAP_SIZE);

/* Collisions per (network namespace, server port, lingering state): map
 * `counts`, read by tracer/kernel/counters.py. */
struct tc_count_key {
	__u32 netns;
	__u16 family;
	__u16 sport;
	__u32 state;
};

struct tc_count {
	__u64 collisions;
	__u64 syn_hits;
};

/* enum tc_stat, per CPU (no cache line shared between CPUs in a storm) */
BPF_PERCPU_ARRAY(stats, __u64, TC_STAT_MAX);
BPF_TABLE("percpu_hash", struct tc_count_key, struct tc_count, counts, TC_COUNT_MAP_SIZE);

static __always_inline void tc_stat(__u32 stat)
{
	__u64 *n = stats.lookup(&stat);

	if (n)
		*n += 1;
}

/* An event to user space; one the perf buffer refuses is counted (and
 * returns non-zero). */
static __always_inline int tc_submit(void *ctx, struct tc_event *ev)
{
	if (events.perf_submit(ctx, ev, sizeof(*ev)) < 0) {
		tc_stat(TC_STAT_NOT_SUBMITTED);
		return 1;
	}
	return 0;
}

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
