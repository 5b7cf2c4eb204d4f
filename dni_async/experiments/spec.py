"""An experiment file, read and checked, and the runs it asks for."""

from __future__ import annotations

import os

from dni_async.config import MODES, ConfigError, make_config, read_toml

EXIT_BAD_INPUT = 2
KINDS = ("table", "sweep", "fidelity")
RUNNERS = ("pipeline", "reference")


class ExperimentFailed(RuntimeError):
    """A run of the experiment did not finish."""


def load_spec(path: str) -> dict:
    """Read and check an experiment file; every problem is one ConfigError line."""
    spec = read_toml(path, "experiment")
    spec.setdefault("kind", "table")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    spec.setdefault("title", spec["name"])
    spec.setdefault("runner", "pipeline")
    spec.setdefault("seeds", [1])
    spec.setdefault("settings", {})
    spec.setdefault("mode", {})
    spec["path"] = path
    known = {"kind", "name", "title", "output", "images", "runner", "modes", "seeds", "layers",
             "width", "vary", "values", "settings", "dataset", "mode", "path", "notes",
             "frozen_control", "every"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"experiment {path}: unknown key(s) {', '.join(unknown)}")
    if spec["kind"] not in KINDS:
        raise ConfigError(f"experiment {path}: kind must be one of {', '.join(KINDS)}")
    if spec["runner"] not in RUNNERS:
        raise ConfigError(f"experiment {path}: runner must be pipeline or reference")
    modes = spec.setdefault("modes", list(MODES) if spec["kind"] != "fidelity" else ["dni", "cdni"])
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"experiment {path}: unknown mode(s) {bad} (choose from {', '.join(MODES)})")
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise ConfigError(f"experiment {path}: seeds must be a list of integers")
    if spec["kind"] == "table":
        spec.setdefault("dataset", {})
        if not spec["dataset"]:
            raise ConfigError(f"experiment {path}: a table needs at least one [dataset.NAME]")
        layers = spec.setdefault("layers", [3])
        if not layers or not all(isinstance(n, int) and n >= 2 for n in layers):
            raise ConfigError(f"experiment {path}: layers must be integers >= 2 (stages)")
        if not isinstance(spec.setdefault("width", 128), int) or spec["width"] < 1:
            raise ConfigError(f"experiment {path}: width must be a positive integer")
    if spec["kind"] == "sweep":
        if "vary" not in spec or not spec.get("values"):
            raise ConfigError(f"experiment {path}: a sweep needs vary = \"KEY\" and values = [...]")
    if spec["kind"] == "fidelity":
        bad = [m for m in modes if m not in ("dni", "cdni")]
        if bad:
            raise ConfigError(f"experiment {path}: fidelity compares synthetic gradients: "
                              f"modes dni and cdni only, not {bad}")
    # every run's settings must make a valid config before anything starts
    for cfg_values, _ in plan(spec):
        make_config(cfg_values)
    return spec


def plan(spec: dict) -> list:
    """Every run of the experiment: (settings, labels), in the order they run."""
    runs = []
    base = dict(spec["settings"])
    if spec["kind"] == "table":
        for ds_name, ds_settings in spec["dataset"].items():
            for layers in spec["layers"]:
                for seed in spec["seeds"]:
                    for mode in spec["modes"]:   # modes interleaved: load drifts hit all alike
                        values = {**base, "dataset": ds_name, **ds_settings,
                                  **spec["mode"].get(mode, {}), "mode": mode, "seed": seed,
                                  "hidden": [spec["width"]] * (layers - 1)}
                        runs.append((values, {"dataset": ds_name, "layers": layers,
                                              "mode": mode, "seed": seed}))
    elif spec["kind"] == "sweep":
        for value in spec["values"]:
            for seed in spec["seeds"]:
                for mode in spec["modes"]:
                    values = {**base, **spec["mode"].get(mode, {}), "mode": mode, "seed": seed,
                              spec["vary"]: value}
                    runs.append((values, {spec["vary"]: value, "mode": mode, "seed": seed}))
    else:
        for seed in spec["seeds"]:
            for mode in spec["modes"]:
                values = {**base, **spec["mode"].get(mode, {}), "mode": mode, "seed": seed}
                runs.append((values, {"mode": mode, "seed": seed}))
    return runs
