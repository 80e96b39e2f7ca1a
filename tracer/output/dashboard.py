"""`tcpcollide-trace top`: a live dashboard (rich), redrawn in place.

It is a sink for the session's records plus a refresh called from the
session loop: collisions as they complete, counters by outcome, server port,
culprit process and client, the CLOSE_WAIT sockets and ghosts per listener
(the inventory snapshot, every few seconds), and a status line with events
per second, lost events and the backend. Laid out for 80x24. When stdout is
not a terminal it degrades to plain lines, one per record.
"""

from __future__ import annotations

import time
from collections import Counter, deque

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tracer.host import inventory
from tracer.output.render import inert, kernel_line, storm_line
from tracer.pipeline.records import culprit_of

INVENTORY_EVERY_S = 5.0


def plain_line(rec: dict) -> str | None:
    kind = rec.get("type")
    if kind == "collision":
        pen = "-" if rec["penalty_ms"] is None else f"{rec['penalty_ms']:.1f}ms"
        return (f"collision #{rec['id']} {rec['client']} -> {rec['server']} "
                f"{rec['lingering_state'] or 'remote'} {rec.get('outcome_detail') or rec['outcome']} penalty={pen} "
                f"culprit={culprit_of(rec)} view={rec.get('view', 'server')}")
    if kind == "queue":
        return f"queue {rec['event']} {rec['listener']} recv_q={rec['recv_q']}/{rec['limit']} ghosts={rec['ghosts']}"
    if kind == "ready":
        return f"ready: backend {rec['backend']}, {rec['kernel']}"
    if kind == "storm":
        return storm_line(rec)
    if kind == "summary":
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(rec["by_outcome"].items())) or "none"
        line = (f"summary: {rec['collisions']} collision(s) ({outcomes}), "
                f"{rec['events']} events, {rec['lost_events']} lost")
        if rec.get("kernel") is not None:  # a line of its own, before: the summary stays the last line
            line = f"{kernel_line(rec['kernel'])}\n{line}"
        return line
    return None


class Dashboard:
    def __init__(self, console: Console | None = None, snapshot=inventory.snapshot):
        self.console = console or Console(highlight=False, markup=False, emoji=False)
        self.live_mode = self.console.is_terminal
        self._snapshot = snapshot
        self.recent: deque[dict] = deque(maxlen=6)
        self.by_outcome: Counter = Counter()
        self.by_port: Counter = Counter()
        self.by_culprit: Counter = Counter()
        self.by_client: Counter = Counter()
        self.backend = "-"
        self.collisions = 0
        self.events = 0
        self.lost = 0
        self.rate = 0.0
        self._last = (time.monotonic(), 0)
        self.inventory: dict | None = None
        self._inv_at = float("-inf")
        self.live: Live | None = None
        self.summary: dict | None = None
        self.storm: dict | None = None  # the latest storm record: shown under the status line

    # -- the session's sink ------------------------------------------------------

    def write(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "ready":
            self.backend = rec["backend"]
        elif kind == "collision":
            self.collisions += 1
            self.recent.appendleft(rec)
            self.by_outcome[rec.get("outcome_detail") or rec["outcome"]] += 1
            self.by_port[rec["server"].rpartition(":")[2]] += 1
            self.by_culprit[culprit_of(rec)] += 1
            self.by_client[rec["client"].rpartition(":")[0]] += 1
            self._inv_at = float("-inf")  # the queues changed: look again
        elif kind == "summary":
            self.summary = rec
        elif kind == "storm":
            self.storm = rec
        if not self.live_mode:
            line = plain_line(rec)
            if line is not None:
                for part in line.split("\n"):
                    self.console.print(Text(inert(part)))
        elif self.live is not None:
            self.live.update(self.render())

    # -- the session loop ----------------------------------------------------------

    def start(self) -> None:
        if self.live_mode:
            self.live = Live(self.render(), console=self.console, screen=False, auto_refresh=False,
                             transient=False)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
            self.live.stop()
            self.live = None
            if self.summary is not None:
                for part in (plain_line(self.summary) or "").split("\n"):
                    self.console.print(Text(inert(part)))

    def tick(self, events: int, lost: int) -> None:
        now = time.monotonic()
        t0, n0 = self._last
        if now - t0 >= 1.0:
            self.rate = (events - n0) / (now - t0)
            self._last = (now, events)
        self.events, self.lost = events, lost
        if now - self._inv_at >= INVENTORY_EVERY_S:
            self._inv_at = now
            try:
                self.inventory = self._snapshot()
            except Exception:  # noqa: BLE001 - the dashboard goes on without it
                self.inventory = None
        if self.live is not None:
            self.live.update(self.render(), refresh=True)

    # -- drawing (80x24) -------------------------------------------------------------

    def _counter(self, title: str, counter: Counter) -> Table:
        t = Table(box=None, show_header=True, header_style="bold", pad_edge=False, width=19)
        t.add_column(title, overflow="ellipsis", no_wrap=True, max_width=14)
        t.add_column("n", justify="right", width=4)
        for name, n in counter.most_common(3):
            t.add_row(inert(name), str(n))
        return t

    def render(self) -> Group:
        # one line of an 80-column terminal, whatever the counts (a long one is cut, never wrapped)
        status = Text(
            f"top  backend {self.backend}  {self.rate:.0f} ev/s  {self.events} events  "
            f"{self.lost} lost  {self.collisions} collisions", style="bold reverse", no_wrap=True, overflow="ellipsis")
        storm = [Text(storm_line(self.storm), style="red bold")] if self.storm is not None else []
        counters = Table.grid(padding=(0, 1))
        counters.add_row(self._counter("outcome", self.by_outcome), self._counter("server port", self.by_port),
                         self._counter("culprit", self.by_culprit), self._counter("client", self.by_client))
        recent = Table(box=None, header_style="bold", pad_edge=False, title="recent collisions", title_justify="left")
        for col, width in (("#", 4), ("client -> server", 40), ("outcome", 18), ("penalty", 9)):
            recent.add_column(col, width=width, no_wrap=True, overflow="ellipsis")
        for rec in self.recent:
            pen = "-" if rec["penalty_ms"] is None else f"{rec['penalty_ms']:.1f} ms"
            recent.add_row(str(rec["id"]), inert(f"{rec['client']} -> {rec['server']}"),
                           inert(rec.get("outcome_detail") or rec["outcome"]), pen)
        sockets = Table(box=None, header_style="bold", pad_edge=False, title="CLOSE_WAIT and ghosts",
                        title_justify="left")
        for col, width in (("where", 30), ("who", 22), ("CLOSE_WAIT", 10), ("ghosts", 7)):
            sockets.add_column(col, width=width, no_wrap=True, overflow="ellipsis")
        inv = self.inventory or {}
        rows = 0
        for q in inv.get("listeners", [])[:2]:
            sockets.add_row(inert(q["listener"]), "listener", "-", f"{q['ghosts']}/{q['recv_q']}")
            rows += 1
        for g in inv.get("closewait", [])[:4 - rows]:
            who = g["comm"] if g["pid"] is None else f"{g['comm']} ({g['pid']})"
            sockets.add_row(inert(g["local"]), inert(who), str(g["count"]), "-")
        hint = Text("Ctrl-C to stop", style="dim")
        return Group(status, *storm, counters, recent, sockets, hint)
