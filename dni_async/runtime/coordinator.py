"""The coordinator process: feeds batches, keeps the credit count, collects loss and metrics.

    dni-async coordinator RUN_DIR/config.json

Sockets: control ROUTER (bind; every stage's DEALER connects), results PULL (bind; loss and eval
sums from the last stage, `done` from stage 0), feed PUSH (connect to stage 0's fwd_in).

Flow control is by credits: at most `max_in_flight` batches are between being sent and being
finished. A batch is finished when its loss is back (dni, cdni) or, in lockstep modes, when
its backward pass has also reached stage 0. Lockstep uses one credit: batch b+1 leaves only
after batch b has updated every stage. Liveness comes from the application: each stage sends
a heartbeat from its own loop, so a stuck loop is caught as surely as a dead process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

import numpy as np
import zmq

from dni_async.runtime import checkpoint
from dni_async.nn import metrics
from dni_async.nn import network
from dni_async.nn.modes import mode_of
from dni_async import report
from dni_async.runtime import wire
from dni_async.config import ConfigError
from dni_async.runtime.runspec import EVAL_CHUNK, RunSpec, release_ipc
from dni_async.runtime.security import Curve
from dni_async.measure.clock import Clock

EXIT_STAGE_LOST = 3
EXIT_INTERRUPTED = 130


class StageLost(RuntimeError):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the coordinator was waiting on an evaluation."""


class Coordinator:
    def __init__(self, spec: RunSpec):
        self.spec, self.cfg = spec, spec.config
        self.n = self.cfg.n_stages
        self.mode = mode_of(self.cfg)
        ds, _ = network.load_data_and_rng(self.cfg)
        self.ds = ds
        self.clock = Clock(record_spans=spec.trace)
        self.bad_messages = 0
        self.last_seen = {}
        self.stats = {}
        self.pids = {}
        self.open = {}            # step -> what it still waits for
        self.epoch_sums = metrics.empty()
        self.eval_results = {}
        self.completed_steps = 0
        self.acks = {}
        self.awaited_evals, self.abandoned_evals = set(), set()
        self.interrupted = False
        self.last_checkpoint = None
        self.checkpoints = []     # seconds each checkpoint took
        # where the run stands: what a checkpoint saves and a resume restores
        self.epoch, self.next_batch = 0, 0
        self.history, self.train_seconds, self.n_eval = [], 0.0, 0
        if spec.resume_from:
            self._restore(spec.resume_from)
        self._open_sockets()

    def _open_sockets(self) -> None:
        ep = self.spec.endpoints
        self.ctx = wire.make_context()
        self.curve = None
        if self.cfg.curve_keys:
            self.curve = Curve(self.cfg.curve_keys, "coordinator")
            self.curve.start(self.ctx)
        self.control = wire.socket(self.ctx, zmq.ROUTER, max_msg_bytes=1 << 20)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDTIMEO, int(self.cfg.peer_timeout_s * 1000))
        self.results = wire.socket(self.ctx, zmq.PULL, max_msg_bytes=1 << 20)
        self.feed = wire.socket(self.ctx, zmq.PUSH)
        self.feed.setsockopt(zmq.SNDTIMEO, int(self.cfg.peer_timeout_s * 1000))
        if self.curve:
            self.curve.server(self.control)
            self.curve.server(self.results)
            self.curve.client(self.feed, "stage-0")
        self.control.bind(ep["control"])
        self.results.bind(ep["results"])
        self.feed.connect(ep["fwd_in"][0])
        self.sockets = [self.control, self.results, self.feed]
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)

    def close(self) -> None:
        if self.curve:
            self.curve.stop()
        wire.close_all(self.ctx, self.sockets)
        release_ipc([self.spec.endpoints["control"], self.spec.endpoints["results"]])

    # -- control plane --------------------------------------------------------------------

    def _to_stage(self, rank: int, kind: str, meta=None) -> None:
        frames = wire.encode(self.spec.run_id, kind, -1, (), meta)
        try:
            self.control.send_multipart([f"stage-{rank}".encode(), *frames])
        except zmq.ZMQError as exc:   # unroutable (stage gone) or send timeout
            raise StageLost(f"stage {rank} is unreachable ({exc.strerror})") from None

    def _broadcast(self, kind: str, meta=None) -> None:
        for k in range(self.n):
            self._to_stage(k, kind, meta)

    def _on_control(self) -> None:
        frames = self.control.recv_multipart(copy=False)
        ident = frames[0].bytes
        try:
            msg = wire.decode(frames[1:], self.spec.run_id, max_array_bytes=0)
        except wire.WireError:
            self.bad_messages += 1
            return
        rank = _rank_of(ident, self.n)
        if rank is None:
            self.bad_messages += 1
            return
        self.last_seen[rank] = time.monotonic()
        if msg.kind == "hello":
            self.pids[rank] = msg.meta.get("pid")
        elif msg.kind == "stats" and _valid_stats(msg.meta):
            self.stats[rank] = msg.meta
        elif msg.kind == "ack" and all(isinstance(msg.meta.get(k), str) for k in ("file", "sha256")):
            self.acks[rank] = msg.meta
        elif msg.kind == "error":
            raise StageLost(f"stage {rank} failed: {msg.meta.get('message', '?')}")
        elif msg.kind != "heartbeat":
            self.bad_messages += 1

    def _on_result(self) -> None:
        try:
            msg = wire.recv(self.results, self.spec.run_id, 0, max_array_bytes=0)
        except wire.WireError:
            self.bad_messages += 1
            return
        if msg is None:
            return
        if msg.kind == "evalres":
            if msg.step in self.abandoned_evals:       # answered after we stopped waiting
                self.abandoned_evals.discard(msg.step)
            elif (msg.step in self.awaited_evals and msg.step not in self.eval_results
                  and metrics.valid(msg.meta.get("sums"))):
                self.eval_results[msg.step] = msg.meta["sums"]
            else:
                self.bad_messages += 1
            return
        waits = self.open.get(msg.step)
        if msg.kind not in ("loss", "done") or waits is None or msg.kind not in waits:
            self.bad_messages += 1
            return
        if msg.kind == "loss":
            sums = msg.meta.get("sums")
            if not metrics.valid(sums):
                self.bad_messages += 1
                return
            metrics.add(self.epoch_sums, sums)
        waits.discard(msg.kind)
        if not waits:
            del self.open[msg.step]
            m = self.mode.pieces(self.cfg)
            if msg.step % m == m - 1:     # a batch is done with its last piece
                self.completed_steps += 1

    def _handle(self, ready: dict) -> None:
        """Read what `poller.poll` found waiting, control first."""
        if self.control in ready:
            _drain(self.control, self._on_control)
        if self.results in ready:
            _drain(self.results, self._on_result)

    def pump(self, timeout_s: float) -> None:
        """Handle whatever arrives within `timeout_s`; heartbeats out; liveness checked."""
        with self.clock.span("wait"):
            ready = dict(self.poller.poll(int(timeout_s * 1000)))
        self._handle(ready)
        now = time.monotonic()
        if now >= self.next_beat:
            self._broadcast("heartbeat")
            self.next_beat = now + self.cfg.heartbeat_s
        for k in range(self.n):
            if now - self.last_seen.get(k, now) > self.cfg.peer_timeout_s:
                raise StageLost(f"stage {k} has been silent for {now - self.last_seen[k]:.1f} s "
                                f"(last completed step {self.completed_steps - 1})")

    # -- the run --------------------------------------------------------------------------

    def handshake(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        self.next_beat = float("inf")
        while len(self.pids) < self.n:
            if self.interrupted:
                raise KeyboardInterrupt    # nothing started yet: nothing to checkpoint
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.n)) - set(self.pids))
                raise StageLost(f"stage(s) {missing} did not say hello within "
                                f"{self.cfg.startup_timeout_s:.0f} s")
            # results too: whatever arrives this early is counted, not left queued
            self._handle(dict(self.poller.poll(100)))
        self._broadcast("start")
        self.next_beat = time.monotonic() + self.cfg.heartbeat_s

    def _send_batch(self, step: int, x, y, meta=None) -> None:
        with self.clock.span("send", step):
            try:
                wire.send(self.feed, self.spec.run_id, "fwd", step, [x, y], meta)
            except zmq.Again:
                raise StageLost("stage 0 took no batch for "
                                f"{self.cfg.peer_timeout_s:.0f} s") from None

    def _wait_credit(self, limit: int) -> None:
        while len(self.open) >= limit:
            self.pump(self.cfg.heartbeat_s)

    def train_epoch(self, epoch: int) -> bool:
        """Send the rest of this epoch's batches; False if interrupted (then fully drained)."""
        cfg, ds = self.cfg, self.ds
        bs, bpe = cfg.batch_size, cfg.batches_per_epoch()
        limit, waits, m = self.mode.batches_in_flight(cfg), self.mode.finishes(), self.mode.pieces(cfg)
        while self.next_batch < bpe:
            if self.interrupted:
                self._wait_credit(1)
                return False
            i = self.next_batch
            b = epoch * bpe + i
            x, y = ds.x_train[i * bs:(i + 1) * bs], ds.y_train[i * bs:(i + 1) * bs]
            self._wait_credit(limit * m - m + 1)   # room for this batch's m pieces
            if m == 1:
                self.open[b] = set(waits)
                self._send_batch(b, x, y)
            else:
                for j, (xm, ym) in enumerate(zip(np.array_split(x, m), np.array_split(y, m))):
                    step = b * m + j
                    self.open[step] = set(waits)
                    self._send_batch(step, xm, ym, {"batch": b, "mb": j, "of": m})
            self.next_batch += 1
        self._wait_credit(1)   # drain: every batch of the epoch is finished
        return True

    def evaluate(self, x, y, tag: int) -> dict:
        """Forward-only pass through the stages; the last stage sends back metric sums."""
        chunk = EVAL_CHUNK
        steps = []
        for j, i in enumerate(range(0, len(x), chunk)):
            step = tag * 1000 + j
            steps.append(step)
            self.awaited_evals.add(step)
            with self.clock.span("send", step):
                try:
                    wire.send(self.feed, self.spec.run_id, "eval", step,
                              [x[i:i + chunk], y[i:i + chunk]])
                except zmq.Again:
                    raise StageLost("stage 0 took no evaluation batch for "
                                    f"{self.cfg.peer_timeout_s:.0f} s") from None
        while not all(s in self.eval_results for s in steps):
            if self.interrupted:
                self.awaited_evals.difference_update(steps)
                self.abandoned_evals.update(s for s in steps if s not in self.eval_results)
                for s in steps:
                    self.eval_results.pop(s, None)
                raise Interrupted
            self.pump(self.cfg.heartbeat_s)
        total = metrics.empty()
        for s in steps:
            self.awaited_evals.discard(s)
            metrics.add(total, self.eval_results.pop(s))
        return total

    def run(self, log=print) -> dict | None:
        """Train to the end (returns the summary) or until interrupted (returns None)."""
        cfg, ds = self.cfg, self.ds
        wall0 = time.perf_counter()
        self.handshake()
        every = report.log_every(cfg)
        samples = cfg.batches_per_epoch() * cfg.batch_size
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            if self.next_batch == 0:
                self.epoch_sums = metrics.empty()
            t0 = time.perf_counter()
            finished = self.train_epoch(epoch)
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            if not finished:
                self.checkpoint()
                self._stop_stages()
                return None
            test = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
                self.n_eval += 1
                try:
                    test = metrics.summarize(self.evaluate(ds.x_test, ds.y_test, self.n_eval),
                                             "test")
                except Interrupted:   # the epoch's training is done; resuming redoes its eval
                    self.checkpoint()
                    self._stop_stages()
                    return None
            row = report.history_row(epoch, self.epoch_sums, test, self.train_seconds,
                                     samples / dt if dt else 0.0)
            self.history.append(row)
            self.epoch, self.next_batch = epoch + 1, 0
            if log and report.diverged(row) and (len(self.history) < 2
                                                 or not report.diverged(self.history[-2])):
                log(f"epoch {epoch + 1}: {report.DIVERGED}", flush=True)
            if log and ((epoch + 1) % every == 0 or epoch == cfg.epochs - 1):
                log(report.format_row(row, cfg.epochs), flush=True)
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
                self.checkpoint()
        try:
            final = {
                **metrics.summarize(self.evaluate(ds.x_train, ds.y_train, self.n_eval + 1), "train"),
                **metrics.summarize(self.evaluate(ds.x_test, ds.y_test, self.n_eval + 2), "test")}
        except Interrupted:           # training is over; resuming runs the final evaluation
            self.checkpoint()
            self._stop_stages()
            return None
        self._stop_stages()
        return self._summary(self.history, final, self.train_seconds, time.perf_counter() - wall0)

    # -- checkpoints ----------------------------------------------------------------------

    def step(self) -> int:
        return self.epoch * self.cfg.batches_per_epoch() + self.next_batch

    def checkpoint(self) -> str:
        """Snapshot every stage and the coordinator while nothing is in flight."""
        self._wait_credit(1)
        t0 = time.perf_counter()
        step = self.step()
        folder = checkpoint.folder(self.spec.run_dir, step)
        os.makedirs(folder, exist_ok=True)
        self.acks = {}
        for k in range(self.n):
            self._to_stage(k, "checkpoint", {"dir": folder})
        deadline = time.monotonic() + self.cfg.peer_timeout_s
        while len(self.acks) < self.n:
            if time.monotonic() > deadline:
                raise StageLost(f"stage(s) {sorted(set(range(self.n)) - set(self.acks))} "
                                "did not confirm the checkpoint")
            self.pump(0.05)
        files = {a["file"]: a["sha256"] for a in self.acks.values()}
        state = {"epoch": self.epoch, "next_batch": self.next_batch, "n_eval": self.n_eval,
                 "train_seconds": self.train_seconds, "history": self.history,
                 "epoch_sums": self.epoch_sums, "completed_steps": self.completed_steps}
        body = json.dumps(state).encode()
        report.atomic_write(os.path.join(folder, "coordinator.json"), body)
        files["coordinator.json"] = hashlib.sha256(body).hexdigest()
        checkpoint.write_manifest(folder, step, files)
        checkpoint.prune(self.spec.run_dir, self.cfg.keep_checkpoints, folder)
        self.last_checkpoint = folder
        self.checkpoints.append(time.perf_counter() - t0)
        return folder

    def _restore(self, folder: str) -> None:
        try:
            with open(os.path.join(folder, "coordinator.json")) as fh:
                state = json.load(fh)
            self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
            self.n_eval, self.train_seconds = int(state["n_eval"]), float(state["train_seconds"])
            self.history, self.epoch_sums = list(state["history"]), state["epoch_sums"]
            self.completed_steps = int(state["completed_steps"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot resume from {folder}: {exc}") from None
        if not metrics.valid(self.epoch_sums):
            raise ConfigError(f"cannot resume from {folder}: damaged metric sums")

    def _stop_stages(self) -> None:
        self._broadcast("stop")
        deadline = time.monotonic() + self.cfg.peer_timeout_s
        while len(self.stats) < self.n and time.monotonic() < deadline:
            if self.control.poll(100):
                self._on_control()
        if len(self.stats) < self.n:
            missing = sorted(set(range(self.n)) - set(self.stats))
            raise StageLost(f"stage(s) {missing} sent no final stats")
        _drain(self.results, self._on_result, limit=100_000)   # count strays still queued

    def _summary(self, history, final, train_seconds, wall) -> dict:
        cfg = self.cfg
        stages = [self.stats[k] for k in range(self.n)]
        total_samples = cfg.epochs * cfg.batches_per_epoch() * cfg.batch_size
        return {
            "kind": "pipeline",
            "run_id": self.spec.run_id,
            "run_dir": self.spec.run_dir,
            "config": cfg.to_dict(),
            "endpoints": self.spec.endpoints,
            "history": history,
            "final": final,
            "wall_seconds": wall,
            "train_seconds": train_seconds,
            "samples_per_s": total_samples / train_seconds if train_seconds else 0.0,
            "weights_sha256": [s["weights_sha256"] for s in stages],
            "stage_busy": [s["busy"] / s["wall"] if s["wall"] else 0.0 for s in stages],
            "stages": stages,
            "bad_messages": {"coordinator": self.bad_messages,
                             **{f"stage-{s['rank']}": s["bad_messages"] for s in stages}},
            "coordinator_times": self.clock.totals,
            "checkpoint_seconds": self.checkpoints,
            "machine": report.machine(),
        }


def _drain(sock: zmq.Socket, handle, limit: int = 64) -> None:
    """Handle what is queued on `sock`, at most `limit` messages: a flood of messages is read
    in bursts rather than one per wake-up, yet cannot starve the loop's own work."""
    for _ in range(limit):
        if not sock.poll(0, zmq.POLLIN):
            return
        handle()


def _valid_stats(meta: dict) -> bool:
    """A stage's final report, before the summary relies on it."""
    num = (int, float)
    return (isinstance(meta.get("weights_sha256"), str) and isinstance(meta.get("rank"), int)
            and type(meta.get("busy")) in num and type(meta.get("wall")) in num
            and type(meta.get("bad_messages")) is int and isinstance(meta.get("counters"), dict)
            and isinstance(meta.get("times"), dict))


def _rank_of(ident: bytes, n: int):
    try:
        name = ident.decode()
        if name.startswith("stage-"):
            k = int(name[6:])
            if 0 <= k < n:
                return k
    except (UnicodeDecodeError, ValueError):
        pass
    return None


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
    try:
        summary = coord.run()
        if summary is None:
            report.write_json(os.path.join(spec.run_dir, "stopped.json"),
                              {"last_completed_step": coord.completed_steps - 1,
                               "checkpoint": coord.last_checkpoint})
            print(f"dni-async: interrupted at step {coord.step()}; checkpoint "
                  f"{coord.last_checkpoint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        report.write_json(os.path.join(spec.run_dir, "summary.json"), summary)
        report.write_history_csv(os.path.join(spec.run_dir, "metrics.csv"), summary["history"])
        if spec.trace:
            from dni_async.measure import trace
            trace.write_spans(spec.run_dir, "coordinator", os.getpid(), coord.clock.spans)
        return 0
    except StageLost as exc:
        if coord.interrupted:   # told to stop (a stage failed, or Ctrl-C): this is the aftermath
            print(f"dni-async: coordinator: could not stop in order: {exc}", file=sys.stderr)
        else:
            print(f"dni-async: {exc}", file=sys.stderr)
        report.write_json(os.path.join(spec.run_dir, "failure.json"),
                          {"error": str(exc), "last_completed_step": coord.completed_steps - 1})
        _try_stop(coord)
        return EXIT_STAGE_LOST
    except KeyboardInterrupt:
        report.write_json(os.path.join(spec.run_dir, "stopped.json"),
                          {"last_completed_step": coord.completed_steps - 1})
        _try_stop(coord)
        return 130
    finally:
        coord.close()


def _try_stop(coord: Coordinator) -> None:
    """Best effort: tell every stage to stop, without waiting for answers."""
    for k in range(coord.n):
        try:
            coord._to_stage(k, "stop")
        except (StageLost, zmq.ZMQError):
            pass
