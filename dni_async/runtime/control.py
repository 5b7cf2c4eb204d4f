"""The coordinator's control plane: one ROUTER that every stage's DEALER connects to.

Stages say hello, send heartbeats from their own loops, confirm checkpoints and send their
final stats here; the coordinator sends start, heartbeats, checkpoint and stop. A stage that
stays silent for `peer_timeout_s` is reported lost, so a stuck loop is caught as surely as a
dead process.

A stage is who its key says (under CURVE, `security.Curve.refuses`), and its routing name must
be exactly "stage-K": a message under another stage's name, under a spelling of one ("stage-01"),
or whose `rank` disagrees with its name is refused and counted, and changes nothing.
"""

from __future__ import annotations

import time

import zmq

from dni_async.runtime import flight, wire
from dni_async.runtime.monitor import absorb
from dni_async.runtime.write_budget import WriteBudget


LINKS = ("fwd_in", "grad_in", "fwd_out", "grad_out")   # a heartbeat's recent steps per link


class StageLost(RuntimeError):
    """A stage died, hung, or failed; the message names it."""


class ControlPlane:
    def __init__(self, ctx, spec, curve=None, recorder: flight.FlightRecorder | None = None):
        self.spec, self.cfg, self.n = spec, spec.config, spec.config.n_stages
        self.socket = wire.socket(ctx, zmq.ROUTER, max_msg_bytes=1 << 20)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDTIMEO, int(self.cfg.peer_timeout_s * 1000))
        self.curve = curve
        # rank by routing name, "stage-K" exactly (not "stage-01", "stage- 1", "stage-1_0")
        self.ranks = {f"stage-{k}".encode(): k for k in range(self.n)}
        if curve:
            curve.server(self.socket)
        self.socket.bind(spec.endpoints["control"])
        self.last_seen: dict[int, float] = {}
        self.pids: dict[int, int] = {}
        self.stats: dict[int, dict] = {}     # each stage's final report
        self.acks: dict[int, dict] = {}      # checkpoint confirmations
        self.writes = WriteBudget(self.cfg.peer_timeout_s)   # how long snapshots may take
        self.seen: dict[int, dict] = {}      # each stage's last heartbeat: steps in and out
        self.live: dict[int, dict] = {}      # from heartbeats, for the monitor: per-category
                                             # time deltas not yet published, counts, glimpses
        self.reports = flight.Reports()      # each stage's latest flight report
        self.recorder = recorder or flight.FlightRecorder()   # the coordinator's own events
        self.bad_messages = 0
        self.next_beat = float("inf")        # no heartbeats before the start
        self.next_greeting = 0.0             # but beats to those who said hello (beat_greeted)

    def to_stage(self, rank: int, kind: str, meta=None) -> None:
        frames = wire.encode(self.spec.run_id, kind, -1, (), meta)
        try:
            self.socket.send_multipart([f"stage-{rank}".encode(), *frames])
        except zmq.ZMQError as exc:   # unroutable (stage gone) or send timeout
            raise StageLost(f"stage {rank} is unreachable ({exc.strerror})") from None
        if kind != "heartbeat":
            self.recorder.note("out", f"stage-{rank}", kind, -1)

    def broadcast(self, kind: str, meta=None) -> None:
        for k in range(self.n):
            self.to_stage(k, kind, meta)

    def try_stop_all(self) -> None:
        """Best effort: tell every stage to stop, without waiting for answers."""
        for k in range(self.n):
            try:
                self.to_stage(k, "stop")
            except (StageLost, zmq.ZMQError):
                pass

    def on_message(self) -> None:
        """Read one message from a stage and file what it says."""
        frames = self.socket.recv_multipart(copy=False)
        try:
            msg = wire.decode(frames[1:], self.spec.run_id, max_array_bytes=0)
        except wire.WireError:
            self.bad_messages += 1
            return
        rank = self.ranks.get(frames[0].bytes)
        if (rank is None or msg.meta.get("rank", rank) != rank
                or (self.curve and self.curve.refuses(frames[1], f"stage-{rank}"))):
            self.bad_messages += 1
            return
        self.last_seen[rank] = time.monotonic()
        if msg.kind != "heartbeat":
            self.recorder.note("in", f"stage-{rank}", msg.kind, msg.step)
        if msg.kind == "hello":
            self.pids[rank] = msg.meta.get("pid")
            self.writes.note_size(rank, msg.meta.get("snapshot_bytes"))
        elif msg.kind == "stats" and _valid_stats(msg.meta):
            self.stats[rank] = msg.meta
            self.reports.absorb(rank, msg.meta)
        elif msg.kind == "ack" and all(isinstance(msg.meta.get(k), str) for k in ("file", "sha256")):
            self.acks[rank] = msg.meta
            self.writes.note_write(msg.meta.get("bytes"), msg.meta.get("seconds"))
        elif msg.kind == "error":
            raise StageLost(f"stage {rank} failed: {msg.meta.get('message', '?')}")
        elif msg.kind == "heartbeat":
            self.seen[rank] = {k: v for k, v in msg.meta.items() if k in LINKS
                               and isinstance(v, list) and all(type(s) is int for s in v)}
            absorb(self.live, rank, msg.meta)
            self.reports.absorb(rank, msg.meta)
        else:
            self.bad_messages += 1

    def beat_greeted(self) -> None:
        """Before the start, heartbeats to the stages that have said hello: each can then tell
        a coordinator still waiting for the others' hellos from one that has stopped."""
        now = time.monotonic()
        if now >= self.next_greeting:
            for k in list(self.pids):
                self.to_stage(k, "heartbeat")
            self.next_greeting = now + self.cfg.heartbeat_s

    def start(self) -> None:
        """Start every stage; from now on each must be heard every `peer_timeout_s`. Stages
        send nothing between their hello and the start, so silence counts from here: a stage
        that said hello long before the last one did is not silent."""
        self.broadcast("start")
        now = time.monotonic()
        self.last_seen = {k: now for k in range(self.n)}
        self.next_beat = now + self.cfg.heartbeat_s

    def beat_and_check(self, last_step: int) -> None:
        """Heartbeats out when due; a stage silent for too long ends the run."""
        now = time.monotonic()
        if now >= self.next_beat:
            self.broadcast("heartbeat")
            self.next_beat = now + self.cfg.heartbeat_s
        for k in range(self.n):
            if now - self.last_seen.get(k, now) > self.cfg.peer_timeout_s:
                raise StageLost(f"stage {k} has been silent for {now - self.last_seen[k]:.1f} s "
                                f"(last completed step {last_step})")

    def last_words(self, wait_s: float) -> None:
        """After a failure: tell every stage to stop, and wait up to `wait_s` for the final
        report of each one that can still answer (its events then end at the failure)."""
        asked = []
        for k in range(self.n):
            try:
                self.to_stage(k, "stop")
                asked.append(k)
            except StageLost:
                pass
        deadline = time.monotonic() + wait_s
        while any(k not in self.stats for k in asked) and time.monotonic() < deadline:
            if self.socket.poll(50):
                try:
                    self.on_message()
                except StageLost:
                    pass

    def missing(self, have: dict) -> str:
        """The stages not in `have`, as a failure names them: "stage 1", "stages 0, 2"."""
        ranks = sorted(set(range(self.n)) - set(have))
        return ("stage " if len(ranks) == 1 else "stages ") + ", ".join(map(str, ranks))

    def collect_stats(self) -> None:
        """Tell every stage to stop and wait (bounded) for each one's final stats (each saves
        its weights first)."""
        self.broadcast("stop")
        deadline = time.monotonic() + self.writes.deadline_s()
        while len(self.stats) < self.n and time.monotonic() < deadline:
            if self.socket.poll(100):
                self.on_message()
        if len(self.stats) < self.n:
            raise StageLost(f"{self.missing(self.stats)} sent no final stats")


def trail(step: int, seen: dict, n: int) -> str:
    """Where a step was last seen, from the stages' heartbeats (the recent steps on each link):
    who received it, who sent it on."""
    parts = []
    for k in range(n):
        s = seen.get(k)
        if s is None:
            parts.append(f"stage {k}: no report")
            continue

        def has(link, default=False):
            steps = s.get(link)
            return default if steps is None else step in steps
        got_fwd = has("fwd_in")
        sent_fwd = k == n - 1 or has("fwd_out")
        got_grad = k == n - 1 or has("grad_in")
        sent_grad = k == 0 or has("grad_out")
        if not got_fwd:
            parts.append(f"stage {k}: did not receive it")
        elif not sent_fwd:
            parts.append(f"stage {k}: received it, did not send it on")
        elif k > 0 and sent_grad and not got_grad:      # decoupled: its target went upstream
            parts.append(f"stage {k}: sent it on and a target upstream, no gradient back")
        elif not got_grad:
            parts.append(f"stage {k}: sent it on, no gradient back")
        elif not sent_grad:
            parts.append(f"stage {k}: got its gradient, sent none upstream")
        else:
            parts.append(f"stage {k}: passed it on" + (" both ways" if k < n - 1 else ""))
    return "; ".join(parts)


def _valid_stats(meta: dict) -> bool:
    """A stage's final report, before the summary relies on it."""
    num = (int, float)
    return (isinstance(meta.get("weights_sha256"), str) and isinstance(meta.get("rank"), int)
            and type(meta.get("busy")) in num and type(meta.get("wall")) in num
            and type(meta.get("bad_messages")) is int and isinstance(meta.get("counters"), dict)
            and isinstance(meta.get("times"), dict))
