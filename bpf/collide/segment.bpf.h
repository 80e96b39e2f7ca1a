/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: reading the TCP segment (skb) a hook is given.
 */

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

/* TCP header flags (struct tcphdr byte 13) */
#define TC_TH_SYN 0x02
#define TC_TH_RST 0x04
#define TC_TH_ACK 0x10
#define TC_STATE_BIT(s) (1U << (s))

/* The flags byte of the segment `skb` when socket `sk` is in one of the
 * states of the mask `states` (TC_STATE_BIT), else -1: the first question of
 * every hook on received or answered segments, asked with the fewest reads
 * (no segment, no read at all: a socket's own reset, tcp_send_active_reset(),
 * has none, and it is most of a host's resets; then the state: most other
 * calls stop there). */
static __always_inline int tc_segment_flags(const void *sk, const void *skb, __u32 states)
{
	const unsigned char *th;
	__u8 state = 0, flags = 0;

	if (!sk || !skb)
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
