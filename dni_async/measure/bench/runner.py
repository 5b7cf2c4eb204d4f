"""The whole bench: every mode side by side on the same processes, traced runs, sweeps."""

from __future__ import annotations

import os
import time

from dni_async.config import Config, make_config
from dni_async.measure.bench.calibrate import add_alone, calibrate
from dni_async.measure.bench.children import mode_config, run_pipeline, run_reference
from dni_async import progress
from dni_async.measure.bench.figures import (_median, check_target, default_target,
                                             start_metric, steady_rate, summarize_mode,
                                             summarize_reference, time_to, verdict)
from dni_async.nn.modes import BASELINE


class Bench:
    def __init__(self, args, values: dict, modes: list, repeats: int, warmup: int, target,
                 run_root: str, log):
        self.args, self.values, self.modes = args, values, modes
        self.repeats, self.warmup, self.target = repeats, warmup, target
        self.root, self.log = run_root, log
        self.cores = os.cpu_count() or 1
        self.cfgs = {m: mode_config(values, m) for m in modes}
        self.on_run = lambda done: None     # a progress bar's advance, in a terminal

    def _resolved(self, cfg: Config) -> Config:
        from dni_async.nn import network
        ds, _ = network.load_data_and_rng(cfg)
        network.resolve_dims(cfg, ds)
        return cfg

    def modes_table(self) -> dict:
        cfgs = {m: self._resolved(c) for m, c in self.cfgs.items()}
        any_cfg = next(iter(cfgs.values()))
        metric = "test_bit_acc" if any_cfg.task == "bits" else "test_exact_acc"
        if self.target:
            metric = self.target.metric
        chance = progress.chance(any_cfg.task, any_cfg.output_dim).get(metric)
        start = start_metric(any_cfg, metric)
        if self.target:
            check_target(self.target, chance, start)
        alone = {}
        for m in self.modes:
            t0 = time.perf_counter()
            alone[m] = calibrate(cfgs[m], self.root)
            self.log(f"  {m:<8} stages timed alone: "
                     + " ".join(f"{x:.2f}" for x in alone[m]["stage_batch_ms"])
                     + f" ms per batch ({time.perf_counter() - t0:.1f} s)")
        runs = {m: [] for m in self.modes}
        n_runs = self.repeats * len(self.modes)
        i = 0
        for r in range(self.repeats):
            for m in self.modes:        # interleaved: every repeat runs every mode once
                i += 1
                t0 = time.perf_counter()
                s = run_pipeline(cfgs[m], os.path.join(self.root, f"{m}-r{r}"),
                                 keep_weights=self.args.keep_weights)
                runs[m].append(s)
                rate = steady_rate(s["history"], self.warmup,
                                   cfgs[m].batches_per_epoch() * cfgs[m].batch_size)
                self.log(f"  [{i}/{n_runs}] {m:<8} repeat {r + 1}: {rate:>10,.0f} samples/s "
                         f"({time.perf_counter() - t0:.1f} s)")
                self.on_run(i)
        results = {m: summarize_mode(cfgs[m], runs[m], self.warmup, self.cores, None, metric)
                   for m in self.modes}
        for m in self.modes:
            add_alone(results[m], alone[m], cfgs[m].batch_size, self.cores)
        target = self.target or default_target(results, metric, chance, start)
        for m in self.modes:
            results[m]["time_to_target_s"] = _median([time_to(r, target) for r in runs[m]])
            results[m]["reached_target"] = sum(time_to(r, target) is not None for r in runs[m])
        refs = {}
        if self.args.reference:
            ref_cfg = self._resolved(mode_config(self.values, "backprop"))
            for key, threads in (("reference", 1), ("reference_all_cores", self.cores)):
                t0 = time.perf_counter()
                s = run_reference(ref_cfg, os.path.join(self.root, key), threads)
                refs[key] = summarize_reference(ref_cfg, s, self.warmup, target, metric)
                self.log(f"  {key:<20} {refs[key]['samples_per_s']:>10,.0f} samples/s "
                         f"({threads} BLAS thread{'s' if threads > 1 else ''}, "
                         f"{time.perf_counter() - t0:.1f} s)")
        base = results.get(BASELINE, {}).get("samples_per_s")
        t_base = results.get(BASELINE, {}).get("time_to_target_s")
        for row in [*results.values(), *refs.values()]:
            row["speedup"] = row["samples_per_s"] / base if base else None
            t = row.get("time_to_target_s")
            row["time_to_target_speedup"] = t_base / t if t and t_base else None
        return {"results": results, "refs": refs, "target": target, "metric": metric,
                "chance": chance, "start": start, "cfgs": cfgs,
                "verdict": verdict(results, refs, target)}

    def traced(self, modes: list, untraced: dict) -> dict:
        """Per mode, a short untraced run and then the same run traced: the pair gives the
        tracing overhead measured side by side; the traced one gives the timeline."""
        out = {}
        for m in modes:
            cfg = mode_config(self.values, m, epochs=min(self.cfgs[m].epochs, self.warmup + 1))
            spe = cfg.batches_per_epoch() * cfg.batch_size
            t0 = time.perf_counter()
            plain = steady_rate(run_pipeline(cfg, os.path.join(self.root, f"{m}-untraced"))
                                ["history"], self.warmup, spe)
            d = os.path.join(self.root, f"{m}-traced")
            s = run_pipeline(cfg, d, trace=True, keep_weights=self.args.keep_weights)
            rate = steady_rate(s["history"], self.warmup, spe)
            n_spans = sum(len(p["spans"]) for p in _read_span_files(d))
            per_batch = n_spans / (cfg.epochs * cfg.batches_per_epoch())
            base = untraced.get(m, {}).get("samples_per_s") or plain
            batch_us = 1e6 * cfg.batch_size / base if base else None
            out[m] = {"run_dir": d, "samples_per_s": rate, "untraced_samples_per_s": plain,
                      "spans": n_spans, "spans_per_batch": per_batch,
                      "overhead": (plain / rate - 1) if plain and rate else None,
                      "estimated_overhead": per_batch * self.span_cost_us / batch_us
                      if batch_us else None}
            self.log(f"  traced {m:<8} {rate:>10,.0f} samples/s, untraced {plain:,.0f}, "
                     f"{n_spans} spans ({time.perf_counter() - t0:.1f} s)")
        return out

    @property
    def span_cost_us(self) -> float:
        if not hasattr(self, "_span_cost"):
            self._span_cost = span_cost_us()
        return self._span_cost

    def sweep(self, key: str, values: list, modes: list, epochs: int) -> dict:
        points = []
        base_cfg = make_config(self.values)
        for v in values:
            over = {"epochs": epochs}
            if key == "width":
                # narrow layers run more batches, so each measurement lasts about as long
                over["hidden"] = [v] * len(base_cfg.hidden)
                over["n_train"] = base_cfg.n_train * max(1, min(8, round(max(base_cfg.hidden) / v)))
            else:
                over[key] = v
            point = {"value": v, "n_train": over.get("n_train", base_cfg.n_train), "modes": {}}
            for m in modes:
                cfg = self._resolved(mode_config(self.values, m, **over))
                t0 = time.perf_counter()
                s = run_pipeline(cfg, os.path.join(self.root, f"sweep-{key}{v}-{m}"))
                row = summarize_mode(cfg, [s], min(self.warmup, epochs - 1), self.cores, None,
                                     "test_bit_acc")
                add_alone(row, calibrate(cfg, self.root), cfg.batch_size, self.cores)
                for drop in ("history", "final", "stage_times_s", "run_dirs"):
                    row.pop(drop, None)
                point["modes"][m] = row
                self.log(f"  sweep {key}={v} {m:<8} {row['samples_per_s']:>10,.0f} samples/s "
                         f"({time.perf_counter() - t0:.1f} s)")
            if "backprop" in point["modes"]:
                base = point["modes"]["backprop"]["samples_per_s"]
                for row in point["modes"].values():
                    row["speedup"] = row["samples_per_s"] / base if base else None
            points.append(point)
        return {"key": key, "values": values, "modes": modes, "epochs": epochs, "points": points}


def span_cost_us(n: int = 200_000) -> float:
    """What recording one span adds to timing it (microseconds), measured in this process."""
    from dni_async.measure.clock import Clock
    best = {}
    for _ in range(3):
        for record in (False, True):
            clock = Clock(record_spans=record, max_spans=n)
            t0 = time.perf_counter()
            for i in range(n):
                with clock.span("forward", i):
                    pass
            dt = (time.perf_counter() - t0) / n * 1e6
            best[record] = min(best.get(record, dt), dt)
    return max(0.0, best[True] - best[False])


class MachineShare:
    """How much of the cores other work took while the bench ran: busy CPU time of the whole
    machine (/proc/stat) minus this process's and its children's own, over wall time x cores."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()

    def others(self, cores: int):
        busy = _machine_busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (_own_cpu_s() - self.own0)
        return max(0.0, other / (wall * cores)) if wall > 0 else None


def _machine_busy_s():
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = f[0] + f[1] + f[2] + sum(f[5:8])      # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _read_span_files(run_dir: str) -> list:
    from dni_async.measure import trace
    return trace.read_spans(run_dir)
