"""One stage process: one layer, its sockets, and the loop that moves its batches.

    dni-async stage RUN_DIR/config.json --rank K

Sockets (K is this stage, 0-based):
  fwd_in   PULL bind     activations (or the coordinator's x) and labels for each batch
  fwd_out  PUSH connect  to stage K+1's fwd_in
  grad_in  PULL bind     dL/dh (lockstep) or the generator's target (decoupled) from stage K+1
  grad_out PUSH connect  to stage K-1's grad_in
  results  PUSH connect  to the coordinator: loss and eval sums (last stage), `done` (stage 0)
  control  DEALER        to the coordinator's ROUTER: hello, start, heartbeat, stats, stop

In lockstep modes a stage keeps each batch's input and output until its gradient comes back.
In dni/cdni it sends its output on, updates from its own synthetic gradient at once, and
trains its generator whenever the matching target arrives.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import zmq

from dni_async.runtime import checkpoint
from dni_async.nn import metrics
from dni_async.nn import network
from dni_async.runtime import wire
from dni_async.config import ConfigError
from dni_async.runtime.runspec import EVAL_CHUNK, RunSpec, release_ipc
from dni_async.runtime.security import Curve
from dni_async.measure.clock import Clock

EXIT_PEER_LOST = 3


class PeerLost(RuntimeError):
    """The coordinator or a neighbour stopped answering."""


class Stage:
    def __init__(self, spec: RunSpec, rank: int):
        cfg = spec.config
        if not 0 <= rank < cfg.n_stages:
            raise ConfigError(f"rank {rank} is outside 0..{cfg.n_stages - 1}")
        self.spec, self.cfg, self.rank = spec, cfg, rank
        self.n = cfg.n_stages
        self.last = rank == self.n - 1
        _, rng = network.load_data_and_rng(cfg)
        self.model = network.build(cfg, rng, ranks=[rank])[0]
        if spec.resume_from:
            path = os.path.join(spec.resume_from, f"stage-{rank}.npz")
            try:
                self.model.load(checkpoint.load_arrays(path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"stage {rank}: cannot resume from {path}: {exc}") from None
        self.clock = Clock(record_spans=spec.trace)
        self.bad_messages = 0
        self.waiting: dict[int, tuple] = {}     # lockstep: step -> (cache, h) until its gradient
        self.batches = 0
        self.stopping = False
        # the largest array this stage can legitimately receive: anything larger is refused
        rows = max(cfg.batch_size, min(EVAL_CHUNK, max(cfg.n_train, cfg.n_test)))
        self.max_array_bytes = rows * max(cfg.widths) * np.dtype(cfg.dtype).itemsize
        self.fault = Fault.from_env(rank)
        if self.fault:
            self.fault.maybe_fire(0)
        self._open_sockets()

    # -- sockets --------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        ep, k = self.spec.endpoints, self.rank
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
            return s

        frame_cap = max(self.max_array_bytes, wire.DEFAULT_MAX_HEADER)
        self.fwd_in = make(zmq.PULL, max_msg_bytes=frame_cap)
        self.fwd_in.bind(ep["fwd_in"][k])
        self.grad_in = None
        if not self.last:
            self.grad_in = make(zmq.PULL, max_msg_bytes=frame_cap)
            self.grad_in.bind(ep["grad_in"][k])
        self.fwd_out = self.grad_out = None
        if not self.last:
            self.fwd_out = make(zmq.PUSH, peer=f"stage-{k + 1}")
            self.fwd_out.setsockopt(zmq.SNDTIMEO, timeout_ms)
            self.fwd_out.connect(ep["fwd_in"][k + 1])
        if k > 0:
            self.grad_out = make(zmq.PUSH, peer=f"stage-{k - 1}")
            self.grad_out.setsockopt(zmq.SNDTIMEO, timeout_ms)
            self.grad_out.connect(ep["grad_in"][k - 1])
        self.results = make(zmq.PUSH, peer="coordinator")
        self.results.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.results.connect(ep["results"])
        self.control = make(zmq.DEALER, peer="coordinator", max_msg_bytes=1 << 20)
        self.control.setsockopt(zmq.IDENTITY, f"stage-{k}".encode())
        self.control.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.control.connect(ep["control"])
        self.sockets = socks
        self.poller = zmq.Poller()
        for s in (self.control, self.fwd_in, self.grad_in):
            if s is not None:
                self.poller.register(s, zmq.POLLIN)

    def close(self) -> None:
        if self.curve:
            self.curve.stop()
        wire.close_all(self.ctx, self.sockets)
        ep = self.spec.endpoints
        release_ipc([ep["fwd_in"][self.rank], ep["grad_in"][self.rank]])

    def _send(self, sock, kind, step=-1, arrays=(), meta=None) -> None:
        with self.clock.span("send", step):
            try:
                wire.send(sock, self.spec.run_id, kind, step, arrays, meta)
            except zmq.Again:
                raise PeerLost(f"stage {self.rank}: a peer took no {kind} message for "
                               f"{self.cfg.peer_timeout_s:.0f} s") from None

    def _recv(self, sock):
        try:
            return wire.recv(sock, self.spec.run_id, 0, max_array_bytes=self.max_array_bytes)
        except wire.WireError:
            self.bad_messages += 1
            return None

    # -- life cycle -----------------------------------------------------------------------

    def run(self) -> int:
        self._send(self.control, "hello", meta={"rank": self.rank, "pid": os.getpid(),
                                                "host": os.uname().nodename})
        self.heard = time.monotonic()
        self.next_beat = time.monotonic() + self.cfg.heartbeat_s
        self._await_start()
        while not self.stopping:
            self._pump(self.cfg.heartbeat_s)
        return 0

    def _await_start(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if _interrupted_at:
                raise KeyboardInterrupt
            if self.control.poll(100):
                msg = self._recv(self.control)
                if msg is None:
                    continue
                self.heard = time.monotonic()
                if msg.kind == "start":
                    return
                if msg.kind == "stop":
                    raise PeerLost(f"stage {self.rank}: told to stop before the start")
        raise PeerLost(f"stage {self.rank}: no start from the coordinator within "
                       f"{self.cfg.startup_timeout_s:.0f} s")

    def _pump(self, timeout_s: float) -> None:
        with self.clock.span("wait"):
            ready = dict(self.poller.poll(int(timeout_s * 1000)))
        now = time.monotonic()
        if now >= self.next_beat:
            self._send(self.control, "heartbeat", meta={"batches": self.batches})
            self.next_beat = now + self.cfg.heartbeat_s
        if self.control in ready:
            self._on_control()
        # gradients first: they free memory and unblock lockstep
        if self.grad_in is not None and self.grad_in in ready:
            msg = self._recv(self.grad_in)
            if msg is not None:
                self._on_grad(msg)
        if self.fwd_in in ready:
            msg = self._recv(self.fwd_in)
            if msg is not None:
                self._on_fwd(msg)
        if _interrupted_at and time.monotonic() - _interrupted_at > INTERRUPT_GRACE_S:
            raise KeyboardInterrupt   # nobody came to stop us gracefully
        if time.monotonic() - self.heard > self.cfg.peer_timeout_s:
            raise PeerLost(f"stage {self.rank}: no word from the coordinator for "
                           f"{self.cfg.peer_timeout_s:.0f} s")

    def _on_control(self) -> None:
        msg = self._recv(self.control)
        if msg is None:
            return
        self.heard = time.monotonic()
        if msg.kind == "stop":
            self._finish()
        elif msg.kind == "checkpoint":
            self._checkpoint(msg.meta)
        elif msg.kind not in ("heartbeat", "start"):
            self.bad_messages += 1

    def _checkpoint(self, meta) -> None:
        """Snapshot this stage into the folder the coordinator names; answer with its hash."""
        folder = meta.get("dir")
        if not isinstance(folder, str):
            self.bad_messages += 1
            return
        name = f"stage-{self.rank}.npz"
        try:
            os.makedirs(folder, exist_ok=True)
            digest = checkpoint.save_arrays(os.path.join(folder, name), self.model.snapshot())
            self._send(self.control, "ack", meta={"file": name, "sha256": digest,
                                                  "dir": folder})
        except OSError as exc:
            self._send(self.control, "error", meta={"message": f"checkpoint failed: {exc}"})

    def _finish(self) -> None:
        """Save the final weights, report, and leave the loop."""
        checkpoint.save_arrays(os.path.join(self.spec.run_dir, f"stage-{self.rank}.npz"),
                               self.model.arrays())
        wall = self.clock.elapsed()
        stats = {
            "rank": self.rank, "pid": os.getpid(), "batches": self.batches,
            "weights_sha256": self.model.weights_sha256(),
            "times": self.clock.totals, "cpu_times": self.clock.cpu,
            "wall": wall, "busy": self.clock.busy(),
            "bad_messages": self.bad_messages, "counters": self.model.counters,
            "generator_sq_error": self.model.generator_sq_error,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        }
        if self.spec.trace:
            from dni_async.measure import trace
            trace.write_spans(self.spec.run_dir, f"stage-{self.rank}", os.getpid(),
                              self.clock.spans)
        self._send(self.control, "stats", meta=stats)
        self.stopping = True

    # -- data plane -----------------------------------------------------------------------

    def _accept(self, msg, kinds, widths) -> bool:
        """A well-formed message can still be of the wrong kind or carry the wrong arrays for
        this stage: accept only what it expects, and count the rest."""
        arrs, dtype = msg.arrays, np.dtype(self.cfg.dtype)
        ok = (msg.kind in kinds and len(arrs) == len(widths)
              and all(a.ndim == 2 and a.dtype == dtype and a.shape[1] == w
                      for a, w in zip(arrs, widths))
              and len({a.shape[0] for a in arrs}) == 1)
        if not ok:
            self.bad_messages += 1
        return ok

    def _on_fwd(self, msg) -> None:
        if not self._accept(msg, ("fwd", "eval"), (self.cfg.widths[self.rank], self.cfg.output_dim)):
            return
        x, y = msg.arrays
        step = msg.step
        if msg.kind == "fwd" and not self._admit(step, x.shape[0]):
            self.bad_messages += 1
            return
        with self.clock.span("forward" if msg.kind == "fwd" else "eval", step):
            cache = self.model.forward_train(x) if msg.kind == "fwd" else None
            h = self.model.forward(x) if cache is None else cache.h
        if msg.kind == "eval":
            if self.last:
                sums = metrics.batch_sums(self.cfg.task, self.cfg.loss, h, y)
                self._send(self.results, "evalres", step, meta={**msg.meta, "sums": sums})
            else:
                self._send(self.fwd_out, "eval", step, [h, y], meta=msg.meta)
            return
        self.batches += 1
        if self.fault:
            self.fault.maybe_fire(self.batches)
        if self.last:
            self._last_stage_step(step, cache, h, y, msg.meta)
        elif self.cfg.decoupled:
            self._send(self.fwd_out, "fwd", step, [h, y], meta=msg.meta)
            with self.clock.span("update", step):
                target = self.model.synthetic_update(step, cache, y, need_grad_input=self.rank > 0)
            if target is not None:
                self._send(self.grad_out, "grad", step, [target])
        else:
            self._send(self.fwd_out, "fwd", step, [h, y], meta=msg.meta)
            self.waiting[step] = (cache, h, msg.meta)

    def _admit(self, step: int, rows: int) -> bool:
        """A training batch has the configured size, and a lockstep stage holds at most one
        batch (gpipe: one batch's micro-batches) while it waits for gradients."""
        gpipe = self.cfg.mode == "gpipe"
        if rows != self.cfg.batch_size // (self.cfg.micro_batches if gpipe else 1):
            return False
        if self.cfg.decoupled or self.last:
            return True
        limit = self.cfg.micro_batches if gpipe else 1
        return step not in self.waiting and len(self.waiting) < limit

    def _last_stage_step(self, step, cache, h, y, meta) -> None:
        need_g = self.rank > 0
        with self.clock.span("backward", step):
            delta, g = self.model.loss_delta(cache, y, need_grad_input=need_g)
        self._pass_back_then_apply(step, cache, delta, g, meta)
        sums = metrics.batch_sums(self.cfg.task, self.cfg.loss, h, y, delta)
        self._send(self.results, "loss", step, meta={**meta, "sums": sums})

    def _pass_back_then_apply(self, step, cache, delta, g_prev, meta) -> None:
        """dL/dx upstream first (when there is an upstream), so the previous stage's backward
        runs while this one updates."""
        if g_prev is not None:
            self._send(self.grad_out, "grad", step, [g_prev], meta=meta)
        with self.clock.span("update", step):
            if self.cfg.mode == "gpipe":
                m = self.cfg.micro_batches
                self.model.micro_apply(step // m, cache, delta, m)
            else:
                self.model.apply(cache, delta)

    def _on_grad(self, msg) -> None:
        if not self._accept(msg, ("grad",), (self.cfg.widths[self.rank + 1],)):
            return
        (g,) = msg.arrays
        step = msg.step
        if self.cfg.decoupled:
            if g.shape[0] != self.cfg.batch_size:      # a target is one row per example
                self.bad_messages += 1
                return
            with self.clock.span("generator", step):
                try:
                    self.model.apply_target(step, g)
                except ValueError:      # a target of another shape than the guess it trains
                    self.bad_messages += 1
            return
        entry = self.waiting.pop(step, None)
        if entry is None or entry[1].shape != g.shape:
            self.bad_messages += 1
            if entry is not None:
                self.waiting[step] = entry
            return
        cache, h, meta = entry
        need_g = self.rank > 0
        with self.clock.span("backward", step):
            delta, g_prev = self.model.true_delta(cache, g, need_grad_input=need_g)
        self._pass_back_then_apply(step, cache, delta, g_prev, meta)
        if not need_g:
            self._send(self.results, "done", step, meta=meta)


class Fault:
    """Fault injection for tests and demonstrations: DNI_ASYNC_FAULT="RANK:exit|hang:BATCH".

    `exit` ends the process abruptly (os._exit, as a crash would) when it reaches its BATCH-th
    batch (0: at start-up); `hang` stops its loop there without exiting, as a deadlock would.
    """

    def __init__(self, kind: str, at: int):
        self.kind, self.at = kind, at

    @classmethod
    def from_env(cls, rank: int):
        spec = os.environ.get("DNI_ASYNC_FAULT", "")
        try:
            r, kind, at = spec.split(":")
            if int(r) == rank and kind in ("exit", "hang"):
                return cls(kind, int(at))
        except ValueError:
            pass
        return None

    def maybe_fire(self, batches: int) -> None:
        if batches != self.at:
            return
        print(f"stage: injected fault {self.kind} at batch {batches}", file=sys.stderr, flush=True)
        if self.kind == "exit":
            os._exit(17)
        while True:
            time.sleep(3600)


INTERRUPT_GRACE_S = 1.5
_interrupted_at = 0.0


def _install_signal_handlers() -> None:
    """SIGTERM ends the stage now. SIGINT (Ctrl-C reaches every process of the terminal) gives
    the coordinator a moment to checkpoint and stop the pipeline in order; the stage leaves
    by itself if that does not happen within INTERRUPT_GRACE_S."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    def note(signum, frame):
        global _interrupted_at
        _interrupted_at = _interrupted_at or time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, note)


def main(spec_path: str, rank: int) -> int:
    spec = RunSpec.load(spec_path)
    _install_signal_handlers()
    try:
        stage = Stage(spec, rank)
    except ConfigError as exc:
        print(f"dni-async: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"stage {rank}: cannot open its sockets: {exc}", file=sys.stderr)
        return 1
    try:
        return stage.run()
    except PeerLost as exc:
        print(f"dni-async: {exc}; exiting", file=sys.stderr)
        return EXIT_PEER_LOST
    except KeyboardInterrupt:
        return 130
    finally:
        stage.close()
