"""Live tests of workloads (real BPF programs, real sockets in namespaces the
tests make): the culprit named by its systemd unit or Kubernetes pod, with
cgroup paths made exactly as systemd and the kubelet (both cgroup drivers)
lay them out, beneath this test's own v2 cgroup (as on a node that itself
runs in a container), and the kubelet's /var/log/pods and
/var/log/containers entries; and the --unit, --pod and --container filters:
the collision inside is reported, one in another namespace is not (the
kernel never passes its events), and one in the same namespace whose
processes are another workload's is not either, and is counted."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.live import BIN, SLOW, Tracer, ns_name, read_steps, scenario
from tracer.host import netns

pytestmark = pytest.mark.live

UID = "6a1c3f0e-2b4d-4e8f-9a7b-1c2d3e4f5a6b"
CID = "c0ffee" + "2" * 58
POD = {"namespace": "shop", "name": "cart-7d9f", "uid": UID, "container": "app"}
# shape -> (cgroup components beneath the test's own, the filter, the owner's workload)
SHAPES = {
    "unit": (["system.slice", "leaky.service"], ("--unit", "leaky"),
             {"unit": "leaky.service", "container": None, "pod": None}),
    "pod-cgroupfs": (["kubepods", "besteffort", f"pod{UID}", CID], ("--pod", "shop/cart-7d9f"),
                     {"unit": None, "container": {"runtime": "cri", "id": CID, "name": None}, "pod": POD}),
    "pod-systemd": (["kubepods.slice", "kubepods-besteffort.slice",
                     f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice", f"cri-containerd-{CID}.scope"],
                    ("--container", CID[:12]),
                    {"unit": None, "container": {"runtime": "containerd", "id": CID, "name": None}, "pod": POD}),
}


def v2_cgroup() -> Path | None:
    """This process's cgroup directory in the v2 hierarchy (pure v2 or the
    hybrid's unified tree), or None."""
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")), None)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if own is not None and fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4]) / own.lstrip("/")
    return None


@contextlib.contextmanager
def cgroup_shape(components: list[str]):
    """The cgroup directories, made beneath this test's own; yields the
    innermost; removed afterwards (innermost first)."""
    base = v2_cgroup()
    if base is None:
        pytest.skip("no cgroup v2 hierarchy")
    dirs = []
    for c in components:
        dirs.append((dirs[-1] if dirs else base) / c)
    try:
        for d in dirs:
            d.mkdir()
        yield dirs[-1]
    finally:
        for d in reversed(dirs):
            for _ in range(50):  # a process moved there leaves it as it exits
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def kubelet_logs():
    """/var/log/pods/<namespace>_<pod>_<uid>/<container>/ and
    /var/log/containers/<pod>_<namespace>_<container>-<id>.log, removed afterwards."""
    pods, containers = Path("/var/log/pods"), Path("/var/log/containers")
    made = [p for p in (pods, containers) if not p.exists()]
    pod_dir = pods / f"{POD['namespace']}_{POD['name']}_{UID}"
    log = containers / f"{POD['name']}_{POD['namespace']}_{POD['container']}-{CID}.log"
    try:
        (pod_dir / POD["container"]).mkdir(parents=True)
        containers.mkdir(exist_ok=True)
        log.write_text("")
        yield
    finally:
        log.unlink(missing_ok=True)
        for d in (pod_dir / POD["container"], pod_dir, *made):
            with contextlib.suppress(OSError):
                d.rmdir()


def leaky(ns_name_: str, port: int, client_port: int, comm: str) -> tuple[subprocess.Popen, int]:
    """A collision scenario paused before its reconnect; returns it and its
    leaking server's pid."""
    proc = scenario("--server-ns", ns_name_, "--fast", "--accept", "--server-comm", comm, "--server-port", str(port),
                    "--client-port", str(client_port), "--wait-stdin", "--hold", "0.5", stdin=subprocess.PIPE)
    steps = read_steps(proc, until="waiting")
    return proc, next(s for s in steps if s["step"] == "listen")["server_pid"]


def settle_and_stop(tracer: Tracer) -> tuple[int, list[dict], str]:
    time.sleep(1.0)  # the last reports
    return tracer.stop()


def kill_all(procs: list[subprocess.Popen], tracer: Tracer | None) -> None:
    for p in procs:
        p.kill()
        p.wait()
    if tracer is not None:
        tracer.kill()


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    read_steps(proc)
    assert proc.wait(timeout=30 * SLOW) == 0


@pytest.mark.parametrize("shape", [pytest.param("unit", marks=pytest.mark.matrix), "pod-cgroupfs", "pod-systemd"])
def test_a_workload_filter_reports_its_collision_and_no_other(ns, shape):
    components, (option, value), workload = SHAPES[shape]
    logs = kubelet_logs() if shape.startswith("pod") else contextlib.nullcontext()
    procs = []
    tracer = None
    with netns.NetNS(ns_name("other")) as other, cgroup_shape(components) as cg, logs:
        try:
            mine, mine_pid = leaky(ns.name, 12345, 39836, "leakysrv")
            (cg / "cgroup.procs").write_text(str(mine_pid))
            # the same namespace, not the workload's; and another namespace
            beside, beside_pid = leaky(ns.name, 12346, 39837, "othersrv")
            away, _ = leaky(other.name, 12345, 39836, "awaysrv")
            procs = [mine, beside, away]
            tracer = Tracer(option, value)
            ready = tracer.wait_ready()
            for p in procs:
                go(p)
            rc, records, stderr = settle_and_stop(tracer)
        finally:
            kill_all(procs, tracer)
    assert rc == 0, stderr
    assert ready["filters"]["workloads"] == [{option.lstrip("-"): value}]
    # the scenario's own process (the client) is in that namespace too: shared
    assert ready["filters"]["workload_namespaces"] == [{"netns": ns.inode, "shared": True}]
    [rec] = [r for r in records if r["type"] == "collision"]
    assert rec["netns"] == ns.inode and rec["server"] == "127.0.0.1:12345"
    [owner] = rec["closewait_socket"]["owners"]
    assert owner["pid"] == mine_pid and owner["workload"] == workload
    summary = records[-1]
    assert summary["type"] == "summary" and summary["collisions"] == 1
    assert summary["outside_selection"] == {"not_selected": 1}  # othersrv's, beside it
    assert summary["kernel"]["unreported"] == 0  # awaysrv's namespace is not counted at all
    short = "leaky.service" if shape == "unit" else "shop/cart-7d9f"
    assert summary["top_culprits"] == [{"culprit": f"leakysrv (pid {mine_pid}) in {short}", "collisions": 1}]
    assert beside_pid != mine_pid


def test_a_workload_filter_that_matches_nothing_is_an_error():
    proc = subprocess.run([str(BIN), "trace", "--unit", "no-such-unit-here"], capture_output=True,
                          text=True, timeout=60 * SLOW)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tcpcollide-trace: error: no running process belongs to --unit no-such-unit-here"]


# -- a real container: Debian's podman with runc (../shared/notes/containers.md) ---------

SERVER = """
import socket
listener = socket.create_server(("127.0.0.1", 12345))
print("ready", flush=True)
held = []
while True:
    held.append(listener.accept()[0])  # never closed: a leak
"""


def _memory_cgroup() -> str:
    return next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "memory")


@contextlib.contextmanager
def podman_server(name: str, ns: netns.NetNS):
    """A leaking server in a podman container (runc, the host's filesystem as
    its root through an overlay) joined to the test's namespace, kept beneath
    this test's own memory cgroup; yields (id, pid); removed afterwards with
    the cgroup directories podman made for it."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman and runc are not installed (scripts/setup --for-tests installs them)")
    parent = f"{_memory_cgroup()}/{name}"
    cmd = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
    try:
        subprocess.run([*cmd, "run", "-d", "--name", name, "--cgroup-parent", parent,
                        "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000",
                        f"--network=ns:{ns.path}", "--rootfs", "/:O", "/usr/bin/python3", "-c", SERVER],
                       check=True, capture_output=True, text=True, timeout=60 * SLOW)
        deadline = time.monotonic() + 30 * SLOW
        while "ready" not in subprocess.run([*cmd, "logs", name], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the container's server never started"
            time.sleep(0.1)
        info = json.loads(subprocess.run([*cmd, "inspect", name], check=True, capture_output=True, text=True).stdout)
        yield info[0]["Id"], info[0]["State"]["Pid"]
    finally:
        subprocess.run([*cmd, "rm", "-f", "-t", "0", name], capture_output=True, timeout=60 * SLOW)
        for made in sorted(Path("/sys/fs/cgroup").glob(f"**{parent}"), key=lambda p: -len(p.parts)):
            for d in sorted((p for p in [made, *made.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()


def test_a_real_podman_container_is_named_and_filtered(ns):
    """A leaking server in a real podman container: the report carries its
    runtime, full id and name for the lingering socket's owner and for the
    listener's; `--container NAME` reports its collision and not one in
    another namespace."""
    name = ns_name("leaky")
    tracer = None
    procs = []
    with netns.NetNS(ns_name("other")) as other, podman_server(name, ns) as (cid, pid):
        try:
            away, _ = leaky(other.name, 12345, 39836, "awaysrv")
            procs.append(away)
            tracer = Tracer("--container", name)
            ready = tracer.wait_ready()
            client = scenario("--server-ns", ns.name, "--fast", "--external-server", "--wait-stdin",
                              "--hold", "0.5", stdin=subprocess.PIPE)
            procs.append(client)
            read_steps(client, until="waiting")
            go(client)
            go(away)
            rc, records, stderr = settle_and_stop(tracer)
        finally:
            kill_all(procs, tracer)
    assert rc == 0, stderr
    assert [n["netns"] for n in ready["filters"]["workload_namespaces"]] == [ns.inode]
    workload = {"unit": None, "container": {"runtime": "podman", "id": cid, "name": name}, "pod": None}
    [rec] = [r for r in records if r["type"] == "collision"]
    assert rec["netns"] == ns.inode and rec["outcome"] == "recovered"
    [owner] = rec["closewait_socket"]["owners"]
    assert owner["pid"] == pid and owner["comm"] == "python3" and owner["workload"] == workload
    [listener_owner] = rec["listener"]["owners"]
    assert listener_owner["pid"] == pid and listener_owner["workload"] == workload
    assert records[-1]["kernel"]["unreported"] == 0
