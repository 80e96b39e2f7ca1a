"""What a process is, in the operator's terms: the systemd unit, the
container and the Kubernetes pod it runs in.

Read from files only, never from a runtime's socket or the Kubernetes API:
the process's cgroup paths (`/proc/PID/cgroup`: pure v2 `0::/...`, pure v1
`N:controller:/...` and the hybrid of both, where a hierarchy may put the
process under a prefix: a node that itself runs in a container, a cgroup
namespace), the kubelet's log layout for the pod's namespace, name and
container name (`/var/log/pods/<namespace>_<pod>_<uid>/`,
`/var/log/containers/<pod>_<namespace>_<container>-<id>.log`), and the
runtimes' own files for a container's name (Docker's
`containers/<id>/config.v2.json`, podman's `containers.json`). Whatever is
not known stays None; nothing here raises for a process that went away or a
file it cannot read.

Every name comes from the host's files: untrusted text, like a comm.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from tracer.host.procfs import read_comm

_ID = r"[0-9a-f]{64}"
# the container's own cgroup directory, by runtime (cgroupfs and systemd drivers)
_CONTAINER = [
    (re.compile(rf"^docker-({_ID})\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-({_ID})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_ID})\.scope$"), "cri-o"),
    (re.compile(rf"^libpod-({_ID})(?:\.scope)?$"), "podman"),
]
_BARE_ID = re.compile(rf"^({_ID})$")  # /docker/<id>, /kubepods/.../pod<UID>/<id>
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$")
_POD_SYSTEMD = re.compile(r"^kubepods(?:-[a-z]+)?-pod([0-9a-f_]+)\.slice$")
_LXC = re.compile(r"^lxc\.payload\.(.+)$")
_UNIT = re.compile(r"^.+\.(service|scope)$")


@dataclass(frozen=True)
class Workload:
    unit: str | None = None  # systemd unit (or slice) the process runs in
    container_runtime: str | None = None  # docker, containerd, cri-o, podman, lxc, or "cri" (runtime unknown)
    container_id: str | None = None
    container_name: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    pod_container: str | None = None  # the container's name in its pod

    def as_dict(self) -> dict:
        return {
            "unit": self.unit,
            "container": None if self.container_id is None and self.container_runtime is None else {
                "runtime": self.container_runtime, "id": self.container_id, "name": self.container_name},
            "pod": None if self.pod_uid is None else {
                "namespace": self.pod_namespace, "name": self.pod_name, "uid": self.pod_uid,
                "container": self.pod_container},
        }


def cgroup_paths(text: str) -> list[str]:
    """The distinct paths of a /proc/PID/cgroup file, the v2 line and the
    name=systemd line first (where systemd puts its units)."""
    first, rest = [], []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        (first if hier == "0" or controllers == "name=systemd" else rest).append(path)
    out: list[str] = []
    for p in first + rest:
        if p not in out:
            out.append(p)
    return out


def classify(paths: list[str]) -> Workload:
    """The unit, container and pod that cgroup paths name (no files read)."""
    unit = runtime = cid = pod_uid = lxc = None
    for path in paths:
        comps = [c for c in path.split("/") if c]
        at = None  # the container's own directory in this path: a unit is looked for below it
        for i, c in enumerate(comps):
            m = _POD_CGROUPFS.match(c) or _POD_SYSTEMD.match(c)
            if m and pod_uid is None:
                pod_uid = m.group(1).replace("_", "-")
            found = next(((m.group(1), name) for pattern, name in _CONTAINER if (m := pattern.match(c))), None)
            m = _BARE_ID.match(c)
            if found is None and m and i > 0 and (comps[i - 1] == "docker" or _POD_CGROUPFS.match(comps[i - 1])):
                found = (m.group(1), "docker" if comps[i - 1] == "docker" else "cri")
            m = _LXC.match(c)
            if found is not None or m:
                at = i if at is None else at
            if found is not None and cid is None:
                cid, runtime = found
            if m and lxc is None:
                lxc = m.group(1)
        if unit is None:
            # a container's process: the unit inside it (LXC runs systemd), not the host's slice
            tail = comps if at is None else comps[at + 1:]
            units = [c for c in tail if _UNIT.match(c) and not any(p.match(c) for p, _ in _CONTAINER)]
            slices = [c for c in tail if c.endswith(".slice") and not c.startswith("kubepods")]
            if units:
                unit = units[-1]
            elif slices:
                unit = slices[-1]
    if lxc is not None and cid is None:
        return Workload(unit=unit, container_runtime="lxc", container_name=lxc)
    return Workload(unit=unit, container_runtime=runtime, container_id=cid, pod_uid=pod_uid)


class Workloads:
    """Workloads of processes, read from `root` (a test's own tree; "/" on a
    host). Keyed by (pid, comm): a pid reused by another program is looked up
    again. At most `max_entries`, forgotten with the owner cache."""

    def __init__(self, root: str = "/", max_entries: int = 4096):
        self.root = root
        self.max_entries = max_entries
        self._by_proc: dict[tuple[int, str], Workload | None] = {}
        self._names: dict[tuple[str, str], str | None] = {}
        self._pods: dict[str, tuple[str, str] | None] = {}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def of(self, pid: int, comm: str = "") -> Workload | None:
        key = (pid, comm)
        if key not in self._by_proc:
            if len(self._by_proc) >= self.max_entries:
                self._by_proc.clear()
            self._by_proc[key] = self._read(pid)
        return self._by_proc[key]

    def as_dict(self, pid: int, comm: str = "") -> dict | None:
        """The workload's JSON form (None: the process's cgroups could not be read)."""
        w = self.of(pid, comm)
        return w.as_dict() if w is not None else None

    def keep(self, keys: set[tuple[int, str]]) -> None:
        """Forget every process but these (the ones a scan of /proc just saw)."""
        self._by_proc = {k: v for k, v in self._by_proc.items() if k in keys}

    def forget(self) -> None:
        self._by_proc.clear()
        self._names.clear()
        self._pods.clear()

    def _read(self, pid: int) -> Workload | None:
        try:
            with open(self._path("proc", str(pid), "cgroup")) as f:
                text = f.read()
        except OSError:
            return None  # gone, or not ours to read
        w = classify(cgroup_paths(text))
        name = self._container_name(w.container_runtime, w.container_id) if w.container_id else w.container_name
        pod_ns = pod_name = pod_container = None
        if w.pod_uid is not None:
            pod_ns, pod_name = self._pod(w.pod_uid) or (None, None)
            if w.container_id is not None:
                pod_container = self._pod_container(w.container_id)
        return Workload(unit=w.unit, container_runtime=w.container_runtime, container_id=w.container_id,
                        container_name=name, pod_namespace=pod_ns, pod_name=pod_name, pod_uid=w.pod_uid,
                        pod_container=pod_container)

    def _container_name(self, runtime: str | None, cid: str) -> str | None:
        key = (runtime or "", cid)
        if key not in self._names:
            self._names[key] = self._read_name(runtime, cid)
        return self._names[key]

    def _read_name(self, runtime: str | None, cid: str) -> str | None:
        try:
            if runtime == "docker":
                with open(self._path("var/lib/docker/containers", cid, "config.v2.json")) as f:
                    name = json.load(f).get("Name")
                return name.lstrip("/") if isinstance(name, str) and name else None
            if runtime == "podman":
                with open(self._path("var/lib/containers/storage/overlay-containers/containers.json")) as f:
                    for c in json.load(f):
                        if c.get("id") == cid and c.get("names"):
                            return str(c["names"][0])
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        return None

    def _pod(self, uid: str) -> tuple[str, str] | None:
        """(namespace, name) from /var/log/pods/<namespace>_<pod>_<uid>."""
        if uid not in self._pods:
            found = None
            try:
                for d in os.listdir(self._path("var/log/pods")):
                    parts = d.split("_")
                    if len(parts) == 3 and parts[2] == uid:
                        found = (parts[0], parts[1])
                        break
            except OSError:
                pass
            self._pods[uid] = found
        return self._pods[uid]

    def _pod_container(self, cid: str) -> str | None:
        """The container's name in its pod, from
        /var/log/containers/<pod>_<namespace>_<container>-<id>.log."""
        try:
            for f in os.listdir(self._path("var/log/containers")):
                if f.endswith(f"-{cid}.log"):
                    parts = f[: -len(cid) - 5].split("_")
                    if len(parts) == 3:
                        return parts[2]
        except OSError:
            pass
        return None


# -- selecting workloads: --container, --pod, --unit -------------------------------

SELECTOR_KINDS = ("container", "pod", "unit")
_MIN_ID_PREFIX = 12  # as `docker ps` shortens an id


class SelectorError(ValueError):
    """A workload filter that cannot be understood."""


class SelectionError(Exception):
    """No running process belongs to the workloads asked for."""


@dataclass(frozen=True)
class Selector:
    """One workload filter as the operator gave it: `container` NAME or ID
    (a prefix of at least 12 hex digits), `pod` NAMESPACE/NAME (or its UID),
    `unit` a systemd unit or slice (`nginx` stands for `nginx.service`)."""

    kind: str
    value: str

    def __post_init__(self):
        if self.kind not in SELECTOR_KINDS:
            raise SelectorError(f"unknown workload filter {self.kind!r}")
        if not self.value or any(c.isspace() or not c.isprintable() for c in self.value):
            raise SelectorError(f"--{self.kind} {self.value!r}: not a name")
        if self.kind == "pod" and "/" not in self.value and not _POD_CGROUPFS.match("pod" + self.value):
            raise SelectorError(f"--pod {self.value!r}: give NAMESPACE/NAME (or the pod's UID)")

    def matches(self, workload: dict | None) -> bool:
        """Whether a workload (its JSON form, Workloads.as_dict) is selected."""
        if not workload:
            return False
        v = self.value
        if self.kind == "unit":
            return workload.get("unit") in (v, f"{v}.service")
        if self.kind == "container":
            c = workload.get("container") or {}
            cid = c.get("id") or ""
            return c.get("name") == v or (len(v) >= _MIN_ID_PREFIX and cid.startswith(v.lower()))
        pod = workload.get("pod") or {}
        return pod.get("uid") == v or f"{pod.get('namespace')}/{pod.get('name')}" == v

    def __str__(self) -> str:
        return f"--{self.kind} {self.value}"


class Selection:
    """The network namespaces the selected workloads' processes run in, as a
    scan of /proc finds them (`refresh()`, again and again: a container that
    restarts comes back in a new namespace). A namespace is `shared` when
    processes outside the selection run in it too (a pod's other containers,
    the host's namespace for a hostNetwork pod or a unit without a private
    network): there a collision is the selection's only when one of the
    processes it names belongs to it (`outside()`)."""

    def __init__(self, selectors: list[Selector], workloads: Workloads | None = None, root: str = "/"):
        self.selectors = selectors
        self.workloads = workloads or Workloads(root, max_entries=1 << 20)  # every process of the host, kept
        self.root = root
        self.netns: dict[int, bool] = {}  # namespace inode -> shared with processes outside the selection

    def matches(self, workload: dict | None) -> bool:
        return any(s.matches(workload) for s in self.selectors)

    def refresh(self) -> dict[int, bool]:
        """Scan /proc; returns (and keeps) the namespaces found."""
        found: dict[int, bool] = {}
        others: set[int] = set()
        seen: set[tuple[int, str]] = set()
        proc = os.path.join(self.root, "proc")
        try:
            pids = [p for p in os.listdir(proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                ino = os.stat(os.path.join(proc, pid, "ns", "net")).st_ino
            except OSError:
                continue  # gone, or a kernel thread without a namespace to show
            comm = read_comm(pid, proc)
            if comm is None:
                continue
            seen.add((int(pid), comm))
            if self.matches(self.workloads.as_dict(int(pid), comm)):
                found[ino] = False
            else:
                others.add(ino)
        self.workloads.keep(seen)  # processes seen before are not read again; the gone ones are dropped
        self.netns = {ino: ino in others for ino in found}
        return self.netns

    def outside(self, netns: list[int], processes: list[dict]) -> str | None:
        """Why a collision in these namespaces, naming these processes (each
        with its `workload`), is not the selection's (None: it is):
        `not_selected`, none of its processes belongs to the selection in a
        shared namespace; `unattributed`, none of them is known there."""
        if any(self.netns.get(n) is False for n in netns if n is not None):
            return None  # a namespace of the selection's own
        if any(self.matches(p.get("workload")) for p in processes):
            return None
        return "not_selected" if processes else "unattributed"

    def describe(self) -> str:
        return " or ".join(map(str, self.selectors))

    def namespaces(self) -> list[dict]:
        """The namespaces as the ready record tells them."""
        return [{"netns": ino, "shared": shared} for ino, shared in sorted(self.netns.items())]
