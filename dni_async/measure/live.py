"""Watching a run as it trains: the monitor stream (`runtime/monitor.py`) drawn with rich.

    Feed          a SUB socket on a run's stream and what it has heard: the latest snapshot, a
                  strip of each stage's recent activity, the latest glimpse, the log lines
    render(feed)  the full view, a rich renderable (tests render it to a string)
    LiveView      `train --live` and `watch` in a terminal: full screen, redrawn 4 times a second
    ProgressView  `train` in a terminal: a progress bar under the usual lines
    PlainView     no terminal (a pipe, CI): a plain line every few seconds

The colours are the Gantt pictures' (`measure.plots.COLORS`). Nothing here answers the run:
a view that stops, or falls behind, costs the run nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque

import zmq

from dni_async.measure.clock import CATEGORIES
from dni_async.measure.plots import COLORS
from dni_async.runtime import monitor

STRIP = 60            # columns of recent activity kept per stage
SHORT = {"forward": "fwd", "backward": "bwd", "update": "upd", "generator": "gen",
         "send": "send", "wait": "wait", "eval": "eval"}
BLOCKS = " ▁▂▃▄▅▆▇█"
SPARKS = "▁▂▃▄▅▆▇█"
REDRAW_S = 0.25


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


class Feed:
    """What a subscriber has heard of one run."""

    def __init__(self, endpoint: str | None, run_id: str | None, curve=None, server_key=None,
                 ctx=None):
        self.run_id = run_id
        self.ctx = ctx or zmq.Context.instance()
        self.sock = (monitor.subscribe(self.ctx, endpoint, curve, server_key)
                     if endpoint else None)
        self.snap: dict | None = None
        self.strips: list[deque] = []
        self.glimpse: dict | None = None
        self.log: deque = deque(maxlen=200)
        self.heard_at = None
        self.started = time.monotonic()

    @classmethod
    def for_run(cls, spec, ctx=None) -> "Feed":
        """The stream of a run from its plan (RunSpec), a CURVE client when the run has keys."""
        curve = server = None
        if spec.config.curve_keys:
            curve, server = _client_keys(spec.config.curve_keys)
        return cls(spec.endpoints.get("monitor"), spec.run_id, curve, server, ctx)

    @property
    def final(self) -> bool:
        return bool(self.snap) and self.snap["state"] in monitor.FINAL_STATES

    def poll(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for snapshots; True if any arrived."""
        if self.sock is None:
            time.sleep(timeout_s)
            return False
        got = False
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                snap = monitor.decode(frame, self.run_id)
                if snap is not None:
                    self.add(snap)
                    got = True
        return got

    def add(self, snap: dict) -> None:
        self.snap = snap
        self.heard_at = time.monotonic()
        while len(self.strips) < len(snap["stages"]):
            self.strips.append(deque(maxlen=STRIP))
        for strip, st in zip(self.strips, snap["stages"]):
            if st.get("fresh") and snap["state"] == "running":
                strip.append(st.get("shares") or {})
        if snap.get("glimpse"):
            self.glimpse = snap["glimpse"]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def _client_keys(folder: str):
    """A watcher's CURVE keys: its own ("watch") if made, else this host's process key."""
    import zmq.auth
    priv, pub = os.path.join(folder, "private"), os.path.join(folder, "public")
    names = ["watch", "coordinator"] + sorted(f[:-11] for f in os.listdir(priv)
                                              if f.endswith(".key_secret")) \
        if os.path.isdir(priv) else []
    for name in names:
        path = os.path.join(priv, f"{name}.key_secret")
        if os.path.exists(path):
            public, secret = zmq.auth.load_certificate(path)
            server, _ = zmq.auth.load_certificate(os.path.join(pub, "coordinator.key"))
            return (secret, public), server
    from dni_async.config import ConfigError
    raise ConfigError(f"no CURVE key in {priv} to watch this run with")


# -- drawing ----------------------------------------------------------------------------------

def spark(values, width: int) -> str:
    vals = [v for v in values if v is not None and v == v][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(7, int((v - lo) / span * 7.999))] for v in vals)


def _dominant(shares: dict, skip=("wait",)) -> str | None:
    work = {c: v for c, v in shares.items() if c not in skip and v > 0}
    return max(work, key=work.get) if work else None


def strip_text(strip, width: int):
    """A stage's recent heartbeats: height is the share not spent waiting, colour what it did
    most."""
    from rich.text import Text
    t = Text()
    cols = list(strip)[-width:]
    t.append(" " * (width - len(cols)))
    for shares in cols:
        active = 1.0 - shares.get("wait", 0.0)
        cat = _dominant(shares)
        ch = BLOCKS[max(1 if cat else 0, min(8, round(active * 8)))]
        t.append(ch, style=COLORS.get(cat, "grey50") if cat else "grey50")
    return t


def glimpse_window(g: dict, batches: int = 5):
    """A stretch of the glimpse showing about `batches` batches (from stage 0's forwards)."""
    t0, t1 = g["t0_us"], g["t1_us"]
    fwd = sorted(ts for c, ts, d, s in (g["stages"][0] if g["stages"] else ())
                 if c == "forward" and t0 <= ts < t1)
    if len(fwd) >= 2:
        gaps = sorted(b - a for a, b in zip(fwd, fwd[1:]))
        each = gaps[len(gaps) // 2]
        start = fwd[0]
        return start, min(t1, start + max(each * batches, 200.0))
    return t0, t1


def glimpse_lane(spans, start: float, end: float, width: int):
    """One stage's spans in [start, end) as `width` cells: the colour of what filled the cell
    most (waiting counts half, so short work shows), the batch number's last digit on work."""
    from rich.text import Text
    cell = (end - start) / width
    cover = [dict() for _ in range(width)]
    steps = [None] * width
    for cat, ts, dur, step in spans:
        a, b = max(ts, start), min(ts + dur, end)
        if b <= a:
            continue
        i0, i1 = int((a - start) / cell), min(width - 1, int((b - start) / cell))
        for i in range(i0, i1 + 1):
            lo, hi = start + i * cell, start + (i + 1) * cell
            part = (min(b, hi) - max(a, lo)) * (0.5 if cat == "wait" else 1.0)
            if part > 0:
                cover[i][cat] = cover[i].get(cat, 0.0) + part
                if cat not in ("wait", "send") and step is not None and step >= 0:
                    steps[i] = step
    t = Text()
    for i in range(width):
        if not cover[i]:
            t.append(" ")
            continue
        cat = max(cover[i], key=cover[i].get)
        if cat == "wait":
            t.append("·", style="grey42 on grey11")
        elif cat == "send":
            t.append("»", style=f"bold white on {COLORS[cat]}")
        else:
            digit = str(steps[i] % 10) if steps[i] is not None else " "
            t.append(digit, style=f"bold white on {COLORS[cat]}")
    return t


def legend():
    from rich.text import Text
    t = Text()
    for cat in CATEGORIES:
        if cat == "wait":
            t.append(" · ", style="grey42 on grey11")
        elif cat == "send":
            t.append(" » ", style=f"bold white on {COLORS[cat]}")
        else:
            t.append("   ", style=f"on {COLORS[cat]}")
        t.append(f" {cat}  ")
    t.append(" digits: batch (last digit); blank: in no span", style="dim")
    return t


def _pct(v) -> str:
    return "  -" if v is None else f"{v:4.0%}"


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def render(feed: Feed, width: int = 160, log_lines: int = 4):
    """The whole view of what `feed` has heard."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    s = feed.snap
    if s is None:
        waited = time.monotonic() - feed.started
        return Panel(Text(f"waiting for the run's monitor stream ({waited:.0f} s)..."),
                     title="dni-async", width=width)
    total = s["epochs"] * s["batches_per_epoch"]
    done = s["completed_batches"]
    rate = s["samples_per_s"]
    left = (total - done) * s["batch_size"] / rate if rate > 0 else None
    state = {"running": "", "done": " · done", "interrupted": " · interrupted",
             "failed": " · FAILED"}[s["state"]]
    head = Text.assemble(
        (f"{s['mode']}", "bold"), f" · {s['n_stages']} stage processes · epoch ",
        (f"{s['epoch']}/{s['epochs']}", "bold"),
        f" · batch {s['batch']}/{s['batches_per_epoch']} · in flight ",
        (f"{s['in_flight']}/{s['max_in_flight']}", "bold"),
        f" · {rate:,.0f} samples/s · {_duration(s['elapsed_s'])} elapsed"
        + (f" · ETA {_duration(left)}" if left is not None and s["state"] == "running" else "")
        + state)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(1, total), completed=done, width=max(10, width - 30)),
                Text(f"{done / max(1, total):6.1%} of {total:,} batches"))
    rec = s.get("recent") or []
    sw = max(10, min(60, (width - 70) // 2))
    curves = Text.assemble(
        ("loss ", "bold"), (spark([r[1] for r in rec] + [s["loss"]], sw), "cyan"),
        f" {s['loss']:.5f}" if s["loss"] is not None else " -",
        ("   train bit acc ", "bold"), (spark([r[2] for r in rec] + [s["bit_acc"]], sw), "green"),
        f" {s['bit_acc']:.4f}" if s["bit_acc"] is not None else " -",
        ("   held-out ", "bold"),
        f"{s['test_bit_acc']:.4f}" if s["test_bit_acc"] is not None else "-")

    strip_w = max(10, min(STRIP, width - 110))
    lanes = Table(box=None, padding=(0, 1), expand=False, show_edge=False)
    lanes.add_column("stage", style="bold")
    lanes.add_column(f"last {strip_w} heartbeats", no_wrap=True)
    lanes.add_column("busy", justify="right")
    for cat in CATEGORIES:
        lanes.add_column(SHORT[cat], justify="right", style=COLORS[cat] if cat != "wait" else "grey62")
    lanes.add_column("batches", justify="right")
    lanes.add_column("held", justify="right")
    lanes.add_column("pending", justify="right")
    lanes.add_column("lag", justify="right")
    lanes.add_column("dropped", justify="right")
    for k, st in enumerate(s["stages"]):
        sh = st.get("shares") or {}
        lag = "-" if st.get("lag_mean") is None else f"{st['lag_mean']:.1f}≤{st['lag_max']}"
        lanes.add_row(f"stage {k}", strip_text(feed.strips[k] if k < len(feed.strips) else (),
                                               strip_w),
                      _pct(st.get("busy")), *(_pct(sh.get(c)) for c in CATEGORIES),
                      f"{st.get('batches', 0):,}", str(st.get("held", 0)), str(st.get("pending", 0)),
                      lag, str(st.get("targets_dropped", 0)))

    parts = [head, bar, curves, Text(""), lanes]
    g = feed.glimpse
    if g and len(g["stages"]) == s["n_stages"]:
        a, b = glimpse_window(g)
        gw = max(20, width - 14)
        zoom = Table.grid(padding=(0, 1))
        for k, spans in enumerate(g["stages"]):
            zoom.add_row(Text(f"stage {k}", style="bold"), glimpse_lane(spans, a, b, gw))
        when = time.strftime("%H:%M:%S", time.localtime(g["t0_us"] / 1e6))
        parts += [Text(""),
                  Text(f"one moment, every stage on the same clock: {(b - a) / 1000:.1f} ms at "
                       f"{when} (a new one every second)", style="bold"), zoom]
    parts += [Text(""), legend()]
    if feed.log and log_lines:
        parts += [Text(""), *(Text(line, style="dim") for line in list(feed.log)[-log_lines:])]
    return Panel(Group(*parts), title=f"dni-async · run {s['run']}", width=width)


def plain_line(s: dict) -> str:
    """One line of the same, for a pipe or CI."""
    total = s["epochs"] * s["batches_per_epoch"]
    stages = " | ".join(
        f"stage {st['rank']} busy {st['busy']:.0%} wait {st['shares'].get('wait', 0):.0%}"
        for st in s["stages"])
    loss = "-" if s["loss"] is None else f"{s['loss']:.5f}"
    return (f"live: {s['state']} epoch {s['epoch']}/{s['epochs']} batch "
            f"{s['completed_batches']:,}/{total:,} in flight {s['in_flight']}/"
            f"{s['max_in_flight']} {s['samples_per_s']:,.0f} samples/s loss {loss} | {stages}")


# -- the views --------------------------------------------------------------------------------

class View:
    """Polls a feed from the supervisor's (or `watch`'s) loop: `tick(seconds)` replaces a sleep."""
    captures_output = False     # whether the coordinator's lines should come through `say`

    def __init__(self, feed: Feed):
        self.feed = feed

    def say(self, line: str, **_) -> None:
        self.feed.log.append(line)

    def tick(self, timeout_s: float) -> None:
        self.feed.poll(timeout_s)

    def close(self) -> None:
        self.feed.close()


class LiveView(View):
    captures_output = True

    def __init__(self, feed: Feed, console=None):
        super().__init__(feed)
        from rich.console import Console
        from rich.live import Live
        self.console = console or Console()
        self.live = Live(console=self.console, screen=True, auto_refresh=False,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()
        self.drawn = 0.0
        self.lines: list[str] = []

    def say(self, line: str, **_) -> None:
        super().say(line)
        self.lines.append(line)

    def tick(self, timeout_s: float) -> None:
        self.feed.poll(timeout_s)
        now = time.monotonic()
        if self.live is not None and now - self.drawn >= REDRAW_S:
            self.drawn = now
            width = min(self.console.width, 200)
            self.live.update(render(self.feed, width, log_lines=max(
                0, self.console.height - 15 - 2 * len(self.feed.strips))), refresh=True)

    def close(self) -> None:
        """Leave the full screen; what the coordinator printed meanwhile is printed now."""
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()
            for line in self.lines:
                self.console.print(line, markup=False, highlight=False)
            self.lines = []
        super().close()


class ProgressView(View):
    captures_output = True

    def __init__(self, feed: Feed, console=None):
        super().__init__(feed)
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self.console = console or Console()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("batches"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[extra]}"), console=self.console,
                                 transient=True)
        self.task = self.progress.add_task("starting", total=None, extra="")
        self.progress.start()

    def say(self, line: str, **_) -> None:
        self.progress.console.print(line, markup=False, highlight=False)

    def tick(self, timeout_s: float) -> None:
        if self.feed.poll(timeout_s):
            s = self.feed.snap
            loss = "" if s["loss"] is None else f"loss {s['loss']:.5f}"
            self.progress.update(self.task, description=f"{s['mode']} epoch {s['epoch']}/"
                                 f"{s['epochs']}", total=s["epochs"] * s["batches_per_epoch"],
                                 completed=s["completed_batches"],
                                 extra=f"{s['samples_per_s']:,.0f} samples/s  {loss}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        super().close()


class PlainView(View):
    """No terminal: a plain line every `every_s` seconds, and the last one."""

    def __init__(self, feed: Feed, every_s: float = 2.0, out=None):
        super().__init__(feed)
        self.every_s, self.out = every_s, out or sys.stdout
        self.said_at = time.monotonic()
        self.said_final = False

    def tick(self, timeout_s: float) -> None:
        self.feed.poll(timeout_s)
        s = self.feed.snap
        if s is None:
            return
        now = time.monotonic()
        if (self.feed.final and not self.said_final) or now - self.said_at >= self.every_s:
            self.said_final = self.feed.final
            self.said_at = now
            print(plain_line(s), file=self.out, flush=True)


class epoch_bar:
    """A progress bar over epochs (or runs) for a long command, in a terminal; elsewhere its
    `say` is print and `advance` does nothing. Lines said go above the bar."""

    def __init__(self, description: str, total: int, enabled: bool = True, unit: str = "epochs"):
        self.description, self.total = description, total
        self.progress = None
        if enabled and is_terminal():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn(unit),
                                     TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False

    def say(self, line: str, **_) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)


def make_view(spec, live: bool, quiet: bool = False) -> View | None:
    """The view for `train` of the run `spec` (RunSpec): --live full screen in a terminal, plain
    lines without one; else a progress bar in a terminal, nothing without."""
    terminal = is_terminal()
    if not spec.endpoints.get("monitor") or not (live or (terminal and not quiet)):
        return None
    feed = Feed.for_run(spec)
    if live:
        return LiveView(feed) if terminal else PlainView(feed)
    return ProgressView(feed)
