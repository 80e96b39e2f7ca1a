/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tcpcollide-trace: the collision logic shared by every hook backend.
 *
 * Not a real header, nor are the files it includes: tracer/kernel/program.py
 * inlines every `#include "*.bpf.h"` into the backend source, because bcc
 * rewrites map operations only in the main translation unit.
 *
 * A backend (bpf/tracepoints.bpf.c, kprobes.bpf.c, fentry.bpf.c) only
 * extracts the socket pointer and the hook's arguments, then calls the
 * tc_on_*() handlers of collide/tracked, server and client. Everything read
 * from a kernel struct goes through tc_read() with an offset from the running
 * kernel (macros OFF_*, defined by tracer/kernel/offsets.py from BTF), and
 * every kernel enum value comes from the running kernel too (macros K_*).
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

#include "collide/maps.bpf.h"    /* the maps, tc_fired(), tc_tracking() */
#include "collide/sock.bpf.h"    /* tc_read(), filling an event from a socket, tuples */
#include "collide/segment.bpf.h" /* the TCP header of an skb, its flags */
#include "collide/tracked.bpf.h" /* tracked tuples: lookup, registration, their events */
#include "collide/server.bpf.h"  /* the lingering socket's side: SYN challenged, challenge ACK, queued */
#include "collide/client.bpf.h"  /* the connecting socket's side: connect(), the reset challenge ACK */
