"""The Kubernetes node agent's files, checked without a cluster: the DaemonSet manifest
(tracer/system/daemonset.yaml) parsed as Kubernetes would read it, with the facts it shares with
the rest of the project held together (the capabilities of tracer/kernel/capabilities.py, the
metrics port of the systemd unit, the image's default command). scripts/test-image runs the image
under podman with the flags this manifest implies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tracer import __version__
from tracer.kernel.capabilities import CAPABILITIES
from tracer.resources import service_unit

yaml = pytest.importorskip("yaml")

SYSTEM = Path(__file__).resolve().parent.parent / "tracer" / "system"


@pytest.fixture(scope="module")
def manifest():
    docs = [d for d in yaml.safe_load_all((SYSTEM / "daemonset.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet", "PodMonitor"}
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    return ds


def pod(ds):
    return ds["spec"]["template"]["spec"]


def container(ds):
    (c,) = pod(ds)["containers"]
    return c


def test_host_pid_and_network_not_privileged(manifest):
    spec = pod(manifest)
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert "initContainers" not in spec
    sc = container(manifest)["securityContext"]
    assert sc.get("privileged") in (None, False)
    assert "privileged: true" not in (SYSTEM / "daemonset.yaml").read_text()
    # Kubernetes refuses allowPrivilegeEscalation: false with CAP_SYS_ADMIN
    assert sc.get("allowPrivilegeEscalation") is not False
    assert sc["runAsUser"] == 0 and sc["readOnlyRootFilesystem"] is True


def test_the_capabilities_are_the_measured_set(manifest):
    caps = container(manifest)["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert len(caps["add"]) == len(set(caps["add"]))
    assert {f"CAP_{c}" for c in caps["add"]} == set(CAPABILITIES)


def test_the_host_is_mounted_read_only(manifest):
    c, spec = container(manifest), pod(manifest)
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {m["mountPath"]: (volumes[m["name"]]["hostPath"]["path"], m.get("readOnly", False))
            for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]]}
    for path in ("/sys/kernel/btf", "/sys/kernel/tracing", "/sys/kernel/debug", "/var/log/pods", "/var/log/containers"):
        assert host[path] == (path, True), path
    assert all(ro for _, ro in host.values()), "every host path read-only"
    assert "/proc" not in host  # hostPID: the runtime's /proc is the host PID namespace's
    # the rest is the pod's own: the compiled-object cache, the demo's namespaces, /tmp
    own = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert own == {"/var/cache/tcpcollide-trace", "/run/netns", "/tmp"}
    assert {m["name"] for m in c["volumeMounts"]} == set(volumes)


def test_the_metrics_port_is_the_units(manifest):
    c = container(manifest)
    unit_port = re.search(r"--metrics \S+:(\d+)", service_unit().read_text()).group(1)
    args = c["args"]
    assert args[0] == "trace" and "--json" in args
    assert args[args.index("--metrics") + 1] == f"0.0.0.0:{unit_port}"
    assert c["ports"] == [{"name": "metrics", "containerPort": int(unit_port), "hostPort": int(unit_port),
                           "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):  # the kubelet has no client certificate nor password
        assert c[probe]["tcpSocket"] == {"port": int(unit_port)}
    annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == unit_port and annotations["prometheus.io/scheme"] == "https"


def test_the_metrics_are_secured_from_a_secret(manifest):
    """--web-config's file is in the Secret mounted read-only, and the PodMonitor scrapes the
    DaemonSet's pods on its port over TLS with a client certificate and basic auth."""
    c, spec = container(manifest), pod(manifest)
    args = c["args"]
    web = args[args.index("--web-config") + 1]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if web.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True and "secret" in volumes[mount["name"]]
    assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o400
    docs = [d for d in yaml.safe_load_all((SYSTEM / "daemonset.yaml").read_text()) if d]
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert pm["metadata"]["namespace"] == manifest["metadata"]["namespace"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= manifest["spec"]["template"]["metadata"]["labels"].items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == c["ports"][0]["name"] and ep["scheme"] == "https"
    assert {"ca", "cert", "keySecret"} <= set(ep["tlsConfig"]) and {"username", "password"} <= set(ep["basicAuth"])


def test_resources_are_set(manifest):
    r = container(manifest)["resources"]
    mib = {k: int(v.removesuffix("Mi")) for k, v in (("request", r["requests"]["memory"]), ("limit", r["limits"]["memory"]))}
    # scripts/test-image measures about 90 MiB at the peak of a first start (it compiles)
    assert 100 <= mib["request"] <= mib["limit"] and mib["limit"] >= 200
    assert r["requests"]["cpu"] and r["limits"]["cpu"]


def test_the_image_runs_what_the_daemonset_runs(manifest):
    """The Containerfile's default command is the DaemonSet's (so `podman run IMAGE` and the
    DaemonSet agree), and it installs the Debian package, nothing else."""
    text = (SYSTEM / "Containerfile").read_text()
    directives = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    entry = json.loads(next(d for d in directives if d.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    cmd = json.loads(next(d for d in directives if d.startswith("CMD ")).split(" ", 1)[1])
    assert entry == ["/usr/bin/tcpcollide-trace"]
    args = container(manifest)["args"]
    at = args.index("--web-config")  # the Secret's file: the DaemonSet's own (a bare `podman run` has none)
    assert cmd == args[:at] + args[at + 2:]
    assert "apt-get install" in text and "tcpcollide-trace_*_all.deb" in text
    assert "pip" not in text
    assert container(manifest)["image"] == f"tcpcollide-trace:{__version__}"  # what scripts/build-image tags
