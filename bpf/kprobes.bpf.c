/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the kprobe backend (kernels with CONFIG_KPROBES).
 * Functions are attached by tracer/kernel/hooks.py to the symbol the running kernel
 * really has (a static function may carry a .isra/.constprop suffix); only
 * the selected ones are compiled in (TC_USE_KP_<HOOK>). Arguments are read
 * from the registers (struct pt_regs: bpf/compat/include/asm/ptrace.h, or
 * the kernel's own with real headers).
 */
#include <asm/ptrace.h>

#ifdef TC_USE_KP_SET_STATE
/* tcp_set_state(struct sock *sk, int state): the old state is still in sk */
int tc_kp_set_state(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);

	return tc_on_set_state(ctx, sk, -1, (int)PT_REGS_PARM2(ctx), TC_HOOK_KP_SET_STATE);
}
#endif

#ifdef TC_USE_KP_SYN_CHALLENGED
/* tcp_rcv_state_process(struct sock *sk, struct sk_buff *skb) */
int tc_kp_rcv_state(struct pt_regs *ctx)
{
	return tc_on_rcv_state(ctx, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx),
			       TC_HOOK_KP_RCV_STATE);
}
#endif

#ifdef TC_USE_KP_CHALLENGE
/* tcp_send_challenge_ack(struct sock *sk, ...): entry and return. A
 * kretprobe has no arguments: each CPU keeps the sockets of the calls in
 * progress on it as a stack (a call interrupted by a softirq's call on
 * another socket returns after it: last in, first out). */
#define TC_CHALLENGE_DEPTH 4
struct tc_challenge_stack {
	__u32 depth;
	__u64 sk[TC_CHALLENGE_DEPTH];
};
BPF_PERCPU_ARRAY(challenge_stack, struct tc_challenge_stack, 1);

int tc_kp_challenge(struct pt_regs *ctx)
{
	int zero = 0;
	struct tc_challenge_stack *st = challenge_stack.lookup(&zero);
	__u32 d;

	if (!st)
		return 0;
	d = st->depth;
	if (d < TC_CHALLENGE_DEPTH)
		st->sk[d] = PT_REGS_PARM1(ctx);
	st->depth = d + 1;
	tc_challenge_enter((const void *)PT_REGS_PARM1(ctx));
	return 0;
}

int tc_kretp_challenge(struct pt_regs *ctx)
{
	int zero = 0;
	struct tc_challenge_stack *st = challenge_stack.lookup(&zero);
	__u32 d;
	__u64 sk = 0;

	if (!st || !st->depth)
		return 0;
	d = st->depth - 1;
	st->depth = d;
	if (d < TC_CHALLENGE_DEPTH)
		sk = st->sk[d];
	if (!sk)
		return 0;
	return tc_on_challenge(ctx, (const void *)sk, TC_HOOK_KP_CHALLENGE);
}
#endif

#ifdef TC_USE_KP_CONNECT
/* tcp_v4_connect / tcp_v6_connect(struct sock *sk, ...) */
int tc_kp_connect(struct pt_regs *ctx)
{
	return tc_on_connect((const void *)PT_REGS_PARM1(ctx), TC_HOOK_KP_CONNECT);
}
#endif

#ifdef TC_USE_KP_QUEUE_ADD
/* inet_csk_reqsk_queue_add(struct sock *sk, struct request_sock *req, struct sock *child) */
int tc_kp_queue_add(struct pt_regs *ctx)
{
	return tc_on_queued(ctx, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM3(ctx),
			    TC_HOOK_KP_QUEUE_ADD, 0);
}
#endif

#ifdef TC_USE_KP_HASHDANCE
/* inet_csk_complete_hashdance(struct sock *sk, struct sock *child, struct request_sock *req, bool own_req):
 * with own_req it queues the child (inet_csk_reqsk_queue_add, maybe inlined into it) */
int tc_kp_hashdance(struct pt_regs *ctx)
{
	if (!(PT_REGS_PARM4(ctx) & 0xff))
		return 0;
	return tc_on_queued(ctx, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx),
			    TC_HOOK_KP_HASHDANCE, 0);
}
#endif
