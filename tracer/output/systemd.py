"""Running as a systemd service: the readiness protocol and the journal.

`Notifier` speaks sd_notify(3) on $NOTIFY_SOCKET (nothing when it is unset):
`READY=1` once the session is ready (every hook attached and, where the
self-test runs, seen to fire), `STATUS=` kept current (backend, collisions,
lost events), `WATCHDOG=1` at half of $WATCHDOG_USEC when the unit sets
WatchdogSec=, `STOPPING=1` on the way out.

`JournalWriter` writes each record as one journal entry in journald's native
protocol (systemd.journal-fields(7); a datagram of fields on
/run/systemd/journal/socket): MESSAGE (the record in a sentence), PRIORITY,
SYSLOG_IDENTIFIER, and TCPCOLLIDE_* fields a query can select on
(`journalctl TCPCOLLIDE_OUTCOME=stuck`), the whole record in TCPCOLLIDE_JSON.
Every value goes in the protocol's length-prefixed form, so untrusted text
(process names) cannot start a field of its own. It is chosen with --journal,
or by itself when $JOURNAL_STREAM says standard output is the journal (a
service's default), where lines of JSON would lose the fields.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from tracer.output.render import storm_line
from tracer.pipeline.records import culprit_of

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "tcpcollide-trace"
STATUS_EVERY_S = 5.0
# syslog priorities (journal PRIORITY)
WARNING, NOTICE, INFO = 4, 5, 6


def _send(path: str, payload: bytes) -> bool:
    """One datagram to a unix socket (a leading '@': the abstract namespace)."""
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(payload, address)
        return True
    except OSError:
        return False


class Notifier:
    """sd_notify(3) to the service manager; every call is a no-op without one."""

    def __init__(self, environ=os.environ):
        self.socket = environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._status_at = self._watchdog_at = float("-inf")
        self._last_status = ""

    @property
    def active(self) -> bool:
        return self.socket is not None

    def notify(self, *fields: str) -> bool:
        return self.active and _send(self.socket, "\n".join(fields).encode())

    def ready(self, session) -> None:
        """The session is ready: READY=1, with its first STATUS."""
        self._last_status = self._status(session)
        self.notify("READY=1", f"STATUS={self._last_status}", f"MAINPID={os.getpid()}")
        self._status_at = time.monotonic()

    def tick(self, session) -> None:
        """Between polls: the watchdog when due, STATUS every STATUS_EVERY_S when it changed."""
        if not self.active:
            return
        now = time.monotonic()
        if self.watchdog_s is not None and now - self._watchdog_at >= self.watchdog_s:
            self.notify("WATCHDOG=1")
            self._watchdog_at = now
        if now - self._status_at >= STATUS_EVERY_S:
            self._status_at = now
            status = self._status(session)
            if status != self._last_status:
                self._last_status = status
                self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: detaching")

    def _status(self, session) -> str:
        pipeline = session.pipeline
        collisions = pipeline.summary.collisions if pipeline is not None else 0
        lost = pipeline.correlator.lost_events if pipeline is not None else 0
        return f"tracing ({session.backend} backend): {collisions} collision(s) reported, {lost} event(s) lost"


def journal_is_stdout(environ=os.environ) -> bool:
    """$JOURNAL_STREAM ("DEV:INODE") names standard output: systemd connected it to the journal."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def entry(fields: dict[str, str]) -> bytes:
    """A journal entry in the native protocol, every value length-prefixed."""
    out = bytearray()
    for name, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return bytes(out)


def journal_fields(rec: dict) -> dict[str, str]:
    """The journal entry of one record."""
    kind = rec.get("type", "")
    fields = {"SYSLOG_IDENTIFIER": IDENTIFIER, "TCPCOLLIDE_TYPE": kind}
    if kind == "collision":
        penalty = rec.get("penalty_ms")
        fields.update({
            "PRIORITY": str(WARNING),
            "MESSAGE": (f"collision: {rec['client']} -> {rec['server']} hit a socket in {rec['lingering_state']}: "
                        f"{rec['outcome']}" + (f", penalty {penalty} ms" if penalty is not None else "")
                        + f"; culprit: {culprit_of(rec)}"),
            "TCPCOLLIDE_SERVER": rec["server"], "TCPCOLLIDE_CLIENT": rec["client"],
            "TCPCOLLIDE_OUTCOME": rec["outcome"], "TCPCOLLIDE_OUTCOME_DETAIL": rec.get("outcome_detail") or "",
            "TCPCOLLIDE_LINGERING_STATE": rec["lingering_state"],
            "TCPCOLLIDE_PENALTY_MS": "" if penalty is None else str(penalty),
            "TCPCOLLIDE_CULPRIT": culprit_of(rec), "TCPCOLLIDE_NETNS": str(rec.get("netns") or ""),
            "TCPCOLLIDE_INCOMPLETE": "1" if rec.get("incomplete") else "0",
        })
    elif kind == "storm":
        fields.update({"PRIORITY": str(WARNING), "MESSAGE": storm_line(rec)})
    elif kind == "ready":
        fields.update({"PRIORITY": str(INFO), "MESSAGE": (
            f"tcpcollide-trace {rec['version']} ready in {rec['startup_s']:.2f} s on {rec['kernel']}: backend "
            f"{rec['backend']}")})
    elif kind == "summary":
        fields.update({"PRIORITY": str(INFO), "MESSAGE": (
            f"summary: {rec['collisions']} collision(s) reported, {rec['events']} event(s), {rec['lost_events']} "
            f"lost; stopped by {rec['stopped_by']}")})
    else:
        fields.update({"PRIORITY": str(NOTICE), "MESSAGE": f"{kind} record"})
    fields["TCPCOLLIDE_JSON"] = json.dumps(rec, separators=(",", ":"))
    return fields


class JournalWriter:
    """Records to the journal, one entry each (the writer interface of
    tracer/output/render.py). An entry the journal does not take (journald
    gone, a full socket buffer) is counted in `failed`, never retried."""

    def __init__(self, path: str | None = None):
        """OSError when there is no journal to write to (journald not running)."""
        self.path = path or os.environ.get("TCPCOLLIDE_JOURNAL_SOCKET") or JOURNAL_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"no systemd journal at {self.path}: {e.strerror}") from None
        self.sent = self.failed = 0

    def write(self, rec: dict) -> None:
        try:
            self.sock.send(entry(journal_fields(rec)))
            self.sent += 1
        except OSError:
            self.failed += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()
