"""Standard output for a live tracer: never blocks the tracing loop.

A tracer whose reader stops reading (a full pipe) would otherwise block in
write(2) with collisions in progress: the perf buffer unread, the kernel's
tracking window held open, incidents never ended. So records written to a
pipe, a terminal or a socket are kept in memory and written only as far as
the reader takes them (poll(2) before each write of at most PIPE_BUF bytes:
such a write into a pipe with room never blocks); the tracing loop goes on.
Past BACKLOG bytes waiting, whole batches of records are dropped and counted
(one line on stderr says so, once, and the summary's `output_dropped`) until
the reader takes half of what waits; the summary itself is always kept. A regular file is written directly.

A reader that went away (`| head -1`: EPIPE) ends the session like a
signal, without the summary nobody would read: OutputClosed, exit status 0.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time

BACKLOG = 4 << 20  # bytes kept for a reader that does not read, beyond the pipe's own buffer
CHUNK = 4096  # PIPE_BUF: a write this small into a pipe that polls writable does not block
FINAL_WAIT_S = 1.0  # at exit: how long to let a slow reader take what is left


class OutputClosed(Exception):
    """The reader of standard output went away (EPIPE)."""


class Stdout:
    """A text stream on fd 1 (or `fd`) for JsonWriter and rich's Console."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, fd: int | None = None, backlog: int = BACKLOG, warn=None):
        self.fd = sys.stdout.fileno() if fd is None else fd
        self.backlog = backlog
        self._pending = bytearray()
        self._direct = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.closed_by_reader = False
        self.dropping = False
        self.dropped_writes = 0
        self.dropped_bytes = 0
        self._warned = False
        self._warn = warn or self._stderr

    # -- the file-like side ---------------------------------------------------

    def write(self, text: str) -> int:
        if self.closed_by_reader:
            return len(text)
        data = text.encode(self.encoding, self.errors)
        if self.dropping:
            self.dropped_writes += 1
            self.dropped_bytes += len(data)
            if not self._warned:
                self._warned = True
                self._warn(f"standard output is not being read: {len(self._pending) >> 20} MiB wait; records "
                           "are dropped until it is (counted in the summary's output_dropped)")
        else:
            self._pending += data
        return len(text)

    def flush(self) -> None:
        """Write what the reader takes now; never waits. OutputClosed when it is gone."""
        if self.closed_by_reader:
            return
        self._drain(0.0)
        if len(self._pending) > self.backlog:
            self.dropping = True
        elif self.dropping and len(self._pending) <= self.backlog // 2:
            self.dropping = False

    def finish(self) -> None:
        """At exit: give a slow reader FINAL_WAIT_S to take what is left; then let it go."""
        if self.closed_by_reader:
            return
        try:
            self._drain(FINAL_WAIT_S)
        except OutputClosed:
            pass
        self._pending.clear()

    def keep_next(self) -> None:
        """What is written next is kept whatever waits (the summary)."""
        self.dropping = False

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def writable(self) -> bool:
        return True

    @property
    def waiting(self) -> int:
        """Bytes kept for the reader."""
        return len(self._pending)

    def dropped(self) -> dict | None:
        """The summary's `output_dropped` (None: nothing was dropped)."""
        if not self.dropped_writes:
            return None
        return {"records": self.dropped_writes, "bytes": self.dropped_bytes}

    # -- inside ---------------------------------------------------------------

    def _drain(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while self._pending:
            if not self._direct:
                left = max(0.0, deadline - time.monotonic())
                p = select.poll()
                p.register(self.fd, select.POLLOUT)
                if not p.poll(int(left * 1000)):
                    return  # the reader takes nothing now: keep the rest
            chunk = self._pending if self._direct else self._pending[:CHUNK]
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:
                return
            except OSError:  # EPIPE (the reader went away), EIO (its terminal hung up) ...
                self.closed_by_reader = True
                self._pending.clear()
                raise OutputClosed() from None
            del self._pending[:n]

    @staticmethod
    def _stderr(message: str) -> None:
        sys.stderr.write(f"tcpcollide-trace: warning: {message}\n")
        sys.stderr.flush()
