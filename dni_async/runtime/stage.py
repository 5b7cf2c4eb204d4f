"""One stage process: one layer, and the loop that moves its batches.

    dni-async stage RUN_DIR/config.json --rank K

What the stage does with each batch and gradient is its mode's program (`nn.modes`, run by
`nn.program.StageProgram`, as in the one-process reference); this module is the process around
it: the loop, the control messages (start, heartbeat, checkpoint, stop), what a message must be
to be let in, and the final report. Its sockets are in `stage_links.py`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager

import numpy as np
import zmq

from dni_async import report
from dni_async.config import ConfigError, parse_slow_stage
from dni_async.measure.clock import Clock
from dni_async.measure.float_warnings import FloatWarnings, line as fp_line
from dni_async.nn import metrics, network, row_blocks
from dni_async.nn.modes import mode_of
from dni_async.nn.program import StageProgram
from dni_async.runtime import checkpoint, preflight, stage_report, stage_snapshot
from dni_async.runtime.faults import FINAL, Fault
from dni_async.runtime.heartbeat import Heartbeat
from dni_async.runtime.replay import Replays
from dni_async.runtime.runspec import EVAL_CHUNK, RunSpec
from dni_async.runtime.stage_links import PeerLost, StageLinks

EXIT_PEER_LOST = 3
GRADIENTS_PER_BATCH = 64    # at most this many gradients read before the next batch


class Stage:
    def __init__(self, spec: RunSpec, rank: int):
        cfg = spec.config
        if not 0 <= rank < cfg.n_stages:
            raise ConfigError(f"rank {rank} is outside 0..{cfg.n_stages - 1}")
        self.spec, self.cfg, self.rank = spec, cfg, rank
        self.last = rank == cfg.n_stages - 1
        _, rng = network.load_data_and_rng(cfg)
        self.model = network.build(cfg, rng, ranks=[rank])[0]
        if spec.resume_from:
            path = os.path.join(spec.resume_from, f"stage-{rank}.npz")
            try:
                self.model.load(checkpoint.load_arrays(path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"stage {rank}: cannot resume from {path}: {exc}") from None
        slow = parse_slow_stage(cfg.slow_stage)
        self.delay_s = slow[1] if slow and slow[0] == rank else 0.0   # teaching: a slow stage
        # the most rows a message brings; refuse now, not mid-run, if a piece of work would
        # outlast the heartbeats' patience
        rows = max(cfg.batch_size, min(EVAL_CHUNK, max(cfg.n_train, cfg.n_test)))
        self.work_s = preflight.check(self.model, cfg, rank, rows, extra_s=self.delay_s)
        self.clock = Clock(record_spans=spec.trace)
        self.fp = FloatWarnings()
        self.batches = 0
        self.stopping = False
        self.fault = Fault.from_env(rank)
        if self.fault:
            self.fault.maybe_fire(0)
        max_bytes = rows * max(cfg.widths) * np.dtype(cfg.dtype).itemsize   # more is refused
        self.links = StageLinks(spec, rank, max_bytes, self.clock)
        self.replays = Replays()           # steps run already: a second message for one is refused
        self.lags: dict[int, int] = {}     # target lag -> how many targets arrived that late
        self.program = StageProgram(self.model, mode_of(cfg), cfg, rank,
                                    send=self.links.send_data,
                                    span=self._op_span)
        links = self.links
        self.heartbeat = Heartbeat(   # what a heartbeat carries: stage_report.heartbeat
            lambda meta: links.send(links.control, "heartbeat", meta=meta),
            lambda: stage_report.heartbeat(self),
            cfg.heartbeat_s, cfg.peer_timeout_s)

    @contextmanager
    def _op_span(self, name: str, step: int = -1):
        """The clock's span of one op of the program, after a heartbeat if one is due (a wide
        layer's ops are long work). With `slow_stage`, a forward span also computes for
        `delay_s` more (busy, not asleep: the delay is work, as a bigger layer's would be)."""
        self.heartbeat.beat()
        with self.clock.span(name, step):
            yield
            if name == "forward" and self.delay_s:
                end = time.perf_counter() + self.delay_s
                while time.perf_counter() < end:
                    pass

    @property
    def bad_messages(self) -> int:
        return self.links.bad_messages

    def _count_bad(self) -> None:
        self.links.bad_messages += 1

    def close(self) -> None:
        self.links.close()

    # -- life cycle -----------------------------------------------------------------------

    def run(self) -> int:
        links = self.links
        links.send(links.control, "hello",
                   meta={"rank": self.rank, "pid": os.getpid(), "host": os.uname().nodename,
                         "snapshot_bytes": checkpoint.snapshot_bytes(self.model)})
        self._await_start()
        while not self.stopping:
            self._pump(self.cfg.heartbeat_s)
        return 0

    def _await_start(self) -> None:
        """Wait for `start`. Once the coordinator has answered the hello it beats while it
        waits for the other stages, so silence for `peer_timeout_s` means it has stopped;
        before that it has its start-up time and a peer timeout more, so that a stage that
        never says hello is named by the coordinator, not outlived by its waiting peers."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.startup_timeout_s + cfg.peer_timeout_s
        heard = False
        while True:
            if _interrupted_at:
                raise KeyboardInterrupt
            now = time.monotonic()
            if heard and now - self.heartbeat.heard_at > cfg.peer_timeout_s:
                raise PeerLost(f"stage {self.rank}: no word from the coordinator for "
                               f"{cfg.peer_timeout_s:.0f} s before the start")
            if now > deadline:
                raise PeerLost(f"stage {self.rank}: no start from the coordinator within "
                               f"{cfg.startup_timeout_s + cfg.peer_timeout_s:.0f} s")
            if self.links.control.poll(100):
                msg = self.links.recv(self.links.control)
                if msg is None:
                    continue
                self.heartbeat.heard()
                heard = True
                if msg.kind == "start":
                    return
                if msg.kind == "stop":     # the coordinator gave up (and says why): leave
                    self.stopping = True
                    return

    def _pump(self, timeout_s: float) -> None:
        links = self.links
        poller = links.poller if self.program.ready_for_batch() else links.poller_without_batches
        with self.clock.span("wait"):
            ready = dict(poller.poll(int(timeout_s * 1000)))
        self.heartbeat.beat()
        if links.control in ready:
            self._on_control()
            if self.stopping:    # its final report is sent: nothing more is handled
                return
        # every gradient that has arrived before the next batch: they unblock lockstep, and a
        # generator that learns its targets as soon as they are here learns from fresher ones
        if links.grad_in is not None and links.grad_in in ready:
            for _ in range(GRADIENTS_PER_BATCH):
                self._take_gradient(links.grad_in)
                if not links.grad_in.poll(0):
                    break
                self.heartbeat.beat()
        if links.fwd_in in ready and self.program.ready_for_batch():
            msg = links.recv(links.fwd_in)     # (a coupled stage waiting for its gradient
            if msg is not None:                # leaves further batches queued, unread)
                self._on_fwd(msg)
        if _interrupted_at and time.monotonic() - _interrupted_at > INTERRUPT_GRACE_S:
            raise KeyboardInterrupt   # nobody came to stop us gracefully
        if self.heartbeat.coordinator_silent(lambda: links.control.poll(0)):
            raise PeerLost(f"stage {self.rank}: no word from the coordinator for "
                           f"{self.cfg.peer_timeout_s:.0f} s")

    def _on_control(self) -> None:
        msg = self.links.recv(self.links.control)
        if msg is None:
            return
        self.heartbeat.heard()
        if msg.kind == "stop":
            self._finish()
        elif msg.kind == "checkpoint":
            self._checkpoint(msg.meta)
        elif msg.kind not in ("heartbeat", "start"):
            self._count_bad()

    def _checkpoint(self, meta) -> None:
        """This stage's file of the checkpoint of the step named (never a folder): its hash."""
        step = meta.get("step")
        if type(step) is not int or step < 0:
            self._count_bad()
            return
        stage_snapshot.settle(self.program.held, self.model.pending, self.links.grad_in,
                              self._take_gradient, min(stage_snapshot.SETTLE_S,
                                                       self.cfg.peer_timeout_s / 3))
        try:     # in pieces, with heartbeats between them
            kind, meta = "ack", checkpoint.write_stage(self.spec.run_dir, step, self.rank,
                                                       stage_snapshot.arrays(self.model),
                                                       self.heartbeat.beat)
        except OSError as exc:
            kind, meta = "error", {"message": f"checkpoint failed: {exc}"}
        self.links.send(self.links.control, kind, meta=meta)

    def _finish(self) -> None:
        """Save the final weights, report, and leave the loop."""
        checkpoint.save_arrays(os.path.join(self.spec.run_dir, f"stage-{self.rank}.npz"),
                               self.model.arrays(), between=self.heartbeat.beat)
        if self.spec.trace:
            from dni_async.measure import trace
            trace.write_spans(self.spec.run_dir, f"stage-{self.rank}", os.getpid(),
                              self.clock.spans)
        self.links.send(self.links.control, "stats", meta=stage_report.final(self))
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
            self._count_bad()
        return ok

    def _on_fwd(self, msg) -> None:
        if not self._accept(msg, ("fwd", "eval"), (self.cfg.widths[self.rank], self.cfg.output_dim)):
            return
        x, y = msg.arrays
        if msg.kind == "eval":
            self._evaluate(msg, x, y)
            return
        if (self.replays.refuses("fwd", msg.step)
                or not self.program.admits_batch(msg.step, x.shape[0])):
            self._count_bad()
            return
        self.replays.ran("fwd", msg.step)
        self.batches += 1
        self.links.seen["fwd_in"].append(msg.step)
        if self.fault and self.fault.maybe_fire(self.batches):
            self.links.drop_next = msg.step
        self.program.on_forward(msg.step, x, y, msg.meta)

    def _evaluate(self, msg, x, y) -> None:
        """Forward only, no update; the last stage sends the metric sums back. In row blocks,
        with heartbeats between them: a wide layer's chunk is seconds of work."""
        h = row_blocks.forward(self.model, x, between=self.heartbeat.beat,
                               span=lambda: self.clock.span("eval", msg.step))
        if self.last:
            sums = metrics.batch_sums(self.cfg.task, self.cfg.loss, h, y)
            self.links.send_data("evalres", msg.step, meta={**msg.meta, "sums": sums})
        else:
            self.links.send_data("eval", msg.step, [h, y], meta=msg.meta)

    def _take_gradient(self, sock) -> None:
        msg = self.links.recv(sock)
        if msg is not None:
            self._on_grad(msg)

    def _on_grad(self, msg) -> None:
        if not self._accept(msg, ("grad",), (self.cfg.widths[self.rank + 1],)):
            return
        (g,) = msg.arrays
        self.links.seen["grad_in"].append(msg.step)
        if (self.replays.refuses("grad", msg.step)
                or not self.program.admits_gradient(msg.step, g.shape[0])):
            self._count_bad()
            return
        c = self.model.counters
        applied, lag_sum = c["targets_applied"], c["target_lag_sum"]
        try:
            self.program.on_gradient(msg.step, g, msg.meta)
            self.replays.ran("grad", msg.step)
        except ValueError:      # a gradient of another shape than the step it names
            self._count_bad()
        if c["targets_applied"] == applied + 1:     # a generator target: how late it came
            lag = c["target_lag_sum"] - lag_sum
            self.lags[lag] = self.lags.get(lag, 0) + 1


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


def account_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"failure-stage-{rank}.json")


def leave_account(spec: RunSpec, rank: int, error: str) -> None:
    """Why this stage gave up, for whoever names the run's failure: a stage that leaves because
    the coordinator fell silent exits like any failed stage, and only it knows whom it lost."""
    try:
        report.write_json(account_path(spec.run_dir, rank), {"rank": rank, "error": error})
    except OSError:
        pass


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
    except KeyboardInterrupt:    # stopped while starting (another stage refused, Ctrl-C)
        return 130
    try:
        with stage.fp.counting():
            status = stage.run()
        if stage.fault:
            stage.close()
            stage.fault.maybe_fire(FINAL)
        return status
    except PeerLost as exc:
        print(f"dni-async: {exc}; exiting", file=sys.stderr)
        leave_account(spec, rank, str(exc))
        said = fp_line({f"stage {rank}": stage.fp.as_dict()})   # nobody else will say it
        if said:
            print(f"dni-async: {said}", file=sys.stderr)
        return EXIT_PEER_LOST
    except KeyboardInterrupt:
        return 130
    finally:
        stage.close()
