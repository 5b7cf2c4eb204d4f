"""Building the network: data first, then weights layer by layer, from one seeded stream.

Every process of a pipeline calls `build` with the same config and keeps its own stage, so a
layer starts identical wherever it runs (and identical to the single-process reference).
"""

from __future__ import annotations

import numpy as np

from dni_async.data import datasets as data_mod
from dni_async import nn
from dni_async.config import Config, ConfigError
from dni_async.nn import optim
from dni_async.nn.modes import mode_of
from dni_async.nn.norm import BatchNorm
from dni_async.nn.stage_model import StageModel


def init_weights(cfg: Config, rng: np.random.RandomState, fan_in: int, fan_out: int):
    if cfg.init == "seed":
        return rng.randn(fan_in, fan_out) * 0.2 - 0.1
    if cfg.init == "xavier":
        return rng.randn(fan_in, fan_out) * np.sqrt(1.0 / fan_in)
    return rng.randn(fan_in, fan_out) * np.sqrt(2.0 / fan_in)   # he


def load_data_and_rng(cfg: Config):
    """The dataset, and the stream positioned where the weights start (the seed's order)."""
    rng = np.random.RandomState(cfg.seed)
    return data_mod.load(cfg, rng), rng


def resolve_dims(cfg: Config, dataset) -> Config:
    """Widths come from the data; a config that states other ones is refused, not bent."""
    for name, have in (("input_dim", dataset.input_dim), ("output_dim", dataset.output_dim)):
        stated = getattr(cfg, name)
        if stated and stated != have:
            raise ConfigError(f"{name} = {stated} does not match the dataset ({have} columns)")
        setattr(cfg, name, have)
    return cfg


def build(cfg: Config, rng: np.random.RandomState, ranks=None) -> list:
    """StageModels for the given ranks (0-based; all by default). Draws every layer's weights
    in order whatever the ranks, so stage k's weights never depend on which process asks."""
    dtype = np.dtype(cfg.dtype)
    widths, acts = cfg.widths, cfg.activations()
    n = cfg.n_stages
    mode = mode_of(cfg)
    ranks = range(n) if ranks is None else ranks
    weights = [init_weights(cfg, rng, widths[k], widths[k + 1]) for k in range(n)]
    adam = {"beta1": cfg.adam_beta1, "beta2": cfg.adam_beta2, "eps": cfg.adam_eps}
    models = {}
    for k in ranks:
        last = k == n - 1
        W = weights[k].astype(dtype)
        norm = BatchNorm(widths[k + 1], dtype) if cfg.batch_norm and not last else None
        # a bias before batch norm is cancelled by its mean: the norm's beta takes its place
        b = np.zeros(widths[k + 1], dtype) if cfg.bias and norm is None else None
        layer = nn.Dense(W, b, acts[k], norm=norm)
        gen = None
        if mode.has_generator(k, n, cfg.true_boundaries):
            ctx_dim = nn.context_dim(cfg.generator_context(), widths[k + 1], cfg.output_dim)
            gen = nn.Generator(ctx_dim, widths[k + 1], cfg.generator_lr, dtype,
                               hidden=cfg.generator_hidden,
                               rng=np.random.RandomState([cfg.seed, 2, k]),
                               normalize=cfg.generator_normalize,
                               batch_norm=cfg.generator_batch_norm,
                               optimizer=cfg.generator_optimizer, **adam,
                               per_label=cfg.output_dim if cfg.generator_maps_per_label() else 0,
                               per_label_lr=cfg.generator_per_label_lr)
        lr = cfg.lr
        if cfg.synthetic_lr and mode.learns_from_guess(k, n, cfg.true_boundaries):
            lr = cfg.synthetic_lr
        decay = cfg.epochs * cfg.batches_per_epoch() if cfg.lr_decay == "linear" else 0
        opt = optim.make(cfg.optimizer, layer.named_params(), lr, **adam, decay_updates=decay)
        models[k] = StageModel(layer, lr=lr, loss=cfg.loss if last else None,
                               generator=gen, context=cfg.generator_context(),
                               max_pending=cfg.max_pending, optimizer=opt,
                               frozen=cfg.freeze_hidden and not last, sg_scale=cfg.sg_scale,
                               recompute=cfg.generator_recompute,
                               trust=cfg.sg_trust if gen is not None else 0.0)
    return [models[k] for k in ranks]
