"""Unit tests of the systemd side (tracer/output/systemd.py) without root or
BPF: the readiness protocol on a datagram socket the test binds, as systemd
would; journal entries in the native protocol, read back by a parser of the
test's own; the unit file checked by systemd-analyze."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
from types import SimpleNamespace

import pytest

from tests.live import BIN
from tracer.output import systemd
from tracer.resources import service_unit


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's native protocol: `KEY=value\\n`, or `KEY\\n` + u64 LE length + value + `\\n`."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
        fields[key.decode()] = value.decode()
    return fields


def collision(**change) -> dict:
    rec = {"type": "collision", "view": "server", "server": "10.0.0.1:8080", "client": "10.0.0.2:40000",
           "lingering_state": "CLOSE_WAIT", "outcome": "recovered", "outcome_detail": "recovered_fast",
           "penalty_ms": 12.5, "netns": 4026531840, "incomplete": False,
           "closewait_socket": {"inode": 4242, "owners": [{"pid": 42, "comm": "leakysrv", "fd": 7, "workload": None}]},
           "listener": None}
    rec.update(change)
    return rec


def test_a_collision_is_an_entry_with_its_fields_and_the_whole_record():
    fields = parse_entry(systemd.entry(systemd.journal_fields(collision())))
    assert fields["SYSLOG_IDENTIFIER"] == "tcpcollide-trace" and fields["PRIORITY"] == "4"
    assert fields["TCPCOLLIDE_TYPE"] == "collision" and fields["TCPCOLLIDE_OUTCOME"] == "recovered"
    assert fields["TCPCOLLIDE_SERVER"] == "10.0.0.1:8080" and fields["TCPCOLLIDE_CLIENT"] == "10.0.0.2:40000"
    assert fields["TCPCOLLIDE_PENALTY_MS"] == "12.5" and fields["TCPCOLLIDE_CULPRIT"] == "leakysrv (pid 42)"
    assert json.loads(fields["TCPCOLLIDE_JSON"]) == collision()
    assert fields["MESSAGE"].startswith("collision: 10.0.0.2:40000 -> 10.0.0.1:8080 hit a socket in CLOSE_WAIT")


def test_untrusted_text_cannot_make_a_field_of_its_own():
    """A process name with a newline and a field of its own stays one value."""
    evil = "x\nTCPCOLLIDE_OUTCOME=stuck\nPRIORITY=0"
    rec = collision(closewait_socket={"inode": 4242, "owners": [{"pid": 42, "comm": evil, "fd": 7, "workload": None}]})
    fields = parse_entry(systemd.entry(systemd.journal_fields(rec)))
    assert fields["TCPCOLLIDE_OUTCOME"] == "recovered" and fields["PRIORITY"] == "4"
    assert evil in fields["TCPCOLLIDE_CULPRIT"]


@pytest.fixture
def manager(tmp_path):
    """A datagram socket where systemd would listen ($NOTIFY_SOCKET)."""
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    yield s, str(path)
    s.close()


def session(collisions=0, lost=0):
    return SimpleNamespace(backend="tracepoint", pipeline=SimpleNamespace(
        summary=SimpleNamespace(collisions=collisions), correlator=SimpleNamespace(lost_events=lost)))


def test_ready_status_watchdog_and_stopping(manager, monkeypatch):
    s, path = manager
    n = systemd.Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_s == 1.0
    n.ready(session())
    ready = s.recv(4096).decode().split("\n")
    assert "READY=1" in ready and "STATUS=tracing (tracepoint backend): 0 collision(s) reported, 0 event(s) lost" in ready
    n.tick(session(collisions=3))  # the watchdog is due at once; the status only after STATUS_EVERY_S
    assert s.recv(4096) == b"WATCHDOG=1"
    monkeypatch.setattr(systemd, "STATUS_EVERY_S", 0.0)
    n._watchdog_at = float("inf")
    n.tick(session(collisions=3))
    assert s.recv(4096).decode() == "STATUS=tracing (tracepoint backend): 3 collision(s) reported, 0 event(s) lost"
    n.tick(session(collisions=3))  # unchanged: not sent again
    with pytest.raises(socket.timeout):
        s.recv(4096)
    n.stopping()
    assert s.recv(4096).startswith(b"STOPPING=1")


def test_abstract_notify_socket():
    name = f"tct-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    systemd.Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
    assert s.recv(64) == b"READY=1"
    s.close()


def test_no_manager_no_messages_and_no_watchdog_for_another_pid():
    n = systemd.Notifier({})
    assert not n.active and not n.notify("READY=1")
    assert systemd.Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_journal_stream_names_stdout(tmp_path, monkeypatch):
    f = open(tmp_path / "out", "w")  # noqa: SIM115
    st = os.fstat(f.fileno())
    monkeypatch.setattr(systemd.sys, "stdout", f)
    assert systemd.journal_is_stdout({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not systemd.journal_is_stdout({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not systemd.journal_is_stdout({})
    f.close()


def test_no_journal_is_an_error_at_start(tmp_path):
    with pytest.raises(OSError, match="no systemd journal at"):
        systemd.JournalWriter(str(tmp_path / "nothing"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_file_verifies(tmp_path):
    """systemd-analyze verify, with ExecStart pointing at this checkout's command
    (it checks the program exists); a unit it warns about fails."""
    unit = tmp_path / "tcpcollide-trace.service"
    text = service_unit().read_text()
    assert "ExecStart=/usr/bin/tcpcollide-trace trace" in text and "Type=notify" in text
    unit.write_text(text.replace("/usr/bin/tcpcollide-trace", str(BIN)))
    # (its manual page is checked where it is installed: scripts/test-deb verifies the installed unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr


def test_the_unit_bounds_the_capabilities_to_the_measured_set():
    from tracer.kernel.capabilities import CAPABILITIES

    line = next(x for x in service_unit().read_text().splitlines() if x.startswith("CapabilityBoundingSet="))
    assert set(line.split("=", 1)[1].split()) == set(CAPABILITIES)


def test_missing_capabilities_name_what_they_cost():
    from tracer.kernel import capabilities

    status = "CapEff:\t%016x\n" % ((1 << 21) | (1 << 12))  # CAP_SYS_ADMIN, CAP_NET_ADMIN
    have = capabilities.effective_capabilities(status)
    assert have == {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}
    missing = {m["capability"]: m for m in capabilities.missing_capabilities(have)}
    assert set(missing) == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}  # CAP_SYS_ADMIN stands in for BPF, PERFMON
    assert not any(m["fatal"] for m in missing.values()) and "cannot be named" in missing["CAP_SYS_PTRACE"]["cost"]
    fatal = {m["capability"] for m in capabilities.missing_capabilities({"CAP_BPF", "CAP_PERFMON"}) if m["fatal"]}
    assert fatal == {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}
