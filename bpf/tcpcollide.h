/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the event layout shared by the BPF programs and Python.
 *
 * This header is the one home of the layout. tracer/pipeline/events.py parses it (the
 * struct below and the enums) to decode perf-buffer records and recordings, so
 * keep to its simple grammar: one field per line, `__u8`/`__u16`/`__u32`/
 * `__u64`/`char` types, fixed-size arrays, fields in natural alignment with no
 * hidden padding, enumerators written as `NAME = NUMBER,`.
 */
#ifndef TCPCOLLIDE_H
#define TCPCOLLIDE_H

/* What happened. One record per event, produced in the kernel. */
enum tc_event_type {
	TC_EV_SYN_CHALLENGED = 1, /* a SYN was dropped by a non-listening socket (RFC 5961 challenge) */
	TC_EV_RST_SENT = 2,       /* a socket on a tracked tuple sent RST (the client in SYN-SENT) */
	TC_EV_RST_RECEIVED = 3,   /* a socket on a tracked tuple received RST */
	TC_EV_STATE = 4,          /* a socket on a tracked tuple changed TCP state */
	TC_EV_RETRANSMIT = 5,     /* a socket on a tracked tuple retransmitted (the client's SYN) */
	TC_EV_QUEUED = 6,         /* a child on a tracked tuple was added to its listener's accept queue */
	TC_EV_CHALLENGE_ACK = 7,  /* tcp_send_challenge_ack() returned for a socket on a tracked tuple */
	TC_EV_CLIENT_CHALLENGED = 8, /* a socket in SYN-SENT answered with RST a bare ACK that does not
				      * acknowledge its SYN: the client's side of a collision */
};

/* Which kernel hook produced the event. */
enum tc_hook {
	TC_HOOK_TP_KFREE_SKB = 1,     /* tracepoint skb:kfree_skb */
	TC_HOOK_TP_SET_STATE = 2,     /* tracepoint sock:inet_sock_set_state */
	TC_HOOK_TP_SEND_RESET = 3,    /* tracepoint tcp:tcp_send_reset */
	TC_HOOK_TP_RECEIVE_RESET = 4, /* tracepoint tcp:tcp_receive_reset */
	TC_HOOK_TP_RETRANSMIT = 5,    /* tracepoint tcp:tcp_retransmit_skb */
	TC_HOOK_KP_SET_STATE = 6,     /* kprobe tcp_set_state */
	TC_HOOK_KP_RCV_STATE = 7,     /* kprobe tcp_rcv_state_process */
	TC_HOOK_KP_CHALLENGE = 8,     /* kprobe + kretprobe tcp_send_challenge_ack */
	TC_HOOK_KP_CONNECT = 9,       /* kprobe tcp_v4_connect / tcp_v6_connect */
	TC_HOOK_KP_QUEUE_ADD = 10,    /* kprobe inet_csk_reqsk_queue_add */
	TC_HOOK_KP_HASHDANCE = 11,    /* kprobe inet_csk_complete_hashdance */
	TC_HOOK_FE_SET_STATE = 12,    /* fentry tcp_set_state */
	TC_HOOK_FE_RCV_STATE = 13,    /* fentry tcp_rcv_state_process */
	TC_HOOK_FE_CHALLENGE = 14,    /* fexit tcp_send_challenge_ack */
	TC_HOOK_FE_CONNECT = 15,      /* fentry tcp_v4_connect / tcp_v6_connect */
	TC_HOOK_FE_QUEUE_ADD = 16,    /* fexit inet_csk_reqsk_queue_add */
	TC_HOOK_FE_HASHDANCE = 17,    /* fexit inet_csk_complete_hashdance */
	TC_HOOK_TP_KFREE_TW = 18,     /* tracepoint skb:kfree_skb, a SYN answered by a TIME_WAIT socket */
	TC_HOOK_FE_RCV_EXIT = 19,     /* fexit tcp_rcv_state_process after a challenged SYN (no fentry on
				       * tcp_send_challenge_ack: a static function absent from BTF, as on 5.10) */
	TC_HOOK_MAX = 20,
};

/* Event flags. */
enum tc_flag {
	TC_F_AGE_OBSERVED = 1,      /* only in recordings of versions before 0.2: syn_age_ns holds the socket's
				     * time in CLOSE_WAIT instead (Python: Event.observed_age_ns) */
	TC_F_CHALLENGE_PASSED = 2,  /* the per-socket challenge-ACK rate limiter let the ACK through now */
	TC_F_AGE_JIFFIES = 4,       /* age_jiffies is valid (tp->rcv_tstamp was set) */
	TC_F_CHALLENGE_SEEN = 8,    /* the challenge is reported separately (TC_EV_CHALLENGE_ACK) */
	TC_F_SYN_STAMP = 16,        /* CLIENT_CHALLENGED: syn_age_ns is valid */
};

/* The entries of map `tracking` (bpf/collide.bpf.h): whether the hooks look
 * sockets up in `tracked`. */
enum tc_window {
	TC_WIN_UNTIL = 0, /* jiffies until which a collision that started may go on (written by BPF) */
	TC_WIN_KEEP = 1,  /* non-zero while user space has incidents open (written by user space) */
};

/* The entries of map `stats` (per CPU, bpf/collide/maps.bpf.h): what the
 * kernel saw of collisions and what it could not pass on, counted in the
 * kernel whatever user space keeps up with. Map `counts` breaks the first two
 * down by (network namespace, server port, lingering state). */
enum tc_stat {
	TC_STAT_COLLISIONS = 0,    /* collisions that passed the user's filters: a lingering socket
				    * challenged a SYN on a tuple it had not been tracked for */
	TC_STAT_SYN_HITS = 1,      /* SYNs challenged by a lingering socket (first ones and repeats) */
	TC_STAT_NOT_SUBMITTED = 2, /* events the perf buffer refused (full): never seen by user space */
	TC_STAT_UNTRACKED = 3,     /* collisions map `tracked` could not register: later events not streamed */
	TC_STAT_UNCOUNTED = 4,     /* collisions map `counts` had no room for (the totals above still count them) */
	TC_STAT_NOT_STREAMED = 5,  /* state changes of a new connection after its end was seen established:
				    * left in the kernel on purpose (nothing is learnt from them), not a loss */
	TC_STAT_STATE_COVERED = 6, /* state changes the set_state program's run would have skipped (it was
				    * interrupted on that CPU by a softirq changing a state), run by its twin */
	TC_STAT_TRACK_ADDED = 7,   /* entries the programs added to map `tracked` (a new tuple): with what user
				    * space deleted and what is left, the LRU's evictions (tracer/kernel/tracking.py) */
	TC_STAT_MAX = 8,
};

struct tc_event {
	__u64 ts_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, nanoseconds */
	__u64 skaddr;      /* kernel address of the socket (an identity, never dereferenced) */
	__u64 syn_age_ns;  /* TC_F_SYN_STAMP: nanoseconds since the connecting socket sent its first SYN
			    * (see TC_F_AGE_OBSERVED for recordings of versions before 0.2) */
	__u32 netns;       /* inode number of the socket's network namespace */
	__u32 type;        /* enum tc_event_type */
	__u32 hook;        /* enum tc_hook */
	__u32 cpu;         /* CPU the hook ran on */
	__u32 pid;         /* current task's tgid when the hook fired (often softirq context) */
	__u32 seq;         /* SYN_CHALLENGED: socket's snd_nxt; RST_SENT: the RST's sequence number;
			    * CLIENT_CHALLENGED: the received ACK's sequence number */
	__u32 ack;         /* SYN_CHALLENGED: socket's rcv_nxt (the challenge ACK's ack number);
			    * CLIENT_CHALLENGED: the received ACK's ack number (= the RST's sequence number) */
	__u32 age_jiffies; /* TC_F_AGE_JIFFIES: jiffies since the socket last accepted an ACK */
	__u32 sk_ino;      /* inode of the socket's struct socket, 0 when it has none */
	__u32 flags;       /* enum tc_flag bits */
	__u32 backlog;     /* QUEUED: listener's accept-queue length after the add */
	__u32 max_backlog; /* QUEUED: listener's accept-queue limit */
	__u32 conn_pid;    /* the process that called connect() on this socket (connect hook), 0 if unknown */
	__u32 unread;      /* SYN_CHALLENGED: bytes the socket received that its application never read */
	__u16 family;      /* AF_INET or AF_INET6 */
	__u16 lport;       /* local port, host order */
	__u16 rport;       /* remote port, host order */
	__u8 oldstate;     /* STATE: previous TCP state; other events: state at the event */
	__u8 newstate;     /* STATE: new TCP state */
	__u8 laddr[16];    /* local address: 4 bytes for AF_INET, 16 for AF_INET6, network order */
	__u8 raddr[16];    /* remote address, same encoding */
	char comm[16];     /* current task's command name (untrusted text) */
	char conn_comm[16]; /* the connecting process's command name (untrusted text) */
};

#endif /* TCPCOLLIDE_H */
