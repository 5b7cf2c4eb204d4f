"""Where a run stands, as the coordinator keeps it: what a checkpoint saves and a resume restores.

A checkpoint of the whole pipeline is taken only while nothing is in flight: every stage is
asked to snapshot itself, each answers with its file's sha256, then the coordinator writes its
own state and the manifest (`checkpoint.py` has the on-disk format).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

from dni_async import report
from dni_async.config import ConfigError
from dni_async.nn import metrics
from dni_async.runtime import checkpoint
from dni_async.runtime.control import StageLost


@dataclass
class RunState:
    epoch: int = 0
    next_batch: int = 0                 # within the epoch
    n_eval: int = 0                     # evaluations so far: each one's step ids are its own
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    epoch_sums: dict = field(default_factory=metrics.empty)
    completed_steps: int = 0            # batches finished since the start
    batches: int = 0                    # training batches sent, for the evaluation cadence
    curve: list = field(default_factory=list)   # held-out points (progress.py)
    stopped: str | None = None          # "target" or "budget" when training ended early

    def step(self, batches_per_epoch: int) -> int:
        return self.epoch * batches_per_epoch + self.next_batch

    @classmethod
    def restore(cls, folder: str) -> "RunState":
        try:
            with open(os.path.join(folder, "coordinator.json")) as fh:
                s = json.load(fh)
            state = cls(int(s["epoch"]), int(s["next_batch"]), int(s["n_eval"]),
                        float(s["train_seconds"]), list(s["history"]), s["epoch_sums"],
                        int(s["completed_steps"]), int(s.get("batches", 0)),
                        list(s.get("curve", [])), s.get("stopped"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot resume from {folder}: {exc}") from None
        if not metrics.valid(state.epoch_sums):
            raise ConfigError(f"cannot resume from {folder}: damaged metric sums")
        return state


def take_checkpoint(control, pump, state: RunState, run_dir: str, cfg) -> str:
    """Snapshot every stage and the coordinator (call with nothing in flight); returns the
    checkpoint's folder."""
    step = state.step(cfg.batches_per_epoch())
    folder = checkpoint.folder(run_dir, step)
    os.makedirs(folder, exist_ok=True)
    control.acks = {}
    control.broadcast("checkpoint", {"step": step})    # each stage derives the folder
    limit = control.writes.deadline_s()      # grows with the bytes the stages write
    deadline = time.monotonic() + limit
    while len(control.acks) < control.n:
        if time.monotonic() > deadline:
            raise StageLost(f"{control.missing(control.acks)} did not confirm the "
                            f"checkpoint within {limit:.1f} s")
        pump(0.05)
    files = {a["file"]: a["sha256"] for a in control.acks.values()}
    body = json.dumps(asdict(state)).encode()
    report.atomic_write(os.path.join(folder, "coordinator.json"), body)
    files["coordinator.json"] = hashlib.sha256(body).hexdigest()
    checkpoint.write_manifest(folder, step, files)
    # verifying the older checkpoints hashes every file: heartbeats and messages meanwhile
    checkpoint.prune(run_dir, cfg.keep_checkpoints, folder, between=lambda: pump(0))
    return folder
