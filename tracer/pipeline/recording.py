"""Recordings: what the correlator was fed during a live run, to replay it
later without root or BPF and get exactly the same incidents.

A recording is the correlator's input log, in the order it was fed: kernel
events as released by the reorder buffer (the `struct tc_event` bytes of
bpf/tcpcollide.h), lost-event counts, the clock ticks that ended incidents,
when the state-change hook was attached and detached (tracer/session.py),
and what the host added to each incident (tracer/host/diagnosis.py: the process
holding the socket, the listener's queue) and the queue records. Replaying
it through the same pure correlator reproduces the live run's output.

Layout: the magic line, one JSON header line (format version, tracer
version, kernel, backend, the kernel's TCP state numbering, HZ, the clock
offset, the event size, the correlator's settings, the host's name and boot
id), then frames of
`<kind u8><length u32 LE><payload>`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tracer import __version__
from tracer.pipeline.events import EVENT_SIZE

MAGIC = b"TCPCOLLIDE-RECORDING\n"
FORMAT = 1
MAX_HEADER = 1 << 20
MAX_FRAME = 1 << 24

EVENT, LOST, TICK, CONTEXT, QUEUE, END, FLUSH, STATE_HOOK, SKIPPED, EVICTED = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
KINDS = {EVENT: "event", LOST: "lost", TICK: "tick", CONTEXT: "context", QUEUE: "queue", END: "end", FLUSH: "flush",
         STATE_HOOK: "state_hook", SKIPPED: "skipped", EVICTED: "evicted"}
_FRAME = struct.Struct("<BI")
_U64 = struct.Struct("<Q")


class RecordingError(Exception):
    """The recording is not readable from `offset` on."""

    def __init__(self, offset: int, why: str):
        super().__init__(f"{why} at byte offset {offset}")
        self.offset = offset


@dataclass(frozen=True)
class Frame:
    kind: int
    offset: int
    payload: bytes

    def json(self):
        return json.loads(self.payload)

    def u64(self) -> int:
        return _U64.unpack(self.payload)[0]

    def u64s(self) -> tuple[int, ...]:
        return tuple(_U64.unpack_from(self.payload, i)[0] for i in range(0, len(self.payload), _U64.size))


class Writer:
    """Appends frames; flushed at every frame boundary that matters (an
    incident's context, the end), so a killed tracer leaves a readable file.

    A write that fails (a full disk: ENOSPC, a file system gone read-only)
    stops the recording and nothing else: the frames after it are dropped,
    `stopped` says why and `stopped_at` how many bytes the file holds (it
    replays up to there), and `on_stop(writer)` is told once."""

    def __init__(self, f: BinaryIO, header: dict, on_stop: Callable[[Writer], None] | None = None):
        self.f = f
        self.on_stop = on_stop
        self.stopped: str | None = None
        self.stopped_at: int | None = None
        head = {"format": FORMAT, "tracer": __version__, "event_size": EVENT_SIZE, **header}
        self._write(MAGIC + json.dumps(head, separators=(",", ":")).encode() + b"\n")
        self._flush()

    def _write(self, data: bytes) -> None:
        if self.stopped is None:
            try:
                self.f.write(data)
            except OSError as e:
                self._stop(e)

    def _flush(self) -> None:
        if self.stopped is None:
            try:
                self.f.flush()
            except OSError as e:
                self._stop(e)

    def _stop(self, e: OSError) -> None:
        self.stopped = e.strerror or str(e)
        try:
            self.stopped_at = os.fstat(self.f.fileno()).st_size
        except (OSError, ValueError, AttributeError):
            self.stopped_at = None
        if self.on_stop is not None:
            self.on_stop(self)

    def status(self) -> dict:
        """For the summary: whether the recording stopped early, why, and where."""
        return {"stopped": self.stopped, "stopped_at_bytes": self.stopped_at}

    def _frame(self, kind: int, payload: bytes) -> None:
        self._write(_FRAME.pack(kind, len(payload)) + payload)

    def event(self, raw: bytes) -> None:
        self._frame(EVENT, raw)

    def lost(self, count: int) -> None:
        self._frame(LOST, _U64.pack(count))

    def skipped(self, runs: int, only_state_hook: bool) -> None:
        self._frame(SKIPPED, _U64.pack(runs) + _U64.pack(int(only_state_hook)))

    def tick(self, now_ns: int) -> None:
        self._frame(TICK, _U64.pack(now_ns))

    def context(self, incident_id: int, context: dict) -> None:
        self._frame(CONTEXT, json.dumps({"id": incident_id, **context}, separators=(",", ":")).encode())
        self._flush()

    def queue(self, rec: dict) -> None:
        self._frame(QUEUE, json.dumps(rec, separators=(",", ":")).encode())
        self._flush()

    def state_hook(self, attached: bool, at_ns: int) -> None:
        self._frame(STATE_HOOK, json.dumps({"attached": attached, "at_ns": at_ns}, separators=(",", ":")).encode())

    def evicted(self, keys: list[tuple]) -> None:
        """Open incidents whose entry map `tracked` evicted (tracer/kernel/tracking.py)."""
        doc = [[fam, saddr.hex(), sport, caddr.hex(), cport] for fam, saddr, sport, caddr, cport in keys]
        self._frame(EVICTED, json.dumps(doc, separators=(",", ":")).encode())

    def flush(self) -> None:
        self._frame(FLUSH, b"")

    def end(self, summary: dict) -> None:
        self._frame(END, json.dumps(summary, separators=(",", ":")).encode())
        self._flush()


def host_identity() -> dict:
    """Which host and which boot a recording is of: a join
    (tracer/pipeline/join.py) knows two recordings of one boot share the
    kernel's clock, and names each recording's host."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    return {"host": socket.gethostname(), "boot_id": boot_id}


def read_header(f: BinaryIO) -> dict:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise RecordingError(0, "not a tcpcollide-trace recording (bad magic)")
    line = f.readline(MAX_HEADER)
    if not line.endswith(b"\n"):
        raise RecordingError(len(MAGIC), "truncated header")
    try:
        head = json.loads(line)
    except ValueError:
        raise RecordingError(len(MAGIC), "corrupt header (not JSON)") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise RecordingError(len(MAGIC), f"unsupported recording format {head.get('format') if isinstance(head, dict) else head!r} (this tracer reads {FORMAT})")
    if head.get("event_size") != EVENT_SIZE:
        raise RecordingError(len(MAGIC), f"events of {head.get('event_size')} bytes; this tracer's layout has {EVENT_SIZE}")
    for key in ("tcp_states", "backend", "clock_offset_ns"):
        if key not in head:
            raise RecordingError(len(MAGIC), f"header lacks {key!r}")
    states = head["tcp_states"]
    if not isinstance(states, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in states.items()):
        raise RecordingError(len(MAGIC), "corrupt header (tcp_states)")
    head["tcp_states"] = {int(k): v for k, v in states.items()}
    if not isinstance(head["backend"], str):
        raise RecordingError(len(MAGIC), "corrupt header (backend)")
    for key in ("clock_offset_ns", "hz", "incident_timeout_ns", "grace_ns"):
        value = head.get(key)
        bad = not isinstance(value, int) or isinstance(value, bool) or (value < 0 and key != "clock_offset_ns")
        if value is not None and bad:
            raise RecordingError(len(MAGIC), f"corrupt header ({key})")
    return head


def frames(f: BinaryIO, start: int) -> Iterator[Frame]:
    """Frames from `start` (after the header). Raises RecordingError at the
    first damaged frame, after yielding every good one before it."""
    offset = start
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            raise RecordingError(offset, "truncated frame header")
        kind, length = _FRAME.unpack(head)
        if kind not in KINDS:
            raise RecordingError(offset, f"unknown frame kind {kind}")
        if length > MAX_FRAME:
            raise RecordingError(offset, f"frame of {length} bytes (corrupt length)")
        payload = f.read(length)
        if len(payload) < length:
            raise RecordingError(offset, f"truncated {KINDS[kind]} frame ({len(payload)} of {length} bytes)")
        if kind == EVENT and length != EVENT_SIZE:
            raise RecordingError(offset, f"event frame of {length} bytes, expected {EVENT_SIZE}")
        if kind == FLUSH and length:
            raise RecordingError(offset, f"flush frame of {length} bytes, expected 0")
        if kind in (LOST, TICK) and length != _U64.size:
            raise RecordingError(offset, f"{KINDS[kind]} frame of {length} bytes, expected 8")
        if kind == SKIPPED and length != 2 * _U64.size:
            raise RecordingError(offset, f"skipped frame of {length} bytes, expected 16")
        if kind in (CONTEXT, QUEUE, END, STATE_HOOK, EVICTED):
            try:
                doc = json.loads(payload)
            except ValueError:
                raise RecordingError(offset, f"corrupt {KINDS[kind]} frame (not JSON)") from None
            if kind == STATE_HOOK and not (isinstance(doc, dict) and isinstance(doc.get("attached"), bool)
                                           and type(doc.get("at_ns")) is int):
                raise RecordingError(offset, "corrupt state_hook frame (attached, at_ns)")
            if kind == EVICTED and evicted_keys(doc) is None:
                raise RecordingError(offset, "corrupt evicted frame (a list of tuples)")
        yield Frame(kind, offset, payload)
        offset += _FRAME.size + length


def evicted_keys(doc) -> list[tuple] | None:
    """The incident keys of an evicted frame's JSON, or None when it is not one."""
    try:
        return [(int(fam), bytes.fromhex(saddr), int(sport), bytes.fromhex(caddr), int(cport))
                for fam, saddr, sport, caddr, cport in doc]
    except (TypeError, ValueError):
        return None
