"""Workloads from cgroup paths and the kubelet's and runtimes' files.

Synthetic: the /proc/PID/cgroup texts are the shapes that systemd, Docker,
containerd, CRI-O, podman, LXC and the kubelet write (../shared/notes/
containers.md), and the on-disk files are made in a temporary root. The live
test with real cgroups is in test_workload_live.py.
"""

from __future__ import annotations

import json

import pytest

from tracer.host.workload import Workload, Workloads, cgroup_paths, classify
from tracer.pipeline.records import short_name

ID = "4f2c" + "a" * 60
UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def w(text: str) -> Workload:
    return classify(cgroup_paths(text))


@pytest.mark.parametrize("text, expected", [
    ("0::/system.slice/nginx.service\n", Workload(unit="nginx.service")),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-1.scope\n",
     Workload(unit="vte-spawn-1.scope")),
    ("0::/user.slice/user-1000.slice\n", Workload(unit="user-1000.slice")),
    ("0::/\n", Workload()),
    # pure v1 (systemd's own named hierarchy) and the hybrid (v2 line empty, units in name=systemd)
    ("12:pids:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n", Workload(unit="sshd.service")),
    ("4:memory:/process_api/e7\n1:name=systemd:/system.slice/cron.service\n0::/\n", Workload(unit="cron.service")),
    (f"0::/system.slice/docker-{ID}.scope\n", Workload(unit=None, container_runtime="docker", container_id=ID)),
    (f"9:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n", Workload(container_runtime="docker", container_id=ID)),
    (f"0::/machine.slice/libpod-{ID}.scope\n", Workload(container_runtime="podman", container_id=ID)),
    (f"4:memory:/process_api/e7/tests/libpod-{ID}\n0::/\n", Workload(container_runtime="podman", container_id=ID)),
    ("0::/lxc.payload.web1/system.slice/nginx.service\n",
     Workload(unit="nginx.service", container_runtime="lxc", container_name="web1")),
    # Kubernetes, systemd driver (containerd, CRI-O) and cgroupfs driver; guaranteed QoS has no QoS level
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{ID}.scope\n", Workload(container_runtime="containerd", container_id=ID, pod_uid=UID)),
    (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope\n",
     Workload(container_runtime="cri-o", container_id=ID, pod_uid=UID)),
    (f"4:memory:/process_api/e7/kubepods/burstable/pod{UID}/{ID}\n0::/\n",
     Workload(container_runtime="cri", container_id=ID, pod_uid=UID)),
    (f"0::/kubepods/pod{UID}/{ID}\n", Workload(container_runtime="cri", container_id=ID, pod_uid=UID)),
])
def test_cgroup_shapes(text, expected):
    assert w(text) == expected


def test_a_64_hex_directory_alone_is_not_a_container():
    """Only where a runtime puts one (under docker/ or a pod) is a bare id a container's."""
    assert w(f"0::/some/{ID}\n") == Workload()


def _proc(root, pid: int, text: str) -> None:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(text)


def test_pod_and_container_names_from_the_kubelets_files(tmp_path):
    _proc(tmp_path, 42, f"0::/kubepods/besteffort/pod{UID}/{ID}\n")
    (tmp_path / "var/log/pods" / f"shop_cart-7d9f_{UID}" / "app").mkdir(parents=True)
    (tmp_path / "var/log/containers").mkdir(parents=True)
    (tmp_path / "var/log/containers" / f"cart-7d9f_shop_app-{ID}.log").write_text("")
    got = Workloads(str(tmp_path)).of(42, "java")
    assert got.as_dict() == {"unit": None, "container": {"runtime": "cri", "id": ID, "name": None},
                             "pod": {"namespace": "shop", "name": "cart-7d9f", "uid": UID, "container": "app"}}
    assert short_name(got.as_dict()) == "shop/cart-7d9f"


def test_container_names_from_docker_and_podman_files(tmp_path):
    _proc(tmp_path, 1, f"0::/system.slice/docker-{ID}.scope\n")
    d = tmp_path / "var/lib/docker/containers" / ID
    d.mkdir(parents=True)
    (d / "config.v2.json").write_text(json.dumps({"Name": "/proxy"}))
    other = "b" * 64
    _proc(tmp_path, 2, f"0::/machine.slice/libpod-{other}.scope\n")
    p = tmp_path / "var/lib/containers/storage/overlay-containers"
    p.mkdir(parents=True)
    (p / "containers.json").write_text(json.dumps([{"id": other, "names": ["leaky"]}]))
    ws = Workloads(str(tmp_path))
    assert ws.of(1).container_name == "proxy" and short_name(ws.of(1).as_dict()) == "proxy"
    assert ws.of(2).container_name == "leaky" and ws.of(2).container_runtime == "podman"


def test_nothing_known_is_null_and_nothing_fails(tmp_path):
    ws = Workloads(str(tmp_path))
    assert ws.of(7) is None  # no such process
    _proc(tmp_path, 8, f"0::/system.slice/docker-{ID}.scope\n")  # no docker files: no name
    (tmp_path / "var/lib/docker/containers" / ID).mkdir(parents=True)
    (tmp_path / "var/lib/docker/containers" / ID / "config.v2.json").write_text("{not json")
    got = ws.of(8)
    assert got.container_name is None and short_name(got.as_dict()) == f"docker {ID[:12]}"
    assert Workload().as_dict() == {"unit": None, "container": None, "pod": None}
    assert short_name(Workload().as_dict()) is None


def test_a_reused_pid_is_read_again(tmp_path):
    _proc(tmp_path, 9, "0::/system.slice/a.service\n")
    ws = Workloads(str(tmp_path))
    assert ws.of(9, "a").unit == "a.service"
    (tmp_path / "proc/9/cgroup").write_text("0::/system.slice/b.service\n")
    assert ws.of(9, "a").unit == "a.service"  # cached for the same process
    assert ws.of(9, "b").unit == "b.service"  # another program under that pid
    ws.forget()
    assert ws.of(9, "a").unit == "b.service"


# -- selecting workloads (synthetic workloads and /proc trees) ---------------------------

from tracer.host.workload import Selection, Selector, SelectorError  # noqa: E402

CART = {"unit": None, "container": {"runtime": "containerd", "id": ID, "name": None},
        "pod": {"namespace": "shop", "name": "cart-7d9f", "uid": UID, "container": "app"}}
NGINX = {"unit": "nginx.service", "container": None, "pod": None}
LEAKY = {"unit": None, "container": {"runtime": "podman", "id": ID, "name": "leaky"}, "pod": None}


@pytest.mark.parametrize("kind, value, selected", [
    ("unit", "nginx", [NGINX]), ("unit", "nginx.service", [NGINX]), ("unit", "nginx.socket", []),
    ("pod", "shop/cart-7d9f", [CART]), ("pod", UID, [CART]), ("pod", "shop/cart", []),
    ("container", "leaky", [LEAKY]), ("container", ID[:12], [CART, LEAKY]), ("container", ID[:11], []),
    ("container", ID.upper(), [CART, LEAKY]),
])
def test_selectors_match_workloads(kind, value, selected):
    sel = Selector(kind, value)
    assert [x for x in (CART, NGINX, LEAKY, None) if sel.matches(x)] == selected


@pytest.mark.parametrize("kind, value", [("pod", "cart"), ("unit", ""), ("container", "a b"), ("container", "\x1b[2J"),
                                         ("image", "x")])
def test_bad_selectors_are_refused(kind, value):
    with pytest.raises(SelectorError):
        Selector(kind, value)


def fake_proc(root, procs: dict[int, tuple[str, str, int]]) -> None:
    """/proc/PID/{cgroup,comm,ns/net} under root: pid -> (cgroup text,
    comm, netns); the namespace is a file whose inode stands for it."""
    nets = {}
    for pid, (cgroup, comm, net) in procs.items():
        d = root / "proc" / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        (d / "comm").write_text(comm + "\n")
        if net not in nets:
            nets[net] = root / f"net{net}"
            nets[net].write_text("")
        (d / "ns" / "net").hardlink_to(nets[net])
    return {net: path.stat().st_ino for net, path in nets.items()}


def test_a_selection_finds_its_namespaces_and_whether_they_are_shared(tmp_path):
    """(Synthetic /proc.) A pod's namespace holds only its own processes; a
    unit on the host's network shares the host's namespace; a container of a
    pod shares the pod's namespace with its siblings."""
    ino = fake_proc(tmp_path, {
        1: ("0::/init.scope\n", "init", 1),
        10: ("0::/system.slice/nginx.service\n", "nginx", 1),
        20: (f"0::/kubepods/besteffort/pod{UID}/{ID}\n", "app", 2),
        21: (f"0::/kubepods/besteffort/pod{UID}/{'b' * 64}\n", "sidecar", 2),
    })
    pods = tmp_path / "var/log/pods" / f"shop_cart-7d9f_{UID}"
    pods.mkdir(parents=True)
    assert Selection([Selector("pod", "shop/cart-7d9f")], root=str(tmp_path)).refresh() == {ino[2]: False}
    assert Selection([Selector("unit", "nginx")], root=str(tmp_path)).refresh() == {ino[1]: True}
    assert Selection([Selector("container", ID[:12])], root=str(tmp_path)).refresh() == {ino[2]: True}
    assert Selection([Selector("unit", "nothing")], root=str(tmp_path)).refresh() == {}


def test_a_collision_in_a_shared_namespace_is_the_selections_only_if_its_processes_are():
    sel = Selection([Selector("unit", "nginx")])
    sel.netns = {111: True, 222: False}
    nginx, other = {"pid": 10, "workload": NGINX}, {"pid": 11, "workload": LEAKY}
    assert sel.outside([222, None], []) is None  # a namespace of the selection's own: nothing to check
    assert sel.outside([111], [other, nginx]) is None
    assert sel.outside([111], [other]) == "not_selected"
    assert sel.outside([111], []) == "unattributed"
    assert sel.outside([333], [other]) == "not_selected"  # a namespace the selection has left since
