"""Live fault tests (real BPF programs, real sockets in namespaces the tracer
or the test makes): the tracer on a host in trouble."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.live import (BACKEND, BIN, REPO, SLOW, STATE_HOOK, bpf_alive, bpf_objects, left_attached, read_steps,
                        require_live, scenario)
from tests.live import free_port, ns_name, scrape
from tracer.host import netns
from tracer.output import stream

pytestmark = pytest.mark.live


@pytest.fixture(autouse=True)
def _live():
    require_live()




def collisions_scraped(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("tcpcollide_collisions_total{"))


def start_tracer(*args: str, nofile: int | None = None) -> tuple[subprocess.Popen, dict]:
    """`trace --json ARGS` whose standard output the test reads itself, or
    stops reading: (process, its ready record). nofile: its RLIMIT_NOFILE."""
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    proc = subprocess.Popen([str(BIN), "trace", "--json", "--backend", BACKEND, "--state-hook", STATE_HOOK, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, preexec_fn=limit)
    line = proc.stdout.readline()
    try:
        ready = json.loads(line)
    except ValueError:
        proc.kill()
        raise AssertionError(f"no ready record: {line!r} {proc.stderr.read()!r}") from None
    assert ready["type"] == "ready", ready
    return proc, ready


def storm(ns: str, collisions: int, server_port: int, base: int, *extra: str) -> dict:
    """scripts/storm.py: each of `collisions` client ports collides once; its `done` line."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns, "--ports", str(collisions), "--count",
         str(collisions), "--duration", "0", "--server-port", str(server_port), "--client-port-base", str(base),
         "--keep-dead", "30", "--hang-up-last", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=120 * SLOW)
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["type"] == "done", proc.stdout[-2000:]
    return done


def test_a_full_disk_under_record_stops_the_recording_not_the_tracing(tmp_path):
    """--record on a tmpfs of 64 KiB the test fills to one page (4 KiB) from full: the header fits, the rest of the demo's 4.7 KiB does not:
    the demo's collision is still reported, one error line says the
    recording stopped and where, the summary says so, and the file replays
    up to there without a traceback."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 4096))
        rec = disk / "run.rec"
        r = subprocess.run([str(BIN), "demo", "--json", "--record", str(rec)], capture_output=True, text=True,
                           timeout=120 * SLOW)
        records = [json.loads(x) for x in r.stdout.splitlines()]
        errors = [x for x in r.stderr.splitlines() if x.startswith("tcpcollide-trace:")]
        size = rec.stat().st_size
        replayed = subprocess.run([str(BIN), "replay", "--json", str(rec)], capture_output=True, text=True,
                                  timeout=60 * SLOW)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert [x["type"] for x in records if x["type"] == "collision"] == ["collision"]
    assert len(errors) == 1 and "the recording" in errors[0] and "No space left on device" in errors[0], errors
    summary = records[-1]
    assert summary["type"] == "summary"
    assert summary["recording"]["stopped"] == "No space left on device"
    assert summary["recording"]["stopped_at_bytes"] == size
    assert "Traceback" not in replayed.stderr
    assert replayed.returncode in (0, 1)
    if replayed.returncode == 1:  # cut inside a frame: one line that says so
        assert len(replayed.stderr.strip().splitlines()) == 1 and "replayed" in replayed.stderr


def test_a_reader_that_goes_away_ends_the_tracer_cleanly_with_nothing_left_attached(ns):
    """`| head -1`: the tracer's next write meets a closed pipe (EPIPE). It
    stops as after a signal (exit 0, nothing on stderr, no summary: nobody
    reads it), and every BPF program, map and link it held is gone. The
    demo, piped into head as the README shows it, does the same."""
    proc, _ready = start_tracer("--netns", str(ns.inode))
    try:
        held = bpf_objects(proc.pid)
        assert held["prog"] and held["map"], held
        proc.stdout.close()  # the reader goes away
        sc = scenario("--server-ns", ns.name, "--fast", "--hold", "3")
        read_steps(sc, until="connected")  # a collision: the tracer has something to write
        rc = proc.wait(timeout=20 * SLOW)
        err = proc.stderr.read().decode()
        sc.kill()
        sc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    assert err == "", err
    assert left_attached(held) == {}

    r = subprocess.run(f"'{BIN}' demo --json | head -1", shell=True, capture_output=True, text=True,
                       timeout=60 * SLOW, executable="/bin/bash")
    assert json.loads(r.stdout)["type"] == "ready"
    assert "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
    r = subprocess.run(f"'{BIN}' demo --json | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}", shell=True,
                       capture_output=True, text=True, timeout=60 * SLOW, executable="/bin/bash")
    assert r.stdout.strip() == "0", r


STALLED_COLLISIONS = 800  # some 8.5 KB of records each with -v --all-events: past stream.BACKLOG


def test_a_reader_that_stops_reading_does_not_stop_the_tracing(ns):
    """The reader takes the ready record, then stops reading while
    STALLED_COLLISIONS collisions are made (-v --all-events: some 6.8 MB of
    records, beyond the pipe's 64 KiB and the tracer's own backlog). The
    tracing goes on: the metrics count every collision while nobody reads,
    and the kernel's map of collisions in progress empties. One warning line
    says records are being dropped; once the reader reads again it gets
    whole JSON lines, and the summary counts what was dropped, so that what
    was read plus what was dropped is everything."""
    port = free_port()
    proc, ready = start_tracer("--netns", str(ns.inode), "-v", "--all-events", "--metrics", f"127.0.0.1:{port}")
    try:
        held = bpf_objects(proc.pid)
        done = storm(ns.name, STALLED_COLLISIONS, 17801, 21000)
        assert done["collisions"] == STALLED_COLLISIONS, done
        wait_scraped(port, STALLED_COLLISIONS)
        # more, once the backlog is full for sure: their records are dropped
        done = storm(ns.name, 20, 17802, 31000)
        assert done["collisions"] == 20, done
        wait_scraped(port, STALLED_COLLISIONS + 20)
        tracked_id = next(i for i in held["map"] if _map_name(i) == "tracked")
        assert untracked_within(tracked_id, {17801, 17802}, 12 * SLOW)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30 * SLOW)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    err_lines = err.decode().splitlines()
    assert len(err_lines) == 1 and "standard output is not being read" in err_lines[0], err_lines
    records = [json.loads(x) for x in out.decode().splitlines()]  # every line whole
    summary = records[-1]
    assert summary["type"] == "summary", records[-1]
    assert summary["collisions"] == STALLED_COLLISIONS + 20
    kinds = [r["type"] for r in records[:-1]]
    read = kinds.count("collision") + kinds.count("event")
    dropped = summary["output_dropped"]
    assert dropped["records"] > 0 and dropped["bytes"] > 0, dropped
    assert kinds.count("collision") < STALLED_COLLISIONS + 20
    # what was read and what was dropped add up to every collision and event (and the odd storm/queue record)
    everything = summary["collisions"] + summary["events"]
    assert everything <= read + dropped["records"] <= everything + len(kinds) - read + 50, (read, dropped, everything)
    assert left_attached(held) == {}


def wait_scraped(port: int, collisions: int) -> None:
    """The metrics count `collisions` reported within 30 s."""
    deadline = time.monotonic() + 30 * SLOW
    seen = 0.0
    while time.monotonic() < deadline:
        seen = collisions_scraped(scrape(port))
        if seen >= collisions:
            break
        time.sleep(0.5)
    assert seen == collisions, f"{seen} collisions reported (of {collisions}) while the reader did not read"


def _map_name(map_id: int) -> str:
    out = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)], capture_output=True, text=True)
    return json.loads(out.stdout or "{}").get("name", "")


def map_dump(map_id: int) -> list:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout or "[]")


def untracked_within(map_id: int, server_ports: set[int], seconds: float) -> bool:
    """The tracer's map `tracked` (collisions in progress, read with bpftool)
    holds no entry of the test's collisions (server ports `server_ports`: the
    kernel side tracks every collision of the host, and other tests may run)
    within `seconds`: the incidents ended untracked their tuples, and the
    sweep (tracer/kernel/tracking.py: every 5 s, entries 5 s old with no
    incident open) took whatever else was left."""
    deadline = time.monotonic() + seconds
    first = None
    while True:
        entries = [e for e in map_dump(map_id) if e["formatted"]["key"]["sport"] in server_ports]
        if not entries:
            if first is not None:
                print(f"tracked: {len(first)} entries left at first, swept since: {json.dumps(first)[:600]}")
            return True
        first = first or entries
        if time.monotonic() > deadline:
            print(f"tracked: {len(entries)} entries: {json.dumps(entries)[:2000]}")
            return False
        time.sleep(0.5)


class Lines:
    """A tracer's JSON lines as they arrive, each with its arrival time."""

    def __init__(self, proc: subprocess.Popen):
        self.got: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc) -> None:
        for line in proc.stdout:
            with self._cond:
                self.got.append((time.monotonic(), json.loads(line)))
                self._cond.notify_all()

    def wait(self, pred, timeout: float) -> tuple[float, dict] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((x for x in self.got if pred(x[1])), None)
                if hit is not None or time.monotonic() > deadline:
                    return hit
                self._cond.wait(max(0.01, deadline - time.monotonic()))


def collide(ns, lines: Lines, server_port: int) -> float:
    """One collision (the seed's scenario, fast) on `server_port`: seconds
    from the client's connect() returning to the tracer's report of it."""
    sc = scenario("--server-ns", ns.name, "--fast", "--hold", "4", "--server-port", str(server_port))
    try:
        steps = read_steps(sc, until="connected")
        connected = time.monotonic()
        assert steps[-1]["step"] == "connected", steps
        hit = lines.wait(lambda r: r["type"] == "collision" and r["server"].endswith(f":{server_port}"), 20 * SLOW)
        assert hit is not None, f"no report of the collision on port {server_port}"
        return hit[0] - connected
    finally:
        sc.kill()
        sc.wait()


HELD_OPEN = 1100  # connections a hostile client holds open without sending: past the common 1024 descriptors
NOFILE = 1024  # the tracer's RLIMIT_NOFILE in this test: the usual default


def test_a_hostile_client_on_the_metrics_port_neither_delays_tracing_nor_stops_the_metrics(ns):
    """A tracer with the usual 1024 descriptors serves --metrics; a hostile
    client floods scrapes from four threads and sends garbage (binary, a
    TLS hello, a 1 MB header, a request cut off) while a collision is made,
    then holds HELD_OPEN connections open without sending while another is
    made. Each report comes no later than a quiet collision's (baseline) plus a second and is
    as complete (the listener's queue and owner: the tracer's descriptors
    are not the client's to take), nothing is written on stderr, and once
    the client stops a normal scrape works and counts the three collisions,
    and what was turned away."""
    port = free_port()
    proc, _ = start_tracer("--netns", str(ns.inode), "--metrics", f"127.0.0.1:{port}", nofile=NOFILE)
    lines = Lines(proc)
    held: list[socket.socket] = []
    stop = threading.Event()
    flood = {"ok": 0, "failed": 0}

    def scrapes():
        while not stop.is_set():
            try:
                scrape(port, timeout=5)
                flood["ok"] += 1
            except OSError:
                flood["failed"] += 1

    try:
        assert collisions_scraped(scrape(port)) == 0
        quiet = collide(ns, lines, 17811)
        threads = [threading.Thread(target=scrapes, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for junk in (os.urandom(4096), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500),
                     b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n", b"GET /metr",
                     b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc", b"\r\n" * 10000):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as g:
                g.sendall(junk)
        flooded = collide(ns, lines, 17812)
        stop.set()
        for t in threads:
            t.join(10)
        for _ in range(HELD_OPEN):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            held.append(c)
        time.sleep(1)
        hostile = collide(ns, lines, 17813)
        for c in held:
            c.close()
        held.clear()
        time.sleep(0.5)
        after = scrape(port)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20 * SLOW)
        err = proc.stderr.read().decode()
    finally:
        stop.set()
        for c in held:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"report after connect: quiet {quiet:.3f} s, scrape flood {flooded:.3f} s, held open {hostile:.3f} s; "
          f"flood {flood}")
    reports = [r for _, r in lines.got if r["type"] == "collision"]
    assert len(reports) == 3
    # as complete as the quiet one: the listener's queue (sock_diag) and its owner (/proc) were read
    # (with the tracer's descriptors taken by the held connections, neither could be)
    for r in reports:
        assert r["listener"] is not None and r["listener"]["owners"], json.dumps(r)[:2000]
        assert r["listener"]["ghosts"] == 1 and not r["incomplete"]
    assert flooded <= quiet + 1.0 and hostile <= quiet + 1.0, (quiet, flooded, hostile)
    assert flood["ok"] > 0, flood
    assert collisions_scraped(after) == 3
    assert after["tcpcollide_metrics_connections_refused_total"] > 0
    assert rc == 0 and err == "", err


def held_anywhere() -> set[int]:
    """The BPF programs some live process holds (a program descriptor, or a link's)."""
    held = set()
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                held.add(int(line.split(":")[1]))
    return held


def orphans(since: int) -> set[int]:
    """BPF programs loaded after id `since` that are still in the kernel with
    no process holding them: attached by a tracer that is gone. (Other
    tracers may run meanwhile: theirs are held.) Freeing is asynchronous:
    asked again for up to 2 s."""
    deadline = time.monotonic() + 2
    while True:
        alive = {i for i in bpf_alive()["prog"] if i > since}
        left = alive - held_anywhere()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def btf_lacking(field: str, path: Path) -> Path:
    """The running kernel's BTF with member `field` renamed (one letter: the
    blob stays valid, the field is not there)."""
    raw = Path("/sys/kernel/btf/vmlinux").read_bytes()
    name = b"\0" + field.encode() + b"\0"
    assert raw.count(name) == 1, field
    path.write_bytes(raw.replace(name, b"\0" + field[:-1].encode() + b"X\0"))
    return path


def test_a_kernel_facility_failing_in_the_middle_of_start_up_is_one_line_exit_1_and_nothing_left_attached(ns, tmp_path):
    """Start-up fails at every one of its steps in turn, for real: the
    tracer runs with 5, 6, 7 ... file descriptors (RLIMIT_NOFILE), so that the
    next descriptor it needs, for the compiler's headers, a map, a program,
    a raw tracepoint attached after others were, the self-test, the perf
    buffer, is refused, until it has enough to become ready. Each failed
    start is one error line (no traceback) and exit status 1, and no
    program it loaded stays in the kernel. Then BTF that lacks a field the
    programs read (--btf): one line naming it, exit 1."""
    since = max(bpf_alive()["prog"], default=0)
    failures: dict[int, str] = {}
    ready_at = None
    for nofile in range(5, 80):
        r = subprocess.run([str(BIN), "trace", "--json", "--backend", BACKEND, "--netns", str(ns.inode),
                            "--duration", "0.2"], capture_output=True, text=True, timeout=60 * SLOW,
                           preexec_fn=lambda n=nofile: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
        if r.returncode == 0:
            assert json.loads(r.stdout.splitlines()[-1])["type"] == "summary", r.stdout[-500:]
            ready_at = nofile
            break
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("tcpcollide-trace: error: "), (
            nofile, r.returncode, r.stderr[-3000:])
        failures[nofile] = lines[0]
    print("\n".join(f"{n:3}: {m}" for n, m in failures.items()))
    assert ready_at is not None, "never ready"
    said = " ".join(failures.values())
    # start-up failed at each kind of step, attaching a hook after others were attached among them
    for step in ("could not open bpf map", "Failed to load BPF program", "Failed to attach BPF to raw tracepoint",
                 "self-test"):
        assert step in said, step
    assert orphans(since) == set()

    btf = btf_lacking("tw_last_oow_ack_time", tmp_path / "vmlinux.btf")
    r = subprocess.run([str(BIN), "trace", "--json", "--btf", str(btf), "--netns", str(ns.inode), "--duration", "1"],
                       capture_output=True, text=True, timeout=60 * SLOW)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.startswith("tcpcollide-trace: error: this kernel's BTF lacks what the tracer reads") and (
        "tw_last_oow_ack_time" in r.stderr) and len(r.stderr.splitlines()) == 1, r.stderr
    assert orphans(since) == set()


def nft(ns, *rules: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input="\n".join(rules) + "\n", text=True,
                       capture_output=True)
    assert r.returncode == 0, r.stderr


def exited(pid: int, seconds: float) -> bool:
    """Whether the process exited (gone, or a zombie: its files closed) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def tracked_map(pid: int) -> int:
    return next(i for i in bpf_objects(pid)["map"] if _map_name(i) == "tracked")


@pytest.mark.parametrize("fault", ["the leaking process exits", "the network namespace is deleted"])
def test_an_incident_cut_short_by_its_host_ends_with_what_was_seen_and_leaves_nothing_tracked(fault):
    """A collision whose client's RSTs are dropped (nftables), so that it
    stays in progress (every retried SYN meets the lingering socket again),
    and then, half a second in, either the leaking server process is killed,
    or every process of the namespace is and the namespace is deleted. The
    incident ends with what was seen up to there (the SYN, the challenge ACK,
    the RST, the lingering socket closed by the exit), one report and no
    exception (the client's later SYNs, meeting the socket again, are
    repeats); the tracer goes on (it is asked to stop afterwards, exit 0),
    and once the client is gone its map of collisions in progress (bpftool,
    while it runs) holds no entry of the tuple."""
    port, cport = 17821, 41821
    n = netns.NetNS(ns_name("cut")).__enter__()
    try:
        nft(n, "table inet tct", "add chain inet tct out { type filter hook output priority 0; }",
            f"add rule inet tct out tcp dport {port} tcp flags & (syn | ack | rst | fin) == rst drop")
        proc, _ = start_tracer("--netns", str(n.inode), "--incident-timeout", "3")
        lines = Lines(proc)
        tracked = tracked_map(proc.pid)
        sc = scenario("--server-ns", n.name, "--fast", "--accept", "--server-comm", "leakysrv", "--wait-stdin",
                      "--connect-timeout", "6", "--hold", "0", "--server-port", str(port), "--client-port", str(cport),
                      stdin=subprocess.PIPE)
        steps = read_steps(sc, until="waiting")
        server_pid = next(x for x in steps if x["step"] == "accepted")["pid"]
        sc.stdin.write("go\n")
        sc.stdin.flush()
        time.sleep(0.5)
        os.kill(server_pid, signal.SIGKILL)
        # its exit closes the socket (CLOSE_WAIT -> LAST_ACK) before anything else happens: on a loaded
        # machine the client, killed next, could otherwise close first and end the incident
        assert exited(server_pid, 10 * SLOW), "the server process did not exit"
        if fault == "the network namespace is deleted":
            sc.kill()
            sc.wait()
            n.delete()
        hit = lines.wait(lambda r: r["type"] == "collision", 15 * SLOW)
        sc.wait(timeout=20 * SLOW)  # the client gave up (its connect timeout) or was killed: no SYN comes again
        assert untracked_within(tracked, {port}, 12 * SLOW)
        assert proc.poll() is None, "the tracer stopped"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20 * SLOW)
        err = proc.stderr.read().decode()
    finally:
        with contextlib.suppress(Exception):
            sc.kill()
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            n.delete()
    assert rc == 0 and err == "", err
    assert hit is not None, "no report"
    rec = hit[1]
    print(json.dumps({k: rec[k] for k in ("outcome", "outcome_detail", "ended_by", "incomplete_reasons")}))
    reports = [r for _, r in lines.got if r["type"] == "collision"]
    print(json.dumps([{k: r.get(k) for k in ("id", "outcome", "ended_by", "repeat_of", "client")} for r in reports]))
    # the client's SYN retried after the first incident ended by the timeout meets the socket again: a repeat
    assert all(r["client"].endswith(f":{cport}") for r in reports)
    assert all(r["repeat_of"] is not None for r in reports[1:]), reports
    seen = [x["step"] for x in rec["steps"]]
    assert seen[:3] == ["syn", "challenge_ack", "rst"] and "server_closed" in seen, seen
    assert rec["outcome"] != "recovered" and not any(x["step"] == "established" for x in rec["steps"])
    assert "Meanwhile the server application closed the old socket" in rec["explanation"]
    assert rec["closewait_socket"]["owners"][0]["comm"] == "leakysrv"  # named before it exited


def test_more_collisions_at_once_than_the_kernel_tracks_are_counted_marked_and_not_kept(ns, monkeypatch):
    """A burst of 300 collisions at once (scripts/storm.py --burst) against a
    tracer whose kernel-side tracking holds 64 (TCPCOLLIDE_TRACK_MAP_SIZE):
    the full LRU map evicts entries of collisions still in progress. The
    evictions are counted (kernel.tracked_evicted, exactly what the programs
    added less what user space deleted and what is left), every incident
    whose entry went is marked incomplete (tracking_evicted), none is
    reported wrong, the kernel still counts every collision, and once the
    incidents ended the map holds nothing of them."""
    port, n = 17841, 300
    monkeypatch.setenv("TCPCOLLIDE_TRACK_MAP_SIZE", "64")
    proc, ready = start_tracer("--netns", str(ns.inode), "--incident-timeout", "3")
    lines = Lines(proc)
    try:
        tracked = tracked_map(proc.pid)
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns.name, "--burst", str(n), "--server-port",
             str(port), "--client-port-base", "21000", "--keep-dead", "30"],
            capture_output=True, text=True, cwd=REPO, timeout=180 * SLOW)
        assert done.returncode == 0, done.stderr
        made = json.loads(done.stdout.splitlines()[-1])
        # the incidents end (reported, or by the 3 s timeout), and nothing of them stays tracked
        assert untracked_within(tracked, {port}, 20 * SLOW)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30 * SLOW)
        err = proc.stderr.read().decode()
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0 and err == "", err
    assert made["collisions"] == n, {k: v for k, v in made.items() if k != "per_port"}
    records = [r for _, r in lines.got]
    summary = records[-1]
    kernel = summary["kernel"]
    cols = [r for r in records if r["type"] == "collision"]
    evicted = [r for r in cols if "tracking_evicted" in r["incomplete_reasons"]]
    print(f"{len(cols)} reported, {len(evicted)} marked evicted; kernel: "
          f"{ {k: v for k, v in kernel.items() if k != 'by_server'} }")
    assert kernel["collisions"] >= n  # a collision evicted and hit again counts again
    assert kernel["tracked_evicted"] > 0 and kernel["tracked_added"] >= n
    # an entry evicted after its incident's last event, before the incident ended, cost nothing: not marked
    assert 0 < len(evicted) <= kernel["tracked_evicted"]
    wrong = [r for r in cols if not r["incomplete"] and not (r["outcome"] == "recovered" and {
        "syn", "rst", "closewait_closed", "established"} <= {s["step"] for s in r["steps"]})]
    assert not wrong, json.dumps(wrong[:2])[:3000]
    assert all(r["incomplete_reasons"] for r in cols if r["incomplete"])
    storms = [r for r in records if r["type"] == "storm" and "tracked_evicted" in r["lost"]]
    assert storms, "the evictions were not said when they happened (a storm record)"


def test_a_tracer_stopped_through_a_storm_says_what_it_lost_and_completes_what_the_kernel_still_knows(ns):
    """The tracer is stopped (SIGSTOP) for 5 s while 6,000 collisions happen
    at once, far more than its perf buffer holds, and the generator keeps
    every socket open afterwards (a leaking server lives on). Continued, the
    tracer says the loss as it happened (a `storm` record with when, what,
    and the kernel's true counts), marks every incident the loss may have
    touched incomplete, reports none wrong, and completes from the kernel's
    socket list (sock_diag) every incident whose establishment the loss hid:
    almost none is left `pending` (before: all of them). Tracing then goes
    on: collisions made after it are all reported."""
    port, n, m = 17851, 6000, 20
    proc, _ = start_tracer("--netns", str(ns.inode), "--incident-timeout", "3")
    lines = Lines(proc)
    gen = None
    try:
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            gen = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "storm.py"), "--ns", ns.name, "--ports", str(n), "--count",
                 str(n), "--duration", "0", "--server-port", str(port), "--client-port-base", "22000",
                 "--keep-dead", "120", "--hold", "120"], stdout=subprocess.PIPE, text=True, cwd=REPO)
            done = next(json.loads(x) for x in gen.stdout if '"done"' in x)
            time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))
        finally:
            proc.send_signal(signal.SIGCONT)
        # it drains what its buffer kept (until its records stop coming): collisions made before that
        # would find the buffer still full, and be counted, not reported
        seen = -1
        while len(lines.got) != seen:
            seen = len(lines.got)
            time.sleep(2 * SLOW)
        after = storm(ns.name, m, port + 1, 30000)
        deadline = time.monotonic() + 30 * SLOW
        while time.monotonic() < deadline:
            if sum(1 for _, r in lines.got if r["type"] == "collision" and r["server"].endswith(f":{port + 1}")) >= m:
                break
            time.sleep(0.5)
        time.sleep(5)  # past the incident timeout and a sweep: what is open has ended
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60 * SLOW)
        err = proc.stderr.read().decode()
    finally:
        if gen is not None:
            gen.kill()
            gen.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0 and "Traceback" not in err, err
    assert done["collisions"] == n and after["collisions"] == m
    records = [r for _, r in lines.got]
    summary = records[-1]
    assert summary["type"] == "summary"
    assert summary["lost_events"] > 0, "no overflow: make the storm bigger"
    cols = [r for r in records if r["type"] == "collision"]
    storm_cols = [r for r in cols if r["server"] == f"127.0.0.1:{port}"]
    after_cols = [r for r in cols if r["server"] == f"127.0.0.1:{port + 1}"]
    confirmed = [r for r in storm_cols if any(s["step"] == "established" and s.get("seen_by") == "sock_diag"
                                              for s in r["steps"])]
    print(f"stopped 5 s: {summary['events']} events, {summary['lost_events']} lost; {len(storm_cols)} of {n} "
          f"reported, {len(confirmed)} established found in the socket list; "
          f"{collections.Counter((r['outcome'], r['outcome_detail']) for r in storm_cols)}")
    # said as it happened: when, what, and the kernel's count beside what was reported
    storms = [r for r in records if r["type"] == "storm"]
    assert storms and all(r["time"] and r["since"] and r["kernel"]["collisions"] for r in storms), storms[:2]
    # none wrong; every incomplete one says why; none pending while the kernel could tell
    wrong = [r for r in storm_cols + after_cols if not r["incomplete"] and not (
        r["outcome"] == "recovered" and {"syn", "rst", "closewait_closed", "established"} <= {
            s["step"] for s in r["steps"]})]
    assert not wrong, json.dumps(wrong[:2])[:3000]
    assert all(r["incomplete_reasons"] for r in cols if r["incomplete"])
    assert confirmed and all(r["incomplete"] and r["outcome_detail"] == "recovered_unseen" for r in confirmed)
    # pending only where the socket list did not show the new connection either (seen: 1 in 3,000,
    # its tuple still held by a socket in CLOSE_WAIT when asked), and then incomplete, saying why
    pending = [r for r in storm_cols if r["outcome"] == "pending"]
    assert len(pending) <= len(storm_cols) // 100 and all(r["incomplete"] for r in pending), json.dumps(pending[:2])[:3000]
    # tracing went on: every collision made afterwards is reported
    assert sorted(int(r["client"].rsplit(":", 1)[1]) for r in after_cols) == sorted(int(p) for p in after["per_port"])
    kernel = summary["kernel"]
    assert kernel["collisions"] == n + m and kernel["unreported"] == n + m - kernel["reported"], kernel
