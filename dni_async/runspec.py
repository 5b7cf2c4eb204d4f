"""A run's shared plan: its id, folder, settings and every endpoint, in one file (config.json).

Every process of a pipeline reads the same file, so the endpoints live in one place and the
run folder records them. Ranks are 0-based; stage k binds fwd_in[k] and grad_in[k].
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

from dni_async import wire
from dni_async.config import Config, ConfigError, config_from_dict


@dataclass
class RunSpec:
    config: Config
    run_dir: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    endpoints: dict = field(default_factory=dict)
    trace: bool = False
    resume_from: str | None = None      # a checkpoint folder, when resuming

    def save(self, path: str) -> None:
        from dni_async.report import write_json
        write_json(path, {"run_id": self.run_id, "run_dir": self.run_dir, "trace": self.trace,
                          "resume_from": self.resume_from,
                          "endpoints": self.endpoints, "config": self.config.to_dict()})

    @classmethod
    def load(cls, path: str) -> "RunSpec":
        try:
            with open(path) as fh:
                d = json.load(fh)
            return cls(config=config_from_dict(d["config"]), run_dir=d["run_dir"],
                       run_id=d["run_id"], endpoints=d["endpoints"], trace=d.get("trace", False),
                       resume_from=d.get("resume_from"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from None


def plan_endpoints(cfg: Config, ipc_dir: str | None) -> dict:
    """Every address of the run: ipc files in a private folder, or free tcp ports on cfg.host."""
    n = cfg.n_stages
    if cfg.transport == "ipc":
        def ep(name):
            return wire.ipc_endpoint(ipc_dir, name)
    else:
        def ep(name):
            return f"tcp://{cfg.host}:{wire.free_tcp_port(cfg.host)}"
    return {
        "control": ep("control"),
        "results": ep("results"),
        "fwd_in": [ep(f"fwd{k}") for k in range(n)],
        "grad_in": [ep(f"grad{k}") if k < n - 1 else None for k in range(n)],
    }


def ipc_files(endpoints: dict) -> list:
    eps = [endpoints.get("control"), endpoints.get("results"),
           *endpoints.get("fwd_in", []), *endpoints.get("grad_in", [])]
    return [p for p in (wire.endpoint_path(e) for e in eps if e) if p]


def remove_ipc_files(endpoints: dict) -> None:
    for p in ipc_files(endpoints):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
