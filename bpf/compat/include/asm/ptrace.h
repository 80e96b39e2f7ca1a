/* tcpcollide-trace's compatibility tree: the kernel's x86-64 struct pt_regs
 * (arch/x86/include/asm/ptrace.h), which bcc's PT_REGS_PARM*() macros read in
 * kprobe programs. Its layout is the x86-64 entry ABI and does not change. */
#ifndef _COMPAT_ASM_PTRACE_H
#define _COMPAT_ASM_PTRACE_H
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#endif
