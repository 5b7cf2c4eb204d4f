"""A run's shared plan: its id, folder, settings and every endpoint, in one file (config.json).

Every process of a pipeline reads the same file, so the endpoints live in one place and the
run folder records them. Ranks are 0-based; stage k binds fwd_in[k] and grad_in[k].
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

from dni_async.runtime import wire
from dni_async.config import Config, ConfigError, config_from_dict

EVAL_CHUNK = 4096      # rows per eval message: bounds the largest array any stage accepts


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
        os.chmod(path, 0o600)   # it holds the run id, which every message must carry

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
    """Every address of the run: ipc files in a private folder, free tcp ports on cfg.host, or,
    when the config names the hosts, fixed ports from base_port that every host can derive."""
    n = cfg.n_stages
    if cfg.stage_hosts:
        p, c = cfg.base_port, cfg.coordinator_host
        return {
            "control": f"tcp://{c}:{p}",
            "results": f"tcp://{c}:{p + 1}",
            "monitor": f"tcp://{c}:{p + 2}",
            "fwd_in": [f"tcp://{h}:{p + 10 + 2 * k}" for k, h in enumerate(cfg.stage_hosts)],
            "grad_in": [f"tcp://{h}:{p + 11 + 2 * k}" if k < n - 1 else None
                        for k, h in enumerate(cfg.stage_hosts)],
        }
    if cfg.transport == "ipc":
        def ep(name):
            return wire.ipc_endpoint(ipc_dir, name)
    else:
        ports = iter(wire.free_tcp_ports(2 * n + 2, cfg.host))

        def ep(name):
            return f"tcp://{cfg.host}:{next(ports)}"
    return {
        "control": ep("control"),
        "results": ep("results"),
        "monitor": ep("monitor"),
        "fwd_in": [ep(f"fwd{k}") for k in range(n)],
        "grad_in": [ep(f"grad{k}") if k < n - 1 else None for k in range(n)],
    }


def all_endpoints(endpoints: dict) -> list:
    eps = [endpoints.get("control"), endpoints.get("results"), endpoints.get("monitor"),
           *endpoints.get("fwd_in", []), *endpoints.get("grad_in", [])]
    return [e for e in eps if e]


def ipc_files(endpoints: dict) -> list:
    return [p for p in map(wire.endpoint_path, all_endpoints(endpoints)) if p]


def release_ipc(bound: list) -> None:
    """A process's last act: remove the ipc files it bound, and their private folder once empty,
    so that even a run whose supervisor was killed leaves nothing behind in /tmp."""
    for ep in bound:
        path = wire.endpoint_path(ep) if ep else None
        if not path:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        folder = os.path.dirname(path)
        if os.path.basename(folder).startswith("dni-"):
            try:
                os.rmdir(folder)
            except OSError:
                pass   # not empty yet: the last process to leave removes it


def remove_ipc_files(endpoints: dict) -> None:
    for p in ipc_files(endpoints):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def check_ports_free(endpoints: dict) -> None:
    """Fail before any process starts if a tcp port this machine should bind is taken, or if
    two of the run's sockets would bind one address."""
    import socket as pysocket
    eps = [ep for ep in [endpoints["control"], endpoints["results"], endpoints.get("monitor"),
                         *endpoints["fwd_in"], *endpoints["grad_in"]] if ep]
    twice = sorted({ep for ep in eps if eps.count(ep) > 1})
    if twice:
        raise ConfigError(f"two sockets would bind the same address: {', '.join(twice)}")
    for ep in eps:
        if not ep.startswith("tcp://"):
            continue
        host, port = ep[len("tcp://"):].rsplit(":", 1)
        s = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
        # as ZeroMQ binds: a port left in TIME_WAIT by a run that just ended is free to it
        s.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == 98:   # EADDRINUSE
                raise ConfigError(f"port {port} on {host} is in use ({ep})") from None
            # EADDRNOTAVAIL: another host's address; that host checks it
        finally:
            s.close()
