"""A stage's sockets: its links to the neighbours and the coordinator, and sending on them.

K is this stage, 0-based:
  fwd_in   PULL bind     activations (or the coordinator's x) and labels for each batch
  fwd_out  PUSH connect  to stage K+1's fwd_in
  grad_in  PULL bind     dL/dh (lockstep) or the generator's target (decoupled) from stage K+1
  grad_out PUSH connect  to stage K-1's grad_in
  results  PUSH connect  to the coordinator: loss and eval sums (last stage), `done` (stage 0)
  control  DEALER        to the coordinator's ROUTER: hello, start, heartbeat, stats, stop

Under CURVE a message on a socket this stage binds is let in only if it came with the key of the
one peer who sends there (`security.Curve.refuses`).

Every send is bounded by `peer_timeout_s`: a peer that takes nothing for that long is lost.
"""

from __future__ import annotations

import zmq

from collections import deque

from dni_async.runtime import wire
from dni_async.runtime.flight import FlightRecorder
from dni_async.runtime.runspec import release_ipc
from dni_async.runtime.security import Curve


RECENT = 64     # steps remembered per link, for naming where a lost one was last seen


class PeerLost(RuntimeError):
    """The coordinator or a neighbour stopped answering."""


class StageLinks:
    def __init__(self, spec, rank: int, max_array_bytes: int, clock):
        self.spec, self.cfg, self.rank, self.clock = spec, spec.config, rank, clock
        self.max_array_bytes = max_array_bytes
        self.bad_messages = 0
        # the recent steps received (the stage notes them) and sent on each link, reported in
        # heartbeats: where a lost step was last seen
        self.seen = {"fwd_in": deque(maxlen=RECENT), "grad_in": deque(maxlen=RECENT)}
        self.sent = {"fwd_out": deque(maxlen=RECENT), "grad_out": deque(maxlen=RECENT)}
        self.drop_next = None      # fault injection: the step whose message on is discarded
        self.recorder = FlightRecorder()     # the last message events, sent with heartbeats
        ep, k, last = spec.endpoints, rank, rank == spec.config.n_stages - 1
        self.ctx = wire.make_context()
        socks = []
        timeout_ms = int(self.cfg.peer_timeout_s * 1000)
        self.curve = None
        if self.cfg.curve_keys:
            self.curve = Curve(self.cfg.curve_keys, f"stage-{k}")
            self.curve.start(self.ctx)

        def make(kind, peer=None, **kw):
            """peer None: this socket binds (a CURVE server); else it connects to `peer`."""
            s = wire.socket(self.ctx, kind, **kw)
            socks.append(s)
            if self.curve:
                self.curve.server(s) if peer is None else self.curve.client(s, peer)
            if kind != zmq.PULL:
                s.setsockopt(zmq.SNDTIMEO, timeout_ms)
            return s

        self.sockets = socks
        frame_cap = max(max_array_bytes, wire.DEFAULT_MAX_HEADER)
        self.fwd_in = make(zmq.PULL, max_msg_bytes=frame_cap)
        self.fwd_in.bind(ep["fwd_in"][k])
        self.grad_in = self.fwd_out = self.grad_out = None
        if not last:
            self.grad_in = make(zmq.PULL, max_msg_bytes=frame_cap)
            self.grad_in.bind(ep["grad_in"][k])
            self.fwd_out = make(zmq.PUSH, peer=f"stage-{k + 1}")
            self.fwd_out.connect(ep["fwd_in"][k + 1])
        if k > 0:
            self.grad_out = make(zmq.PUSH, peer=f"stage-{k - 1}")
            self.grad_out.connect(ep["grad_in"][k - 1])
        self.results = make(zmq.PUSH, peer="coordinator")
        self.results.connect(ep["results"])
        self.control = make(zmq.DEALER, peer="coordinator", max_msg_bytes=1 << 20)
        self.control.setsockopt(zmq.IDENTITY, f"stage-{k}".encode())
        self.control.connect(ep["control"])
        self.poller = zmq.Poller()
        for s in (self.control, self.fwd_in, self.grad_in):
            if s is not None:
                self.poller.register(s, zmq.POLLIN)
        # while a coupled stage waits for its gradient, queued batches must not wake it
        self.poller_without_batches = zmq.Poller()
        for s in (self.control, self.grad_in):
            if s is not None:
                self.poller_without_batches.register(s, zmq.POLLIN)
        # under CURVE, the one key that may send on each socket this stage binds
        self.senders = {self.fwd_in: "coordinator" if k == 0 else f"stage-{k - 1}"}
        if self.grad_in is not None:
            self.senders[self.grad_in] = f"stage-{k + 1}"
        # where each kind of message a stage's program sends goes
        self.route = {"fwd": self.fwd_out, "grad": self.grad_out, "loss": self.results,
                      "done": self.results, "evalres": self.results, "eval": self.fwd_out}
        # who is at the other end of each socket, for the flight recorder
        self.peer = {self.fwd_in: f"stage-{k - 1}" if k > 0 else "coordinator",
                     self.grad_in: f"stage-{k + 1}", self.fwd_out: f"stage-{k + 1}",
                     self.grad_out: f"stage-{k - 1}", self.results: "coordinator",
                     self.control: "coordinator"}

    def close(self) -> None:
        if self.curve:
            self.curve.stop()
        wire.close_all(self.ctx, self.sockets)
        ep = self.spec.endpoints
        release_ipc([ep["fwd_in"][self.rank], ep["grad_in"][self.rank]])

    def send(self, sock, kind, step=-1, arrays=(), meta=None) -> None:
        with self.clock.span("send", step):
            try:
                wire.send(sock, self.spec.run_id, kind, step, arrays, meta)
            except zmq.Again:
                raise PeerLost(f"stage {self.rank}: a peer took no {kind} message for "
                               f"{self.cfg.peer_timeout_s:.0f} s") from None
        if kind != "heartbeat":
            self.recorder.note("out", self.peer[sock], kind, step)

    def send_data(self, kind, step, arrays=(), meta=None) -> None:
        """A data-plane message, to wherever its kind goes."""
        if step == self.drop_next and kind in ("fwd", "loss"):
            self.drop_next = None
            self.recorder.note("dropped", self.peer[self.route[kind]], kind, step)
            return
        self.send(self.route[kind], kind, step, arrays, meta)
        if kind in ("fwd", "grad"):
            self.sent[f"{kind}_out"].append(step)

    def recent_steps(self) -> dict:
        return {k: list(v) for k, v in (*self.seen.items(), *self.sent.items())}

    def recv(self, sock):
        """One message, or None (counted) if it was not well-formed for this run or, under
        CURVE, came with another key than that of the one peer who sends on `sock`."""
        frames = wire.recv_frames(sock, 0)
        if frames is None:
            return None
        if self.curve and sock in self.senders:     # (a socket that connects has its server
            if self.curve.refuses(frames[0], self.senders[sock]):   # proven by the handshake)
                self.bad_messages += 1
                return None
        try:
            msg = wire.decode(frames, self.spec.run_id, max_array_bytes=self.max_array_bytes)
        except wire.WireError:
            self.bad_messages += 1
            return None
        if msg is not None and msg.kind != "heartbeat":
            self.recorder.note("in", self.peer[sock], msg.kind, msg.step)
        return msg

    @property
    def refused_keys(self) -> int:
        """Messages refused because their key was not their sender's (always 0 without CURVE)."""
        return self.curve.refused if self.curve else 0
