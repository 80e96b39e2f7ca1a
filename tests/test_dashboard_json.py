"""The Grafana dashboard shipped with the package (tracer/system/dashboard.json)
against what the exporter really serves: the real metrics server
(tracer/output/metrics.py, no BPF) after a collision record, its hooks and
the kernel's counts, scraped over HTTP and parsed with prometheus_client's
own parser. Every metric a panel's query names must be served, and every
label the query groups by, selects on or prints in its legend must be one
that metric carries: a dashboard querying a renamed metric or label fails
here (the checker is shown to catch one)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.live import free_port
from tracer.output.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "tracer" / "system" / "dashboard.json"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
METRIC = re.compile(r"\b(tcpcollide_[a-z_]+)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")

RECORD = {"server": "10.0.0.1:8080", "outcome": "recovered", "outcome_detail": "recovered_fast",
          "lingering_state": "CLOSE_WAIT", "penalty_ms": 13.0, "view": "both",
          "closewait_socket": {"owners": [{"pid": 42, "comm": "leakysrv", "fd": 7, "workload": {
              "unit": None, "container": None, "pod": {"namespace": "shop", "name": "cart", "uid": "u",
                                                       "container": "app"}}}], "inode": 5},
          "listener": None, "client_process": None,
          "translation": {"kind": "snat"}, "translation_unknown": "budget"}
HOOKS = [{"logical": "syn_challenged", "backend": "tracepoint", "target": "skb:kfree_skb", "available": True,
          "verified": True}]
KERNEL = {"by_server": [{"server_port": 8080, "lingering_state": "CLOSE_WAIT", "collisions": 1, "syn_hits": 1}],
          "events_not_submitted": 0, "untracked": 0, "tracked_evicted": 0}
INVENTORY = {"closewait": [{"netns": 1, "local": "10.0.0.1:8080", "pid": 42, "comm": "leakysrv", "count": 3,
                            "oldest_age_s": 60.0}],
             "listeners": [{"netns": 1, "listener": "10.0.0.1:8080", "recv_q": 2, "ghosts": 1}]}


def served() -> dict[str, set[str]]:
    """Sample name -> its label names, as the real server serves them."""
    port = free_port()
    m = Metrics(f"127.0.0.1:{port}", snapshot=lambda: INVENTORY)
    try:
        m.ready(HOOKS)
        m.collision(RECORD)
        m.kernel(KERNEL)
        m.events.inc()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every target."""
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dashboard["panels"] for t in p["targets"]]


def problems(dashboard: dict, metrics: dict[str, set[str]]) -> list[str]:
    found = []
    for title, expr, legend in queries(dashboard):
        names = METRIC.findall(expr)
        if not names:
            found.append(f"{title}: no tcpcollide metric in {expr!r}")
        for name in names:
            if name not in metrics:
                found.append(f"{title}: {name} is not served")
        labels = set()
        for group in BY.findall(expr):
            labels.update(x.strip() for x in group.split(",") if x.strip())
        for sel in SELECTOR.findall(expr):
            labels.update(m.group(1) for m in re.finditer(r"(\w+)\s*[=!~]", sel))
        labels.update(LEGEND.findall(legend))
        have = set().union(*(metrics.get(n, set()) for n in names)) | TARGET_LABELS
        for label in sorted(labels - have):
            found.append(f"{title}: label {label!r} is on none of {', '.join(names)}")
    return found


def test_every_query_names_served_metrics_and_labels():
    dashboard = json.loads(DASHBOARD.read_text())
    metrics = served()
    assert problems(dashboard, metrics) == []
    # the panels the issue asks for are there
    exprs = " ".join(e for _, e, _ in queries(dashboard))
    for name in ("tcpcollide_collisions_total", "tcpcollide_collisions_by_workload_total",
                 "tcpcollide_penalty_seconds_bucket", "tcpcollide_closewait_sockets", "tcpcollide_listener_ghosts",
                 "tcpcollide_lost_events_total", "tcpcollide_skipped_runs_total", "tcpcollide_hook_up",
                 "tcpcollide_hook_verified", "tcpcollide_translated_collisions_total"):
        assert name in exprs, name
    assert any(p["type"] == "heatmap" for p in dashboard["panels"])


def test_the_checker_catches_a_renamed_metric_and_label():
    dashboard = json.loads(DASHBOARD.read_text())
    metrics = served()
    renamed = json.loads(json.dumps(dashboard).replace("tcpcollide_listener_ghosts", "tcpcollide_listener_dead"))
    assert any("tcpcollide_listener_dead is not served" in p for p in problems(renamed, metrics))
    relabelled = json.loads(json.dumps(dashboard).replace("by (server_port)", "by (port)"))
    assert any("label 'port'" in p for p in problems(relabelled, metrics))
