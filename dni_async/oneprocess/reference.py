"""The single-process reference trainer: every stage's programs, run in order in one process.

    dni-async reference --preset seed --mode backprop     # the seed post's run
    dni-async reference --preset seed --mode cdni

The pipeline must reproduce this run: in lockstep modes bit for bit, in decoupled modes in
distribution (targets reach generators at other moments there; `target_delay` makes them late
here too).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dni_async import report
from dni_async.measure.float_warnings import FloatWarnings
from dni_async.config import Config
from dni_async.nn import metrics, network, row_blocks, stage_model
from dni_async.nn.modes import Op, mode_of
from dni_async.nn.program import StageProgram
from dni_async.progress import Progress


class OneProcess:
    """Every stage's program in this process, in the order a pipeline runs them.

    Messages between stages go into queues: a batch's forward messages are run to the last
    stage first, then the gradients from the last stage back to the first. Each stage thereby
    sees its messages in the order it sees them as a process in lockstep, which is why lockstep
    pipelines equal this bit for bit; decoupled pipelines differ only in when targets arrive.
    With `target_delay = D` (modes with generators), a step's targets are held back and reach
    their generators D steps later, as a pipeline's do."""

    def __init__(self, models, cfg: Config):
        self.models, self.cfg, self.n = models, cfg, len(models)
        self.mode = mode_of(cfg)
        self.fwd = [deque() for _ in range(self.n)]
        self.grad = [deque() for _ in range(self.n)]
        self.delay = cfg.target_delay
        self.every_stage_synthetic = all(self.mode.has_generator(k, self.n, cfg.true_boundaries)
                                         for k in range(self.n - 1))
        self.late = deque()       # (step, [(stage, message), ...]) waiting out the delay
        self.sums = None
        self.sent = None          # when measuring fidelity: every message of the step
        self.programs = [StageProgram(m, self.mode, cfg, k, self._sender(k))
                         for k, m in enumerate(models)]

    def _sender(self, k: int):
        def send(kind, step, arrays, meta):
            if self.sent is not None:
                self.sent.append((k, kind, arrays))
            if kind == "fwd":
                self.fwd[k + 1].append((step, arrays[0], arrays[1], meta))
            elif kind == "grad":
                self.grad[k - 1].append((step, arrays[0], meta))
            elif kind == "loss":
                metrics.add(self.sums, meta["sums"])
        return send

    def step(self, step: int, x, y, sums: dict, fidelity=None) -> None:
        """One batch through every stage; adds its metric sums (taken before updates) to
        `sums`, in the order the pipeline's coordinator adds them, so the two agree to the
        last bit.

        With `fidelity` (a list), every `cfg.fidelity_every` steps of a mode with generators
        it also carries the true dL/dh back from the loss through the forward-pass weights and
        appends, per stage, how close the synthetic gradient came; training is unchanged."""
        cfg, n = self.cfg, self.n
        measure = (fidelity is not None and self.every_stage_synthetic
                   and cfg.fidelity_every > 0 and step % cfg.fidelity_every == 0)
        w_fwd = [_forward_weights(m) for m in self.models] if measure else None
        self.sums, self.sent = sums, ([] if measure else None)
        pieces = self.mode.pieces(cfg)
        if pieces == 1:
            self.fwd[0].append((step, x, y, {}))
        else:
            for j, (xm, ym) in enumerate(zip(np.array_split(x, pieces), np.array_split(y, pieces))):
                self.fwd[0].append((step * pieces + j, xm, ym, {"batch": step, "mb": j, "of": pieces}))
        for k in range(n):
            while self.fwd[k]:
                self.programs[k].on_forward(*self.fwd[k].popleft())
        if measure:
            caches = [p.last.cache for p in self.programs]
            fidelity.append(_fidelity_row(self.models, step, caches, self.sent, w_fwd))
        late = ([k for k in range(n) if self.programs[k].gradient_ops == (Op.TRAIN_GENERATOR,)]
                if self.delay else [])
        held = []          # generators' targets wait; a coupled stage's gradient does not
        for k in range(n - 2, -1, -1):
            while self.grad[k]:
                if k in late:
                    held.append((k, self.grad[k].popleft()))
                else:
                    self.programs[k].on_gradient(*self.grad[k].popleft())
        if self.delay:
            self.late.append((step, held))
            while self.late and self.late[0][0] <= step - self.delay:
                for k, msg in self.late.popleft()[1]:
                    self.programs[k].on_gradient(*msg)
        self.sums = self.sent = None


def train_step(models, cfg: Config, step: int, x, y, sums: dict, fidelity=None) -> None:
    """One batch, for callers without a `OneProcess` of their own."""
    OneProcess(models, cfg).step(step, x, y, sums, fidelity)


def _forward_weights(model):
    """What a layer's backward needs of the forward pass's parameters (updates change them in
    place): W, and the norm's gamma."""
    norm = model.layer.norm
    return model.layer.W.copy(), None if norm is None else norm.gamma.copy()


def _fidelity_row(models, step: int, caches: list, sent: list, w_fwd: list) -> dict:
    """Per stage k < N-1: the synthetic dL/dh_k against the true one (cos, relative error),
    and the bootstrapped target it will be trained on against the true one (target_cos)."""
    n = len(models)
    targets = {k: arrays[0] for k, kind, arrays in sent if kind == "grad"}   # sent by stage k
    row = {"step": step, "cos": [0.0] * (n - 1), "rel": [0.0] * (n - 1),
           "target_cos": [1.0] * (n - 1)}
    true = targets[n - 1]                          # dL/dh_{N-2}, from the loss
    for k in range(n - 2, -1, -1):
        row["cos"][k], row["rel"][k] = stage_model.fidelity(
            models[k].synthetic_gradient(step), true)
        if k < n - 2:
            row["target_cos"][k] = stage_model.fidelity(targets[k + 1], true)[0]
        if k > 0:
            layer, (W, gamma) = models[k].layer, w_fwd[k]
            d = layer.delta(caches[k].h, true)
            if layer.norm is not None:
                d = layer.norm.backward(d, caches[k].norm, gamma=gamma)[0]
            true = d.dot(W.T)
    return row


def evaluate(models, cfg: Config, x, y, chunk: int | None = None) -> dict:
    from dni_async.runtime.runspec import EVAL_CHUNK   # the pipeline's chunk, for equal sums
    chunk = chunk or EVAL_CHUNK
    sums = metrics.empty()
    for i in range(0, len(x), chunk):
        h = x[i:i + chunk]
        for m in models:
            h = row_blocks.forward(m, h)      # the blocks a stage process cuts
        metrics.add(sums, metrics.batch_sums(cfg.task, cfg.loss, h, y[i:i + chunk]))
    return sums


def train(cfg: Config, log=print, on_epoch=None) -> dict:
    """Train in one process; returns the run summary (the same keys `train` writes).
    `progress(epochs_done)`, when given, is called after every epoch (a progress bar).
    numpy's floating-point warnings are counted (`fp_warnings`), not printed."""
    fp = FloatWarnings()
    with fp.counting():
        summary = _train(cfg, log, on_epoch)
    summary["fp_warnings"] = {"reference": fp.as_dict()} if fp.counts else {}
    return summary


def _train(cfg: Config, log, on_epoch) -> dict:
    wall0 = time.perf_counter()
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    bpe, bs = cfg.batches_per_epoch(), cfg.batch_size
    every = report.log_every(cfg)
    history, train_seconds = [], 0.0
    runner = OneProcess(models, cfg)
    progress = Progress(cfg)
    fidelity = [] if cfg.fidelity_every and runner.every_stage_synthetic else None

    def held_out(seconds: float) -> dict:
        test = metrics.summarize(evaluate(models, cfg, ds.x_test, ds.y_test), "test")
        progress.record(seconds, test)
        return test

    diverged = None     # the step at which the loss stopped being a number
    if progress.starting():
        held_out(0.0)
    for epoch in range(cfg.epochs):
        t0, eval_s, done = time.perf_counter(), 0.0, 0
        sums = metrics.empty()
        first = len(fidelity) if fidelity is not None else 0
        for i in range(bpe):
            if progress.out_of_time(train_seconds + time.perf_counter() - t0 - eval_s):
                break
            x, y = ds.x_train[i * bs:(i + 1) * bs], ds.y_train[i * bs:(i + 1) * bs]
            runner.step(epoch * bpe + i, x, y, sums, fidelity)
            done += 1
            if not np.isfinite(sums["loss"]):     # nothing recovers from here: stop at once
                diverged = epoch * bpe + i
                break
            if progress.trained_one():
                t1 = time.perf_counter()
                held_out(train_seconds + t1 - t0 - eval_s)
                eval_s += time.perf_counter() - t1
                if progress.stopped:
                    break
        dt = time.perf_counter() - t0 - eval_s
        train_seconds += dt
        if not done:
            break
        test = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1 or progress.stopped:
            point = progress.point_at(progress.batches)
            test = ({k: v for k, v in point.items() if k.startswith("test_")} if point
                    else held_out(train_seconds))
        row = report.history_row(epoch + 1, sums, test, train_seconds,
                                 done * bs / dt if dt else 0.0)
        if fidelity is not None and len(fidelity) > first:   # per stage, this epoch's means
            for key in ("cos", "rel", "target_cos"):
                row[f"fidelity_{key}"] = np.mean([r[key] for r in fidelity[first:]],
                                                 axis=0).tolist()
        history.append(row)
        if log and report.diverged(row) and (len(history) < 2 or not report.diverged(history[-2])):
            log(f"epoch {epoch + 1}: {report.DIVERGED}")
        if log and ((epoch + 1) % every == 0 or epoch == cfg.epochs - 1 or progress.stopped):
            log(report.format_row(row, cfg.epochs))
        if on_epoch:
            on_epoch(epoch + 1)
        if progress.stopped or diverged is not None:
            break
    final = {**metrics.summarize(evaluate(models, cfg, ds.x_train, ds.y_train), "train"),
             **metrics.summarize(evaluate(models, cfg, ds.x_test, ds.y_test), "test")}
    progress.record(train_seconds,
                    {k: v for k, v in final.items() if k.startswith("test_")})
    return {
        "kind": "reference",
        "config": cfg.to_dict(),
        "history": history,
        "curve": progress.curve,
        "batches": progress.batches,
        "stopped": progress.stopped,
        "diverged": diverged,
        "final": final,
        "wall_seconds": time.perf_counter() - wall0,
        "train_seconds": train_seconds,
        "samples_per_s": progress.batches * bs / train_seconds if train_seconds else 0.0,
        "weights_sha256": [m.weights_sha256() for m in models],
        "generators": _generator_counters(models),
        "fidelity": fidelity,
        "machine": report.machine(),
    }


def _generator_counters(models) -> list:
    return [{**m.counters, **({"sg_trust": m.trust} if m.trust_rate else {})}
            for m in models if m.generator is not None]
