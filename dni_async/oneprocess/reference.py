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
from dni_async.config import Config


def train_step(models, cfg: Config, step: int, x, y, sums: dict, fidelity=None,
               late=None) -> None:
    """One batch through every stage; adds its metric sums (taken before updates) to `sums`,
    in the order the pipeline's coordinator adds them, so the two agree to the last bit.

    With `fidelity` (a list) in dni/cdni, every `cfg.fidelity_every` steps it also carries
    the true dL/dh back from the loss through the forward-pass weights and appends, per
    stage, how close the synthetic gradient came; the training itself is unchanged.

    With `late` (a deque kept from step to step) in dni/cdni, the generators' targets wait
    there and reach their generators `cfg.target_delay` steps late, as a pipeline's would."""
    n = len(models)
    if cfg.mode == "gpipe":
        return _gpipe_step(models, cfg, step, x, y, sums)
    measure = (fidelity is not None and cfg.decoupled and cfg.fidelity_every > 0
               and step % cfg.fidelity_every == 0)
    caches = []
    hs = [x]
    targets = [None] * n
    w_fwd = [None] * n
    for k in range(n - 1):
        caches.append(models[k].forward_train(hs[k]))
        hs.append(caches[k].h)
        if cfg.decoupled:
            if measure:      # the update below changes W (and gamma) in place
                norm = models[k].layer.norm
                w_fwd[k] = (models[k].layer.W.copy(),
                            None if norm is None else norm.gamma.copy())
            targets[k] = models[k].synthetic_update(step, caches[k], y, need_grad_input=k > 0)
    caches.append(models[-1].forward_train(hs[-1]))
    hs.append(caches[-1].h)
    g, delta = models[-1].backward_from_loss(caches[-1], y, need_grad_input=n > 1)
    metrics.add(sums, metrics.batch_sums(cfg.task, cfg.loss, hs[n], y, delta))
    if measure:
        fidelity.append(_fidelity_row(models, step, caches, g, targets, w_fwd))
    if cfg.decoupled:
        targets[n - 1] = g
        if late is None:
            for k in range(n - 1):
                models[k].apply_target(step, targets[k + 1])
        else:
            late.append((step, targets[1:]))
            while late and late[0][0] <= step - cfg.target_delay:
                s, ts = late.popleft()
                for k in range(n - 1):
                    models[k].apply_target(s, ts[k])
    else:
        for k in range(n - 2, -1, -1):
            g = models[k].backward(caches[k], g, need_grad_input=k > 0)


def _fidelity_row(models, step: int, caches: list, g, targets: list, w_fwd: list) -> dict:
    """Per stage k < N-1: the synthetic dL/dh_k against the true one (cos, relative error),
    and the bootstrapped target it will be trained on against the true one (target_cos)."""
    n = len(models)
    row = {"step": step, "cos": [0.0] * (n - 1), "rel": [0.0] * (n - 1),
           "target_cos": [1.0] * (n - 1)}
    true = g                                       # dL/dh_{N-2}, from the loss
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


def _gpipe_step(models, cfg: Config, step: int, x, y, total: dict) -> None:
    """Micro-batches through every stage, gradients summed, one update per batch."""
    n, m = len(models), cfg.micro_batches
    for xm, ym in zip(np.array_split(x, m), np.array_split(y, m)):
        caches = []
        h = xm
        for k in range(n):
            caches.append(models[k].forward_train(h))
            h = caches[k].h
        g, delta = models[-1].micro_backward_from_loss(step, caches[-1], ym, m)
        metrics.add(total, metrics.batch_sums(cfg.task, cfg.loss, h, ym, delta))
        for k in range(n - 2, -1, -1):
            g = models[k].micro_backward(step, caches[k], g, m, need_grad_input=k > 0)


def evaluate(models, cfg: Config, x, y, chunk: int = 4096) -> dict:
    sums = metrics.empty()
    for i in range(0, len(x), chunk):
        h = x[i:i + chunk]
        for m in models:
            h = m.forward(h)
        metrics.add(sums, metrics.batch_sums(cfg.task, cfg.loss, h, y[i:i + chunk]))
    return sums


def train(cfg: Config, log=print) -> dict:
    """Train in one process; returns the run summary (the same keys `train` writes)."""
    wall0 = time.perf_counter()
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    bpe, bs = cfg.batches_per_epoch(), cfg.batch_size
    every = report.log_every(cfg)
    history, train_seconds = [], 0.0
    fidelity = [] if cfg.fidelity_every and cfg.decoupled else None
    late = deque() if cfg.decoupled and cfg.target_delay else None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        sums = metrics.empty()
        first = len(fidelity) if fidelity is not None else 0
        for i in range(bpe):
            x, y = ds.x_train[i * bs:(i + 1) * bs], ds.y_train[i * bs:(i + 1) * bs]
            train_step(models, cfg, epoch * bpe + i, x, y, sums, fidelity, late)
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
