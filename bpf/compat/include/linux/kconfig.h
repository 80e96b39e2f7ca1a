/* tcpcollide-trace's compatibility tree: bcc force-includes linux/kconfig.h.
 * The BPF programs never touch kernel structs through headers: every field
 * offset comes from the running kernel's BTF (see tracer/offsets.py). */
#define CONFIG_BPF_SYSCALL 1
