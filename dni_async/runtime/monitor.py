"""The monitor stream: the coordinator publishes the state of the run, a few times a second.

    endpoint   config.json's endpoints["monitor"]: the coordinator binds a PUB socket there
               (a CURVE server when the run has keys); anyone may SUBscribe, nobody answers,
               and a subscriber that falls behind loses snapshots, never slows the run.
    message    one frame, a msgpack map: a snapshot.

A snapshot (`v` 1):

    v, run            format version; the run id (as in config.json)
    seq, time         a counter from 0; Unix seconds when it was taken
    state             "running", then once "done", "interrupted" or "failed"
    mode, n_stages, epochs, batches_per_epoch, batch_size, max_in_flight
    epoch, batch      the epoch being trained (counted from 1, as in metrics.csv) and its next
                      batch (0..batches_per_epoch)
    completed_batches batches finished since the start (all of them at "done")
    in_flight         steps sent and not yet finished (the credits in use)
    samples_per_s     over the last few seconds; elapsed_s: seconds since the coordinator began
    loss, bit_acc, exact_acc   running figures over the current epoch's finished batches (or
                      the last epoch's when a new one has none yet); None before any
    test_bit_acc, test_exact_acc   the latest held-out evaluation, or None
    recent            the last epochs' history: [[epoch, loss, train_bit_acc, test_bit_acc], ...]
    bad_messages      dropped at the coordinator
    stages            one map per stage, in rank order:
        rank, batches     training batches it has taken (from its latest heartbeat; at "done"
                          from its final report)
        shares            {category: share of its wall time} over the heartbeats that arrived
                          since the previous snapshot (at "done": over the whole run); the
                          categories of `measure.clock.CATEGORIES`; each in [0, 1], their sum
                          at most 1 (the rest was not inside any span)
        busy              the shares of computing (all but send and wait) summed
        fresh             False when no heartbeat came since the previous snapshot: the shares
                          repeat the previous ones
        window_s          the wall seconds the shares cover
        held, pending     lockstep: batches held until their gradient returns; decoupled:
                          batches whose generator target is still out
        lag_mean, lag_max target lag: own updates before a generator target arrives (None
                          before any target)
        targets_dropped   generator targets thrown away (late, or of an evicted batch)
        age_s             seconds since its last heartbeat
    glimpse           only in snapshots taken after a new one completed: every stage's spans in
                      the same short window of wall-clock time (GLIMPSE_S long, every
                      GLIMPSE_EVERY_S), {t0_us, t1_us, stages: [[[category, start_us, dur_us,
                      step], ...] per rank]}, start times in Unix microseconds; lockstep shows
                      there as a staircase, decoupled modes as stages busy at once

Stages put what the monitor needs beside what their heartbeats already carry (`beat_extras`):
the wall seconds and per-category seconds since their previous heartbeat, held and pending
counts, their target counters, and a finished glimpse when they have one.
"""

from __future__ import annotations

import math
import time
from collections import deque

import msgpack
import zmq

from dni_async.measure.clock import CATEGORIES
from dni_async.nn import metrics

VERSION = 1
PUBLISH_EVERY_S = 0.25
GLIMPSE_EVERY_S = 1.0
GLIMPSE_S = 0.05
RECENT_EPOCHS = 120
COMPUTE = tuple(c for c in CATEGORIES if c not in ("send", "wait"))
FINAL_STATES = ("done", "interrupted", "failed")


# -- the stage's side -------------------------------------------------------------------------

def beat_extras(clock, held: int, pending: int, counters: dict) -> dict:
    """What a stage adds to its heartbeat for the monitor; arms its next glimpse."""
    wall, times = clock.deltas()
    out = {"wall": wall, "times": times, "held": held, "pending": pending,
           "counters": dict(counters)}
    if clock.glimpse_done():
        out["glimpse"] = clock.take_glimpse()
    if not clock.armed():   # the next grid point, the same for every process on the clock
        clock.arm(math.ceil(time.time() / GLIMPSE_EVERY_S + 0.05) * GLIMPSE_EVERY_S, GLIMPSE_S)
    return out


# -- the coordinator's side -------------------------------------------------------------------

def _num(v, default=0.0):
    return v if type(v) in (int, float) and v == v and abs(v) != math.inf else default


def absorb(live: dict, rank: int, meta: dict) -> None:
    """File one heartbeat's numbers (checked: a heartbeat is input like any other)."""
    s = live.setdefault(rank, {"wall": 0.0, "times": {}, "glimpses": {}})
    s["at"] = time.monotonic()
    for k in ("batches", "held", "pending"):
        if type(meta.get(k)) is int:
            s[k] = meta[k]
    c = meta.get("counters")
    if isinstance(c, dict):
        s["counters"] = {k: v for k, v in c.items() if isinstance(k, str) and type(v) is int}
    times = meta.get("times")
    wall = _num(meta.get("wall"))
    if isinstance(times, dict) and wall > 0:
        s["wall"] += wall
        for k, v in times.items():
            if k in CATEGORIES:
                s["times"][k] = s["times"].get(k, 0.0) + max(0.0, _num(v))
    g = meta.get("glimpse")
    if isinstance(g, dict) and isinstance(g.get("spans"), list):
        t0 = _num(g.get("t0_us"))
        spans = [sp for sp in g["spans"][:2000]
                 if isinstance(sp, list) and len(sp) == 4 and sp[0] in CATEGORIES
                 and all(type(x) in (int, float) for x in sp[1:])]
        s["glimpses"][t0] = (_num(g.get("t1_us")), spans)
        while len(s["glimpses"]) > 4:
            del s["glimpses"][min(s["glimpses"])]


class Monitor:
    """The coordinator's PUB socket and what it publishes."""

    def __init__(self, ctx, endpoint: str, curve=None):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 50)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve:
            curve.server(self.socket)
        self.socket.bind(endpoint)
        self.seq = 0
        self.next_at = 0.0
        self.started = time.monotonic()
        self.rates = deque(maxlen=16)          # (monotonic, completed batches)
        self.shares: dict[int, dict] = {}      # each stage's latest shares
        self.glimpse_at = 0.0                  # t0 of the last glimpse published

    def maybe_publish(self, coord) -> None:
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + PUBLISH_EVERY_S
            self.publish(coord)

    def publish(self, coord, state: str = "running") -> None:
        try:
            self.socket.send(msgpack.packb(self.snapshot(coord, state)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass     # no room: a subscriber that falls behind loses snapshots
        self.seq += 1

    def close_slowly(self, wait_s: float = 0.3) -> None:
        """Leave a moment for a final snapshot to reach the subscribers before closing."""
        self.socket.close(linger=int(wait_s * 1000))

    def snapshot(self, coord, state: str) -> dict:
        cfg, st, credits = coord.cfg, coord.state, coord.credits
        now = time.monotonic()
        done = credits.completed_batches
        self.rates.append((now, done))
        t0, d0 = next(((t, d) for t, d in self.rates if now - t <= 3.0), self.rates[-1])
        rate = (done - d0) * cfg.batch_size / (now - t0) if now > t0 else 0.0
        sums = st.epoch_sums if st.epoch_sums and st.epoch_sums.get("n") else None
        running = metrics.summarize(sums, "train") if sums else {}
        if not running and st.history:
            h = st.history[-1]
            running = {"train_loss": h["loss"], "train_bit_acc": h["train_bit_acc"],
                       "train_exact_acc": h["train_exact_acc"]}
        test = next((h for h in reversed(st.history) if h.get("test_bit_acc") is not None), {})
        snap = {
            "v": VERSION, "run": coord.spec.run_id, "seq": self.seq, "time": time.time(),
            "state": state, "mode": cfg.mode, "n_stages": coord.n, "epochs": cfg.epochs,
            "batches_per_epoch": cfg.batches_per_epoch(), "batch_size": cfg.batch_size,
            "max_in_flight": credits.limit // credits.pieces,
            "epoch": (min(st.epoch, cfg.epochs - 1) if st.next_batch == 0 else st.epoch) + 1,
            "batch": st.next_batch, "completed_batches": done, "in_flight": len(credits),
            "samples_per_s": rate, "elapsed_s": now - self.started,
            "loss": running.get("train_loss"), "bit_acc": running.get("train_bit_acc"),
            "exact_acc": running.get("train_exact_acc"),
            "test_bit_acc": test.get("test_bit_acc"), "test_exact_acc": test.get("test_exact_acc"),
            "recent": [[h["epoch"], h["loss"], h["train_bit_acc"], h.get("test_bit_acc")]
                       for h in st.history[-RECENT_EPOCHS:]],
            "bad_messages": coord.bad_messages + coord.control.bad_messages,
            "stages": [self._stage(coord, k, now, state) for k in range(coord.n)],
        }
        g = self._glimpse(coord.control.live, coord.n)
        if g is not None:
            snap["glimpse"] = g
        return snap

    def _stage(self, coord, k: int, now: float, state: str) -> dict:
        s = coord.control.live.get(k, {})
        final = coord.control.stats.get(k) if state == "done" else None
        counters = (final or {}).get("counters") or s.get("counters") or {}
        if final:
            wall = final["wall"]
            times = {c: v for c, v in final["times"].items() if c in CATEGORIES}
        else:
            wall, times = s.get("wall", 0.0), s.get("times", {})
        fresh = wall > 0
        if fresh:
            shares = {c: min(1.0, v / wall) for c, v in times.items()}
            total = sum(shares.values())
            if total > 1.0:          # heartbeat intervals and spans can straddle each other
                shares = {c: v / total for c, v in shares.items()}
            self.shares[k] = shares
            s["wall"], s["times"] = 0.0, {}
        shares = self.shares.get(k, {})
        applied = counters.get("targets_applied", 0)
        return {
            "rank": k, "batches": (final or s).get("batches", 0), "shares": shares,
            "busy": sum(v for c, v in shares.items() if c in COMPUTE), "fresh": fresh,
            "window_s": wall, "held": s.get("held", 0), "pending": s.get("pending", 0),
            "lag_mean": counters.get("target_lag_sum", 0) / applied if applied else None,
            "lag_max": counters.get("target_lag_max") if applied else None,
            "targets_dropped": counters.get("targets_dropped", 0),
            "age_s": now - s["at"] if "at" in s else None,
        }

    def _glimpse(self, live: dict, n: int):
        """The newest window every stage has reported, if not yet published."""
        common = None
        for k in range(n):
            have = set(live.get(k, {}).get("glimpses", {}))
            common = have if common is None else common & have
        fresh = [t for t in (common or ()) if t > self.glimpse_at]
        if not fresh:
            return None
        t0 = max(fresh)
        self.glimpse_at = t0
        return {"t0_us": t0, "t1_us": live[0]["glimpses"][t0][0],
                "stages": [live[k]["glimpses"][t0][1] for k in range(n)]}


# -- a subscriber -----------------------------------------------------------------------------

def subscribe(ctx, endpoint: str, curve=None, server_key=None) -> zmq.Socket:
    """A SUB socket on a run's monitor stream (`curve`, `server_key`: a CURVE client)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
    sock.setsockopt(zmq.RCVHWM, 100)
    if curve is not None:
        sock.curve_secretkey, sock.curve_publickey = curve
        sock.curve_serverkey = server_key
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def decode(frame: bytes, run_id: str | None = None):
    """A snapshot, or None if the frame is not one (of this run)."""
    try:
        snap = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:       # noqa: BLE001 - anything malformed is simply not a snapshot
        return None
    if not isinstance(snap, dict) or snap.get("v") != VERSION:
        return None
    if run_id is not None and snap.get("run") != run_id:
        return None
    if not isinstance(snap.get("stages"), list):
        return None
    return snap
