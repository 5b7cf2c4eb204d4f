"""The coordinator process: feeds batches, keeps the credit count, collects loss and metrics.

    dni-async coordinator RUN_DIR/config.json

Sockets: control ROUTER (bind; `control.py`), results PULL (bind; loss and eval sums from the
last stage, `done` from stage 0), feed PUSH (connect to stage 0's fwd_in).

Flow control is by credits (`credits.py`): the mode says how many batches may be open and
which results finish one; in lockstep one batch leaves only after the previous one has updated
every stage. The rooms: `control.py` (stages and their liveness), `credits.py` (open steps),
`evaluation.py` (held-out passes), `run_state.py` (checkpoints and resume), `summary.py`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import zmq

from dni_async import report
from dni_async.progress import Progress
from dni_async.config import ConfigError
from dni_async.measure.clock import Clock
from dni_async.nn import metrics, network
from dni_async.nn.modes import mode_of
from dni_async.measure.float_warnings import FloatWarnings
from dni_async.runtime import checkpoint, failure, summary, wire
from dni_async.runtime.control import ControlPlane, StageLost, trail
from dni_async.runtime.credits import OpenSteps
from dni_async.runtime.evaluation import Evaluations, Interrupted
from dni_async.runtime.flight import FlightRecorder
from dni_async.runtime.monitor import Monitor
from dni_async.runtime.run_state import RunState, take_checkpoint
from dni_async.runtime.runspec import EVAL_CHUNK, RunSpec, release_ipc
from dni_async.runtime.security import Curve

EXIT_STAGE_LOST = 3
EXIT_DIVERGED = 4


class Diverged(RuntimeError):
    """The loss stopped being a number: training cannot recover, so the run ends at once."""
EXIT_INTERRUPTED = 130


class Coordinator:
    def __init__(self, spec: RunSpec):
        self.spec, self.cfg = spec, spec.config
        self.n = self.cfg.n_stages
        self.ds, _ = network.load_data_and_rng(self.cfg)
        self.clock = Clock(record_spans=spec.trace)
        self.recorder = FlightRecorder()     # its own message events, for failure.json
        self.fp = FloatWarnings()
        self.bad_messages = 0
        self.credits = OpenSteps(mode_of(self.cfg), self.cfg)
        self.state = RunState.restore(spec.resume_from) if spec.resume_from else RunState()
        self.credits.completed_batches = self.state.completed_steps
        self.progress = Progress(self.cfg, self.state.curve, self.state.batches)
        self.progress.stopped = self.state.stopped     # a target or budget reached before a resume
        self.eval_seconds = 0.0
        rows = min(EVAL_CHUNK, max(self.cfg.n_train, self.cfg.n_test)) / self.cfg.batch_size
        self.evals = Evaluations(self._feed, lambda: self.pump(self.cfg.heartbeat_s),
                                 lambda: self.interrupted,
                                 lambda: self.credits.deadline_s(scale=max(1.0, rows)))
        self.interrupted = False
        self.last_checkpoint = None
        self.checkpoints = []     # seconds each checkpoint took
        self._open_sockets()

    def _open_sockets(self) -> None:
        ep = self.spec.endpoints
        self.ctx = wire.make_context()
        self.curve = None
        if self.cfg.curve_keys:
            self.curve = Curve(self.cfg.curve_keys, "coordinator")
            self.curve.start(self.ctx)
        self.control = ControlPlane(self.ctx, self.spec, self.curve, self.recorder)
        self.results = wire.socket(self.ctx, zmq.PULL, max_msg_bytes=1 << 20)
        self.feed = wire.socket(self.ctx, zmq.PUSH)
        self.feed.setsockopt(zmq.SNDTIMEO, int(self.cfg.peer_timeout_s * 1000))
        if self.curve:
            self.curve.server(self.results)
            self.curve.client(self.feed, "stage-0")
        self.results.bind(ep["results"])
        last = f"stage-{self.n - 1}"
        self.results_from = {"loss": (last,), "evalres": (last,), "done": ("stage-0",)}
        self.feed.connect(ep["fwd_in"][0])
        self.sockets = [self.control.socket, self.results, self.feed]
        # the monitor stream (runtime/monitor.py); a plan written before it existed has none
        self.monitor = Monitor(self.ctx, ep["monitor"], self.curve) if ep.get("monitor") else None
        self.poller = zmq.Poller()
        self.poller.register(self.control.socket, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)

    def close(self) -> None:
        if self.monitor:
            self.monitor.close_slowly()
        if self.curve:
            self.curve.stop()
        wire.close_all(self.ctx, self.sockets)
        release_ipc([self.spec.endpoints["control"], self.spec.endpoints["results"],
                     self.spec.endpoints.get("monitor")])

    # -- messages -------------------------------------------------------------------------

    def _feed(self, kind: str, step: int, arrays, meta=None) -> None:
        """Send to stage 0, or report it lost when it takes nothing for `peer_timeout_s`."""
        with self.clock.span("send", step):
            try:
                wire.send(self.feed, self.spec.run_id, kind, step, arrays, meta)
            except zmq.Again:
                what = "batch" if kind == "fwd" else "evaluation batch"
                raise StageLost(f"stage 0 took no {what} for "
                                f"{self.cfg.peer_timeout_s:.0f} s") from None
        self.recorder.note("out", "stage-0", kind, step)

    def _on_result(self) -> None:
        frames = wire.recv_frames(self.results, 0)
        if frames is None:
            return
        try:
            msg = wire.decode(frames, self.spec.run_id, max_array_bytes=0)
        except wire.WireError:
            self.bad_messages += 1
            return
        if self.curve and self.curve.refuses(frames[0], *self.results_from.get(msg.kind, ())):
            self.bad_messages += 1      # under CURVE: not from the stage that sends this kind
            return
        self.recorder.note("in", "stage-0" if msg.kind == "done" else f"stage-{self.n - 1}",
                           msg.kind, msg.step)
        if msg.kind == "evalres":
            ok = self.evals.on_result(msg.step, msg.meta.get("sums"))
        elif msg.kind in ("loss", "done") and self.credits.expects(msg.kind, msg.step):
            ok = msg.kind == "done" or metrics.valid(msg.meta.get("sums"))
            if ok:
                if msg.kind == "loss":
                    metrics.add(self.state.epoch_sums, msg.meta["sums"])
                    if not math.isfinite(msg.meta["sums"]["loss"]):
                        raise Diverged(f"step {msg.step}: {report.DIVERGED}")
                self.credits.finish(msg.kind, msg.step)
        else:
            ok = False
        if not ok:
            self.bad_messages += 1

    def _handle(self, ready: dict) -> None:
        """Read what `poller.poll` found waiting, control first."""
        if self.control.socket in ready:
            _drain(self.control.socket, self.control.on_message)
        if self.results in ready:
            _drain(self.results, self._on_result)

    def pump(self, timeout_s: float) -> None:
        """Handle whatever arrives within `timeout_s`; heartbeats out; liveness checked."""
        with self.clock.span("wait"):
            ready = dict(self.poller.poll(int(timeout_s * 1000)))
        self._handle(ready)
        self.control.beat_and_check(self.credits.completed_batches - 1)
        if self.monitor:
            self.monitor.maybe_publish(self)
        late = self.credits.overdue()
        if late:
            step, age, limit = late
            waits = ", ".join(sorted(self.credits.open[step]))
            raise StageLost(f"step {step} was lost: after {age:.1f} s (deadline {limit:.1f} s) "
                            f"it still waits for {waits}; last seen: "
                            f"{trail(step, self.control.seen, self.n)}")

    # -- the run --------------------------------------------------------------------------

    def handshake(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while len(self.control.pids) < self.n:
            if self.interrupted:
                raise KeyboardInterrupt    # nothing started yet: nothing to checkpoint
            if time.monotonic() > deadline:
                raise StageLost(f"{self.control.missing(self.control.pids)} did not "
                                f"say hello within {self.cfg.startup_timeout_s:.0f} s")
            # results too: whatever arrives this early is counted, not left queued
            self._handle(dict(self.poller.poll(100)))
            self.control.beat_greeted()
        self.control.start()

    def _drain_credits(self) -> None:
        while len(self.credits):
            self.pump(self.cfg.heartbeat_s)

    def train_epoch(self, epoch: int) -> bool:
        """Send the rest of this epoch's batches, evaluating at the cadence; False if
        interrupted (then fully drained). Ends early when `progress` says training is over."""
        cfg, ds, st, pr = self.cfg, self.ds, self.state, self.progress
        bs, bpe = cfg.batch_size, cfg.batches_per_epoch()
        t0, self.eval_seconds = time.perf_counter(), 0.0
        while st.next_batch < bpe:
            if self.interrupted:
                self._drain_credits()
                return False
            if pr.out_of_time(st.train_seconds + self._seconds_since(t0)):
                break
            i = st.next_batch
            while not self.credits.room_for_batch():
                self.pump(cfg.heartbeat_s)
            x, y = ds.x_train[i * bs:(i + 1) * bs], ds.y_train[i * bs:(i + 1) * bs]
            for step, xs, ys, meta in self.credits.split(epoch * bpe + i, x, y):
                self._feed("fwd", step, [xs, ys], meta)
            st.next_batch += 1
            if pr.trained_one():
                self._drain_credits()
                self._held_out(st.train_seconds + self._seconds_since(t0))
                if pr.stopped:
                    break
        self._drain_credits()   # every batch sent is finished
        return True

    def _seconds_since(self, t0: float) -> float:
        """Training seconds since t0: evaluations do not count."""
        return time.perf_counter() - t0 - self.eval_seconds

    def _held_out(self, train_seconds: float) -> dict:
        """Evaluate the held-out set now and add it to the curve; its metrics."""
        t0 = time.perf_counter()
        self.state.n_eval += 1
        try:
            test = metrics.summarize(self.evals.run(self.ds.x_test, self.ds.y_test,
                                                    self.state.n_eval), "test")
        finally:                  # an interrupted evaluation is not training time either
            self.eval_seconds += time.perf_counter() - t0
        self.progress.record(train_seconds, test)
        return test

    def run(self, log=print) -> dict | None:
        """Train to the end (returns the summary) or until interrupted (returns None)."""
        cfg, ds, st, pr = self.cfg, self.ds, self.state, self.progress
        wall0 = time.perf_counter()
        self.handshake()
        every = report.log_every(cfg)
        try:
            # where training starts, for targets above it; or a point on the cadence that an
            # interrupt cut short before this resume
            if pr.starting() or pr.missing_point():
                self._held_out(st.train_seconds)
            # an epoch that trained part of its batches before a stop still gets its row
            while st.epoch < cfg.epochs and (not pr.stopped or st.next_batch):
                epoch = st.epoch
                if st.next_batch == 0:
                    st.epoch_sums = metrics.empty()
                first, t0 = st.next_batch, time.perf_counter()
                try:
                    finished = self.train_epoch(epoch)
                finally:             # an interrupt mid-epoch keeps the seconds it trained
                    dt = time.perf_counter() - t0 - self.eval_seconds
                    st.train_seconds += dt
                if not finished:
                    raise Interrupted
                if st.next_batch == 0:      # stopped before this epoch trained anything
                    break
                test = None
                if ((epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1
                        or pr.stopped):
                    # interrupted here: the epoch's training is done; resuming redoes its eval
                    point = pr.point_at(pr.batches)
                    test = ({k: point[k] for k in point if k.startswith("test_")} if point
                            else self._held_out(st.train_seconds))
                # None: resumed after every batch of the epoch (an interrupt in its
                # evaluation), its training and its rate belong to the run before
                rate = None if st.next_batch == first else (
                    (st.next_batch - first) * cfg.batch_size / dt if dt else 0.0)
                row = report.history_row(epoch + 1, st.epoch_sums, test, st.train_seconds, rate)
                st.history.append(row)
                st.epoch, st.next_batch = epoch + 1, 0
                self._log_row(log, row, every)
                if pr.stopped and log:
                    log(f"stopped after {pr.batches} batches: " + (
                        f"{pr.target} reached" if pr.stopped == "target"
                        else f"the budget of {cfg.time_budget_s:g} training seconds is spent"),
                        flush=True)
                if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
                    self.checkpoint()
            # interrupted here: training is over; resuming runs the final evaluation
            final = {
                **metrics.summarize(self.evals.run(ds.x_train, ds.y_train, st.n_eval + 1), "train"),
                **metrics.summarize(self.evals.run(ds.x_test, ds.y_test, st.n_eval + 2), "test")}
            pr.record(st.train_seconds,
                      {k: v for k, v in final.items() if k.startswith("test_")})
        except Interrupted:
            self.checkpoint()
            self._stop_stages()
            return None
        self._stop_stages()
        self.publish("done")
        return summary.build(self, final, time.perf_counter() - wall0)

    def _log_row(self, log, row: dict, every: int) -> None:
        epoch, history = row["epoch"], self.state.history     # counted from 1
        if log and report.diverged(row) and (len(history) < 2 or not report.diverged(history[-2])):
            log(f"epoch {epoch}: {report.DIVERGED}", flush=True)
        if log and (epoch % every == 0 or epoch == self.cfg.epochs):
            log(report.format_row(row, self.cfg.epochs), flush=True)

    def checkpoint(self) -> str:
        """Snapshot every stage and the coordinator while nothing is in flight."""
        self._drain_credits()
        t0 = time.perf_counter()
        if self._at_resume_source():
            return self.last_checkpoint
        self.state.completed_steps = self.credits.completed_batches
        self.state.batches, self.state.stopped = self.progress.batches, self.progress.stopped
        self.last_checkpoint = take_checkpoint(self.control, self.pump, self.state,
                                               self.spec.run_dir, self.cfg)
        self.checkpoints.append(time.perf_counter() - t0)
        return self.last_checkpoint

    def _at_resume_source(self) -> bool:
        """This step's checkpoint is the one this run resumed from (taken in the evaluation
        that ends an epoch): it holds these weights, and rewriting it in place would leave
        nothing to fall back on if the run were killed mid-write. It is kept as it is."""
        src = self.spec.resume_from
        here = checkpoint.folder(self.spec.run_dir, self.state.step(self.cfg.batches_per_epoch()))
        if src and os.path.realpath(here) == os.path.realpath(src):
            self.last_checkpoint = src
            return True
        return False

    def publish(self, state: str) -> None:
        """A snapshot on the monitor stream now (the final one: done, interrupted, failed)."""
        if self.monitor:
            self.monitor.publish(self, state)

    def step(self) -> int:
        return self.state.step(self.cfg.batches_per_epoch())

    def _stop_stages(self) -> None:
        self.control.collect_stats()
        _drain(self.results, self._on_result, limit=100_000)   # count strays still queued


def _drain(sock: zmq.Socket, handle, limit: int = 64) -> None:
    """Handle what is queued on `sock`, at most `limit` messages: a flood of messages is read
    in bursts rather than one per wake-up, yet cannot starve the loop's own work."""
    for _ in range(limit):
        if not sock.poll(0, zmq.POLLIN):
            return
        handle()


def main(spec_path: str) -> int:
    spec = RunSpec.load(spec_path)
    try:
        coord = Coordinator(spec)
    except ConfigError as exc:
        print(f"dni-async: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"dni-async: coordinator cannot open its sockets: {exc}", file=sys.stderr)
        return 1

    def interrupt(signum, frame):
        # Ctrl-C reaches this process from the terminal and again from `train`: both mean
        # "stop in order"; a supervisor that loses patience uses SIGKILL.
        coord.interrupted = True
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    last_step = lambda: coord.credits.completed_batches - 1   # noqa: E731
    try:
        with coord.fp.counting():
            result = coord.run()
        if result is None:
            coord.publish("interrupted")
            report.write_json(os.path.join(spec.run_dir, "stopped.json"),
                              {"last_completed_step": last_step(),
                               "checkpoint": coord.last_checkpoint})
            print(f"dni-async: interrupted at step {coord.step()}; checkpoint "
                  f"{coord.last_checkpoint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        summary.write(spec, result, coord.clock)
        return 0
    except Diverged as exc:
        coord.publish("failed")
        print(f"dni-async: {exc}", file=sys.stderr)
        failure.conclude(coord, str(exc), diverged=True)
        return EXIT_DIVERGED
    except StageLost as exc:
        coord.publish("failed")
        if coord.interrupted:   # told to stop (a stage failed, or Ctrl-C): this is the aftermath
            print(f"dni-async: coordinator: could not stop in order: {exc}", file=sys.stderr)
        else:
            print(f"dni-async: {exc}", file=sys.stderr)
        failure.conclude(coord, str(exc))
        return EXIT_STAGE_LOST
    except KeyboardInterrupt:
        coord.publish("interrupted")
        report.write_json(os.path.join(spec.run_dir, "stopped.json"),
                          {"last_completed_step": last_step()})
        coord.control.try_stop_all()
        return 130
    finally:
        coord.close()
