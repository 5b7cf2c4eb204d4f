"""When a run evaluates and when it stops: held-out evaluations at a fixed cadence of training
batches (`eval_batches`), a target that ends training once an evaluation reaches it
(`stop_at`), and a budget of training seconds (`time_budget_s`).

The one-process reference and the pipeline's coordinator keep one `Progress` each, so their
curves have the same points and, in lockstep, the same numbers. A curve point is
`{"batches", "epoch", "seconds", "test_loss", "test_bit_acc", "test_exact_acc"}`, `seconds`
being training seconds (evaluations excluded) and `epoch` the epochs trained so far (2.5: half
way through the third; 3.0: the end of epoch 3 as metrics.csv counts it); the first point is
the untrained network's.
"""

from __future__ import annotations

from dataclasses import dataclass

from dni_async.config import ConfigError

METRICS = ("test_bit_acc", "test_exact_acc", "train_bit_acc", "train_exact_acc", "loss",
           "test_loss")


@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    def reached(self, row: dict) -> bool:
        v = row.get(self.metric)
        if v is None:
            return False
        return v <= self.value if self.metric.endswith("loss") else v >= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def parse_target(text: str | None, what: str = "target") -> Target | None:
    """`METRIC=VALUE`, e.g. test_bit_acc=0.9; None for nothing."""
    if text is None or str(text).strip() == "":
        return None
    if "=" not in str(text):
        raise ConfigError(f"{what} wants METRIC=VALUE, got {text!r}")
    name, value = (p.strip() for p in str(text).split("=", 1))
    if name not in METRICS:
        raise ConfigError(f"{what}: metric must be one of {', '.join(METRICS)}, got {name!r}")
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"{what}: cannot read {value!r} as a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{what}: {value!r} is not a finite number")
    return Target(name, v)


def chance(task: str, output_dim: int) -> dict:
    """What guessing scores: a coin per bit, or one class in `output_dim`."""
    if task == "bits":
        return {"test_bit_acc": 0.5, "test_exact_acc": 0.5 ** output_dim,
                "train_bit_acc": 0.5, "train_exact_acc": 0.5 ** output_dim}
    c = 1.0 / output_dim
    return {"test_bit_acc": c, "test_exact_acc": c, "train_bit_acc": c, "train_exact_acc": c}


class Progress:
    def __init__(self, cfg, curve: list | None = None, batches: int = 0):
        self.every = cfg.eval_batches
        self.batches_per_epoch = cfg.batches_per_epoch()
        self.target = parse_target(cfg.stop_at, "stop_at")
        self.budget_s = cfg.time_budget_s
        self.curve = curve if curve is not None else []   # kept, not copied: a run's state owns it
        self.batches = batches          # training batches done so far
        self.stopped = None             # why training ended early: "target" or "budget"

    def starting(self) -> bool:
        """An evaluation of the untrained network is due (cadence set, nothing recorded)."""
        return bool(self.every) and not self.curve

    def missing_point(self) -> bool:
        """An evaluation was due at this batch and is not on the curve (an interrupt cut it
        short): a resume takes it first."""
        return (bool(self.every) and self.batches > 0 and self.batches % self.every == 0
                and self.point_at(self.batches) is None)

    def trained_one(self) -> bool:
        """Count one batch; True when an evaluation is due after it."""
        self.batches += 1
        return bool(self.every) and self.batches % self.every == 0

    def out_of_time(self, train_seconds: float) -> bool:
        if self.budget_s and train_seconds >= self.budget_s:
            self.stopped = self.stopped or "budget"
        return self.stopped is not None

    def record(self, train_seconds: float, test: dict) -> dict:
        """A curve point; marks the run stopped when it reaches the target."""
        point = {"batches": self.batches, "epoch": round(self.batches / self.batches_per_epoch, 4),
                 "seconds": train_seconds, **test}
        if self.curve and self.curve[-1]["batches"] == self.batches:
            self.curve[-1] = point
        else:
            self.curve.append(point)
        if self.target and self.target.reached(point):
            self.stopped = self.stopped or "target"
        return point

    def point_at(self, batches: int) -> dict | None:
        """The curve point taken after exactly `batches` batches, if there is one."""
        if self.curve and self.curve[-1]["batches"] == batches:
            return self.curve[-1]
        return None


def time_to(curve: list, target: Target | None) -> float | None:
    """Training seconds until the curve first reaches the target (None: never)."""
    if target is None:
        return None
    for point in curve:
        if target.reached(point):
            return point["seconds"]
    return None
