"""One flat run configuration: defaults, presets, overrides from a TOML file or flags, checks.

A run is fully described by a `Config`; it is saved with every run (config.json) and is what
each process of a pipeline reads to build its part. Presets are named sets of overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields

from dni_async.nn import modes

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


MODES = tuple(modes.MODES)
DTYPES = ("float64", "float32")
TRANSPORTS = ("ipc", "tcp")
INITS = ("seed", "xavier", "he")
OPTIMIZERS = ("sgd", "adam")
CONTEXT_NORMS = ("none", "batch", "example")


class ConfigError(ValueError):
    """A bad setting, reported as one clear line before any process starts."""


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags end as one line (a ConfigError), like every other bad input."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


@dataclass
class Config:
    preset: str = "seed"
    # data
    dataset: str = "binary-addition"    # binary-addition | mnist1d | digits | PATH.npz
    bits: int = 12                      # binary addition: bits of the sum
    n_train: int = 1000
    n_test: int = 1000
    # network: len(hidden) + 1 stages
    hidden: list = field(default_factory=lambda: [128, 64])
    layers: int = 0                     # N > 0: N weight layers, every hidden one hidden[0] wide
    activation: list = field(default_factory=lambda: ["sigmoid"])   # per hidden layer; one name = all
    output_activation: str = "sigmoid"
    loss: str = "squared"
    bias: bool = False
    init: str = "seed"                  # seed: randn * 0.2 - 0.1, as the post did
    batch_norm: bool = False            # batch norm in every hidden layer (before its activation)
    # training
    mode: str = "backprop"
    epochs: int = 1000
    batch_size: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"              # sgd: on batch sums, as the seed | adam: per-example means
    adam_beta1: float = 0.9             # Adam's settings, for layers and generators alike
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    freeze_hidden: bool = False         # the control: hidden layers never update
    generator_lr: float = 0.0001
    generator_optimizer: str = "sgd"    # sgd | adam, with generator_lr
    generator_hidden: int = 0           # 0: linear generator; N: one relu hidden layer of N
    generator_batch_norm: bool = False  # batch norm on the generator's hidden layer
    generator_normalize: str = "none"   # the generator's input: none | batch | example
                                        # (per column over the batch, or per row); true = batch
    generator_per_label: bool = False   # a context [h, y]: also one linear map of h per label
                                        # (the generator over [h, y, h (x) y]); no y: ignored
    generator_per_label_lr: float = 0.0  # those maps' own rate; 0 = generator_lr
    generator_recompute: bool = True    # a late target trains the generator's current guess
    lr_decay: str = "none"              # the layers' adam: none | linear (to nothing by the
                                        # last planned update; generators keep their rate)
    sg_trust: float = 0.0               # dni/cdni, > 0: a synthetic step's lr is scaled by its
                                        # guesses' recent cosine with their targets (the mean's
                                        # rate); lockstep modes have no guesses and ignore it
    synthetic_lr: float = 0.0           # dni/cdni: layers trained on a guess; 0 = lr
    sg_scale: float = 1.0               # synthetic gradients are multiplied by this for the layer
    target_delay: int = 0               # reference dni/cdni: targets reach generators D steps late
    context: str = "auto"               # h | y | hy; auto: h for dni, hy for cdni
    true_boundaries: list = field(default_factory=list)   # dni/cdni: boundaries k (stage k ->
                                        # k+1) that carry the true gradient; stage k waits there
    micro_batches: int = 4              # gpipe only
    seed: int = 1
    dtype: str = "float64"
    # pipeline
    transport: str = "ipc"
    host: str = "127.0.0.1"
    max_in_flight: int = 4
    max_pending: int = 64
    eval_every: int = 1
    eval_batches: int = 0               # also evaluate held-out every N training batches (0: no)
    stop_at: str = ""                   # e.g. "test_bit_acc=0.9": stop once an evaluation reaches it
    time_budget_s: float = 0.0          # stop after this many training seconds (0: no budget)
    log_every: int = 0                  # 0: about 20 lines per run
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 3.0
    startup_timeout_s: float = 30.0
    checkpoint_every: int = 0           # epochs between checkpoints; 0: only on Ctrl-C / SIGTERM
    keep_checkpoints: int = 2
    curve_keys: str = ""                # folder made by `dni-async keys`: tcp with CURVE
    allow_insecure: bool = False        # tcp beyond loopback without CURVE (trusted networks)
    # several hosts: name each process's address; ports follow from base_port (see runspec)
    coordinator_host: str = ""
    stage_hosts: list = field(default_factory=list)
    base_port: int = 0
    fidelity_every: int = 0             # reference dni/cdni: every N batches compare synthetic
                                        # and true dL/dh per stage (costs a backward pass); 0: off
    slow_stage: str = ""                # teaching: "K:Dms" adds D ms of busy compute to stage
                                        # K's forward pass, so waiting shows on any machine
    # resolved from the data at launch
    input_dim: int = 0
    output_dim: int = 0

    # -- derived -----------------------------------------------------------------------------

    @property
    def n_stages(self) -> int:
        return len(self.hidden) + 1

    @property
    def widths(self) -> list:
        return [self.input_dim, *self.hidden, self.output_dim]

    def activations(self) -> list:
        acts = list(self.activation)
        if len(acts) == 1:
            acts = acts * len(self.hidden)
        return acts + [self.output_activation]

    def generator_context(self) -> str:
        if self.context != "auto":
            return self.context
        return modes.MODES[self.mode].context or "h"

    def generator_maps_per_label(self) -> bool:
        """`generator_per_label` takes effect only where the generator sees both h and y."""
        return self.generator_per_label and self.generator_context() == "hy"

    @property
    def task(self) -> str:
        """What the outputs are: independent bits (binary addition) or one class per row."""
        return "bits" if self.dataset == "binary-addition" else "classes"

    def batches_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# What the classification presets share (docs/math-study.md: how each value was chosen).
CLASSIFIER = {"activation": ["relu"], "bias": True, "init": "he", "output_activation": "softmax",
              "loss": "softmax_xent", "batch_norm": True, "optimizer": "adam", "lr": 0.01,
              "generator_optimizer": "adam", "generator_lr": 0.001, "max_in_flight": 1,
              "true_boundaries": [-1], "sg_trust": 0.1, "eval_every": 5}

PRESETS: dict[str, dict] = {
    # The seed post's network and training, exactly (24 -> 128 -> 64 -> 12, sigmoid, no bias).
    "seed": {},
    # Short runs for tests and smoke checks.
    "tiny": {"bits": 6, "n_train": 200, "n_test": 200, "hidden": [32, 16], "epochs": 5},
    # A network with biases, tanh and relu: the second exactness check.
    "mixed": {"bits": 8, "n_train": 400, "n_test": 400, "hidden": [48, 32, 24],
              "activation": ["tanh", "relu", "tanh"], "bias": True, "init": "xavier",
              "lr": 0.01, "epochs": 20, "batch_size": 20},
    # Classification (the [data] extra): relu MLPs with batch norm in every hidden layer and
    # Adam, softmax cross-entropy; for dni/cdni linear generators (over [h, one-hot y] in cdni)
    # trained by their own Adam, the true gradient at the boundary next to the output, and one
    # batch in flight (docs/results.md: what each buys). The math was chosen in one process
    # (docs/math-study.md). `--layers N` gives N weight layers of the same width. Synthetic
    # steps are scaled by the guesses' record (`sg_trust`), which stops a late collapse seen in
    # both; MNIST-1D's generators also keep one map of h per class (`generator_per_label`):
    # about a point there, level on digits, and slower (docs/math-study.md, "Per-label maps"),
    # learning at a thirtieth of the shared map's rate (docs/math-study.md, "The per-label
    # maps' own rate").
    "mnist1d": {"dataset": "mnist1d", "n_train": 4000, "n_test": 1000, "hidden": [128, 128],
                **CLASSIFIER, "batch_size": 100, "epochs": 60,
                "generator_per_label": True, "generator_per_label_lr": 3e-5},
    "digits": {"dataset": "digits", "n_train": 1400, "n_test": 360, "hidden": [128, 128],
               **CLASSIFIER, "batch_size": 50, "epochs": 60},
}

# Defaults that differ by mode for the seed-like presets: what makes synthetic gradients learn.
MODE_DEFAULTS: dict[str, dict] = {
    "dni": {"generator_lr": 0.0005},
    "cdni": {"generator_lr": 0.0005},
}


def _coerce(name: str, value, current):
    """Turn a flag or TOML value into the field's type, or raise ConfigError."""
    if name == "generator_normalize":      # once a boolean: true meant over the batch
        if isinstance(value, bool):
            return "batch" if value else "none"
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return "batch"
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return "none"
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, list):
            if isinstance(value, str):
                text = value
                inner = text.strip().removeprefix("[").removesuffix("]")   # `[1, 2]` as in TOML
                value = [v.strip() for v in inner.split(",")] if inner.strip() else []
                if any(v == "" for v in value):
                    raise ConfigError(f"{name}: an empty item in {text!r}")
            value = list(value)
            if name in ("hidden", "true_boundaries"):
                return [int(v) for v in value]
            return [str(v) for v in value]
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            v = float(value)
            if v != v or v in (float("inf"), float("-inf")):
                raise ConfigError(f"{name}: {value!r} is not a finite number")
            return v
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {type(current).__name__}") from None


def read_toml(path: str, what: str = "config") -> dict:
    """A TOML file as a dict, or one ConfigError line saying why not."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def apply_sets(values: dict, items) -> dict:
    """`--set KEY=VALUE` items into `values` (dashes in KEY read as underscores)."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        values[k.strip().replace("-", "_")] = v.strip()
    return values


TABLES = ("run", "bench")    # the tables a run config may have: [run] settings, [bench] its own


def load_toml(path: str) -> dict:
    data = read_toml(path)
    unknown = [k for k, v in data.items() if isinstance(v, dict) and k not in TABLES]
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (settings go at the top level "
                          f"or in [run]; [bench] is for dni-async bench)")
    # a [run] table is accepted as well as top-level keys
    flat = dict(data.get("run", {}))
    flat.update({k: v for k, v in data.items() if not isinstance(v, dict)})
    names = {f.name for f in fields(Config)}
    for key in flat:
        if key not in names:
            raise ConfigError(f"{path}: unknown setting {key!r}{_closest(key, names)}")
    return flat


def _closest(name: str, names) -> str:
    import difflib
    near = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def make_config(overrides: dict | None = None, *, preset: str | None = None,
                one_mode: bool = False) -> Config:
    """Defaults, then the preset, then mode defaults, then explicit overrides; checked.
    `one_mode`: the overrides are for this run's mode alone (a single run's command line), so
    a setting they ask for that this mode cannot use is refused; tools that share settings
    across modes (bench, experiments) leave it unset and such a setting is ignored."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = preset or overrides.pop("preset", None) or "seed"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(preset=preset)
    mode = overrides.get("mode", PRESETS[preset].get("mode", cfg.mode))
    # mode defaults first: a preset that sets one of them (digits: generator_lr) keeps its own
    values = {**MODE_DEFAULTS.get(mode, {}), **PRESETS[preset]}
    values.update(overrides)
    cfg = _checked(cfg, values)
    # a preset's per-label maps serve whichever mode runs it (a full config written out, as the
    # bench's children read, repeats them); asked for beyond the preset, they must apply
    asked = "generator_per_label" in overrides and not PRESETS[preset].get("generator_per_label")
    if (one_mode and asked and cfg.generator_per_label and modes.MODES[cfg.mode].decoupled
            and not cfg.generator_maps_per_label()):
        raise ConfigError(f"generator_per_label needs a generator that sees h and y; in "
                          f"{cfg.mode} it sees {cfg.generator_context()} (use mode cdni, "
                          f"or context = hy)")
    rate = overrides.get("generator_per_label_lr")
    asked = rate is not None and cfg.generator_per_label_lr != PRESETS[preset].get(
        "generator_per_label_lr", 0.0)
    if (one_mode and asked and cfg.generator_per_label_lr > 0
            and modes.MODES[cfg.mode].decoupled and not cfg.generator_maps_per_label()):
        raise ConfigError(f"generator_per_label_lr sets the per-label maps' rate, and this "
                          f"{cfg.mode} run has none (they need generator_per_label = true and "
                          f"a generator that sees h and y)")
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved config (config.json) exactly, without applying presets again."""
    return _checked(Config(), data)


def _checked(cfg: Config, values: dict) -> Config:
    names = {f.name for f in fields(Config)}
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"unknown setting {name!r}{_closest(name, names)}")
        setattr(cfg, name, _coerce(name, value, getattr(cfg, name)))
    if cfg.layers:
        if cfg.layers < 2:
            raise ConfigError(f"layers must be at least 2 (one hidden layer), got {cfg.layers}")
        if cfg.hidden:
            cfg.hidden = [cfg.hidden[0]] * (cfg.layers - 1)
    validate(cfg)
    return cfg


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_slow_stage(text: str):
    """ "1:5ms" -> (1, 0.005); "" -> None; anything else a ConfigError."""
    if not text:
        return None
    import re
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+(?:\.\d*)?)\s*(ms|s|us)?\s*", text)
    if not m:
        raise ConfigError(f"slow_stage: want STAGE:DELAY such as 1:5ms, got {text!r}")
    delay = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "us": 1e-6, None: 1e-3}[m.group(3)]
    if not 0 < delay <= 10:
        raise ConfigError(f"slow_stage: the delay must be in (0, 10] s, got {text!r}")
    return int(m.group(1)), delay


def validate(cfg: Config) -> None:
    from dni_async import nn

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(cfg.mode in MODES, f"unknown mode {cfg.mode!r} (choose from {', '.join(MODES)})")
    need(cfg.dtype in DTYPES, f"unknown dtype {cfg.dtype!r} (choose from {', '.join(DTYPES)})")
    need(cfg.transport in TRANSPORTS, f"unknown transport {cfg.transport!r} (ipc or tcp)")
    need(cfg.init in INITS, f"unknown init {cfg.init!r} (choose from {', '.join(INITS)})")
    need(cfg.loss in nn.LOSSES, f"unknown loss {cfg.loss!r} (choose from {', '.join(nn.LOSSES)})")
    need(len(cfg.hidden) >= 1, "hidden: need at least one hidden layer (two stages)")
    need(all(w > 0 for w in cfg.hidden), f"hidden: widths must be positive, got {cfg.hidden}")
    for name in ("bits", "n_train", "n_test", "epochs", "batch_size", "max_in_flight",
                 "max_pending", "eval_every", "micro_batches"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    need(cfg.log_every >= 0, "log_every must be >= 0")
    need(cfg.eval_batches >= 0, "eval_batches must be >= 0")
    last = cfg.n_stages - 2
    bad = [k for k in cfg.true_boundaries if not -last - 1 <= k <= last]
    need(not bad, f"true_boundaries: {bad} outside 0..{last} (boundary k joins stage k and k+1; "
                  f"-1 is the last, next to the output)")
    cfg.true_boundaries = sorted({k % (last + 1) for k in cfg.true_boundaries})
    need(0 <= cfg.time_budget_s < float("inf"), "time_budget_s must be a number of seconds >= 0")
    from dni_async.progress import parse_target
    parse_target(cfg.stop_at, "stop_at")
    need(cfg.fidelity_every >= 0, "fidelity_every must be >= 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    need(cfg.generator_hidden >= 0, "generator_hidden must be >= 0")
    need(cfg.lr > 0 and cfg.generator_lr > 0, "lr and generator_lr must be positive")
    need(cfg.generator_per_label_lr >= 0,
         "generator_per_label_lr must be >= 0 (0: the per-label maps learn at generator_lr)")
    need(cfg.optimizer in OPTIMIZERS,
         f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    need(cfg.lr_decay in ("none", "linear"),
         f"unknown lr_decay {cfg.lr_decay!r} (choose from none, linear)")
    need(cfg.lr_decay == "none" or cfg.optimizer == "adam",
         "lr_decay = linear needs optimizer = adam (sgd stays the seed's constant step)")
    need(cfg.generator_optimizer in OPTIMIZERS,
         f"unknown generator_optimizer {cfg.generator_optimizer!r} "
         f"(choose from {', '.join(OPTIMIZERS)})")
    need(0 <= cfg.adam_beta1 < 1, f"adam_beta1 must be in [0, 1), got {cfg.adam_beta1}")
    need(0 <= cfg.adam_beta2 < 1, f"adam_beta2 must be in [0, 1), got {cfg.adam_beta2}")
    need(cfg.adam_eps > 0, f"adam_eps must be positive, got {cfg.adam_eps}")
    need(cfg.generator_normalize in CONTEXT_NORMS,
         f"unknown generator_normalize {cfg.generator_normalize!r} "
         f"(choose from {', '.join(CONTEXT_NORMS)})")
    need(not cfg.generator_batch_norm or cfg.generator_hidden > 0,
         "generator_batch_norm needs a generator hidden layer (generator_hidden > 0)")
    need(cfg.synthetic_lr >= 0, f"synthetic_lr must be >= 0 (0: lr), got {cfg.synthetic_lr}")
    need(0 <= cfg.sg_trust <= 1, f"sg_trust must be in [0, 1], got {cfg.sg_trust}")
    need(cfg.sg_scale > 0, f"sg_scale must be positive, got {cfg.sg_scale}")
    need(cfg.target_delay >= 0, f"target_delay must be >= 0, got {cfg.target_delay}")
    need(cfg.target_delay < cfg.max_pending,
         f"target_delay ({cfg.target_delay}) must be below max_pending ({cfg.max_pending}): "
         "otherwise every target arrives after its guess was dropped")
    need(cfg.layers == 0 or cfg.layers == cfg.n_stages,
         f"layers = {cfg.layers} but hidden has {len(cfg.hidden)} widths "
         f"({cfg.n_stages} layers)")
    need(0 < cfg.heartbeat_s < cfg.peer_timeout_s <= 3600,
         "need 0 < heartbeat_s < peer_timeout_s <= 3600 seconds")
    need(0 < cfg.startup_timeout_s <= 3600, "startup_timeout_s must be in (0, 3600] seconds")
    need(0 <= cfg.seed < 2 ** 32, f"seed must be in [0, 2**32), got {cfg.seed}")
    need(cfg.max_pending >= cfg.max_in_flight,
         f"max_pending ({cfg.max_pending}) must be at least max_in_flight ({cfg.max_in_flight}): "
         "otherwise generator targets are thrown away before they arrive")
    need(cfg.bits <= 62, "bits must be <= 62")
    need(cfg.batch_size <= cfg.n_train,
         f"batch_size {cfg.batch_size} is larger than the training set ({cfg.n_train})")
    acts = cfg.activation
    need(len(acts) in (1, len(cfg.hidden)),
         f"activation: give one name or one per hidden layer ({len(cfg.hidden)}), got {len(acts)}")
    for a in cfg.activations():
        need(a in nn.ACTIVATIONS, f"unknown activation {a!r} (choose from {', '.join(nn.ACTIVATIONS)})")
    need("softmax" not in cfg.activations()[:-1], "softmax is only allowed as the output activation")
    need((cfg.loss == "softmax_xent") == (cfg.output_activation == "softmax"),
         "softmax output and softmax_xent loss go together")
    ctx = cfg.generator_context()
    need(ctx in nn.CONTEXTS, f"unknown context {ctx!r} (choose from auto, {', '.join(nn.CONTEXTS)})")
    if cfg.stage_hosts or cfg.coordinator_host or cfg.base_port:
        need(cfg.transport == "tcp", "stage_hosts / coordinator_host / base_port need transport = tcp")
        need(len(cfg.stage_hosts) == cfg.n_stages,
             f"stage_hosts names {len(cfg.stage_hosts)} hosts for {cfg.n_stages} stages")
        need(bool(cfg.coordinator_host), "coordinator_host is missing")
        need(1024 <= cfg.base_port <= 65535 - 2 * cfg.n_stages - 10,
             f"base_port must leave room for {2 * cfg.n_stages + 10} ports below 65536")
    if cfg.curve_keys:
        need(cfg.transport == "tcp", "curve_keys secures tcp; ipc is local and needs no keys")
    if cfg.transport == "tcp" and not cfg.curve_keys and not cfg.allow_insecure:
        hosts = [cfg.host, cfg.coordinator_host, *cfg.stage_hosts]
        outside = [h for h in hosts if h and not _is_loopback(h)]
        need(not outside, f"tcp on {', '.join(outside)} reaches beyond this machine: make keys "
             "with `dni-async keys` and set curve_keys, or set allow_insecure = true")
    slow = parse_slow_stage(cfg.slow_stage)
    need(slow is None or slow[0] < cfg.n_stages,
         f"slow_stage: stage {slow and slow[0]} does not exist ({cfg.n_stages} stages)")
    pieces = modes.MODES[cfg.mode].pieces(cfg)
    fits = [m for m in range(2, min(cfg.batch_size, 16) + 1) if cfg.batch_size % m == 0]
    need(cfg.batch_size % pieces == 0,
         f"{cfg.mode}: batch_size {cfg.batch_size} must divide into {pieces} micro-batches: "
         + (f"set --micro-batches to one of {', '.join(map(str, fits))}, or " if fits else "")
         + f"a --batch-size that {pieces} divides")
