/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the BPF program. tracer/kernel/program.py compiles this file
 * with the shared logic and the three backends inlined (bcc rewrites map
 * operations only in the main translation unit); which hooks are compiled in
 * is chosen per kernel by tracer/kernel/hooks.py (TC_USE_* macros).
 */
#include "collide.bpf.h"
#include "tracepoints.bpf.c"
#include "kprobes.bpf.c"
#include "fentry.bpf.c"
