"""The single-process reference trainer: every stage's rules, run in order in one process.

    dni-async reference --preset seed --mode backprop     # the seed post's run
    dni-async reference --preset seed --mode cdni

The pipeline must reproduce this run: in lockstep modes bit for bit, in decoupled modes in
distribution (targets reach generators at other moments there).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dni_async.nn import metrics
from dni_async.nn import network
from dni_async import report
from dni_async.nn import stage_model
from dni_async.nn.modes import mode_of
from dni_async.nn.program import StageProgram
from dni_async.config import Config


class OneProcess:
    """Every stage's program in this process, in the order a pipeline runs them.

    Messages between stages go into queues: a batch's forward messages are run to the last
    stage first, then the gradients from the last stage back to the first. Each stage thereby
    sees its messages in the order it sees them as a process in lockstep, which is why lockstep
    pipelines equal this bit for bit; decoupled pipelines differ only in when targets arrive."""

    def __init__(self, models, cfg: Config):
        self.models, self.cfg, self.n = models, cfg, len(models)
        self.mode = mode_of(cfg)
        self.fwd = [deque() for _ in range(self.n)]
        self.grad = [deque() for _ in range(self.n)]
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
        measure = (fidelity is not None and self.mode.has_generator(0, n)
                   and cfg.fidelity_every > 0 and step % cfg.fidelity_every == 0)
        w_fwd = [m.layer.W.copy() for m in self.models] if measure else None
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
            fidelity.append(_fidelity_row(self.models, step, x, self.sent, w_fwd))
        for k in range(n - 2, -1, -1):
            while self.grad[k]:
                self.programs[k].on_gradient(*self.grad[k].popleft())
        self.sums = self.sent = None


def train_step(models, cfg: Config, step: int, x, y, sums: dict, fidelity=None) -> None:
    """One batch, for callers without a `OneProcess` of their own."""
    OneProcess(models, cfg).step(step, x, y, sums, fidelity)


def _fidelity_row(models, step: int, x, sent: list, w_fwd: list) -> dict:
    """Per stage k < N-1: the synthetic dL/dh_k against the true one (cos, relative error),
    and the bootstrapped target it will be trained on against the true one (target_cos)."""
    n = len(models)
    hs = [x] + [arrays[0] for k, kind, arrays in sent if kind == "fwd"]
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
            true = models[k].layer.delta(hs[k + 1], true).dot(w_fwd[k].T)
    return row


def evaluate(models, cfg: Config, x, y, chunk: int = 4096) -> dict:
    sums = metrics.empty()
    for i in range(0, len(x), chunk):
        h = x[i:i + chunk]
        for m in models:
            h = m.forward(h)
        metrics.add(sums, metrics.batch_sums(cfg.task, cfg.loss, h, y[i:i + chunk]))
    return sums


def train(cfg: Config, log=print, progress=None) -> dict:
    """Train in one process; returns the run summary (the same keys `train` writes).
    `progress(epochs_done)`, when given, is called after every epoch (a progress bar)."""
    wall0 = time.perf_counter()
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    bpe, bs = cfg.batches_per_epoch(), cfg.batch_size
    every = report.log_every(cfg)
    history, train_seconds = [], 0.0
    runner = OneProcess(models, cfg)
    fidelity = [] if cfg.fidelity_every and runner.mode.has_generator(0, cfg.n_stages) else None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        sums = metrics.empty()
        first = len(fidelity) if fidelity is not None else 0
        for i in range(bpe):
            x, y = ds.x_train[i * bs:(i + 1) * bs], ds.y_train[i * bs:(i + 1) * bs]
            runner.step(epoch * bpe + i, x, y, sums, fidelity)
        dt = time.perf_counter() - t0
        train_seconds += dt
        test = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            test = metrics.summarize(evaluate(models, cfg, ds.x_test, ds.y_test), "test")
        row = report.history_row(epoch, sums, test, train_seconds, bpe * bs / dt if dt else 0.0)
        if fidelity is not None and len(fidelity) > first:   # per stage, this epoch's means
            for key in ("cos", "rel", "target_cos"):
                row[f"fidelity_{key}"] = np.mean([r[key] for r in fidelity[first:]],
                                                 axis=0).tolist()
        history.append(row)
        if log and report.diverged(row) and (len(history) < 2 or not report.diverged(history[-2])):
            log(f"epoch {epoch + 1}: {report.DIVERGED}")
        if log and ((epoch + 1) % every == 0 or epoch == cfg.epochs - 1):
            log(report.format_row(row, cfg.epochs))
        if progress:
            progress(epoch + 1)
    final = {**metrics.summarize(evaluate(models, cfg, ds.x_train, ds.y_train), "train"),
             **metrics.summarize(evaluate(models, cfg, ds.x_test, ds.y_test), "test")}
    return {
        "kind": "reference",
        "config": cfg.to_dict(),
        "history": history,
        "final": final,
        "wall_seconds": time.perf_counter() - wall0,
        "train_seconds": train_seconds,
        "samples_per_s": cfg.epochs * bpe * bs / train_seconds if train_seconds else 0.0,
        "weights_sha256": [m.weights_sha256() for m in models],
        "generators": _generator_counters(models),
        "fidelity": fidelity,
        "machine": report.machine(),
    }


def _generator_counters(models) -> list:
    return [dict(m.counters) for m in models if m.generator is not None]
