"""The bench's printed tables: modes side by side, the targets, the width sweep."""

from __future__ import annotations

from dni_async.measure.bounds import own_bound
from dni_async.config import Config

# Targets of the issue, checked (never asserted) on launch/wide.toml.
GOAL_SPEEDUP, GOAL_EFFICIENCY, GOAL_LOCKSTEP_COST, GOAL_WIRE = 1.6, 0.85, 1.15, 0.80


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def describe_layout(cfg: Config) -> str:
    return (f"{cfg.n_stages} stages, widths {cfg.widths}, batch {cfg.batch_size}, {cfg.dtype}, "
            f"{cfg.batches_per_epoch()} batches x {cfg.epochs} epochs, "
            f"activation {','.join(cfg.activation)}, {cfg.dataset}")


def _ms(xs: list) -> str:
    return " ".join(f"{x:6.2f}" for x in xs) + f"  sum {sum(xs):6.2f}"


def modes_text(res: dict, warmup: int, repeats: int, cores: int) -> str:
    results, refs, target, metric = res["results"], res["refs"], res["target"], res["metric"]
    tname = (f"{target.metric} {'<=' if target.metric.endswith('loss') else '>='} "
             f"{target.value:g}" if target else "-")
    alone = all("alone" in r for r in results.values())
    head = f"{'mode':<22}{'samples/s':>10}{'speed-up':>9}{'bound/s':>11}{'effic.':>7}"
    if alone:
        head += f"{'alone/s':>11}{'effic.':>7}"
    lines = [head + f"  {'s to ' + tname:>26}{'final ' + metric:>20}"]
    for m, r in results.items():
        reached = r["reached_target"]
        tt = fmt(r["time_to_target_s"], ".1f", "not reached")
        if r["time_to_target_s"] is not None and reached < repeats:
            tt += f" ({reached}/{repeats})"
        line = (f"{m:<22}{r['samples_per_s']:>10,.0f}{fmt(r['speedup'], '.2f'):>8}x"
                f"{r['bound_samples_per_s']:>11,.0f}{fmt(r['efficiency'], '.0%'):>7}")
        if alone:
            a = r["alone"]
            line += f"{a['bound_samples_per_s']:>11,.0f}{fmt(a['efficiency'], '.0%'):>7}"
        lines.append(line + f"  {tt:>26}{fmt(r['final_metric'], '.4f'):>20}")
    names = {"reference": "reference, 1 thread", "reference_all_cores":
             f"reference, {cores} threads"}
    for key, r in refs.items():
        pad = 18 + (18 if alone else 0)
        lines.append(f"{names[key]:<22}{r['samples_per_s']:>10,.0f}"
                     f"{fmt(r['speedup'], '.2f'):>8}x{'':>{pad}}  "
                     f"{fmt(r['time_to_target_s'], '.1f', 'not reached'):>26}"
                     f"{fmt(r['final_metric'], '.4f'):>20}")
    clock = {r["busy_clock"] for r in results.values()}
    clock = "thread CPU" if clock == {"cpu"} else "wall"
    lines += ["", "t_k, busy ms per batch per stage (forward + backward + generator + update):",
              f"  {'':<9} in the stage processes ({clock} time)"
              + ("          the same work alone, one process" if alone else "")]
    for m, r in results.items():
        line = f"  {m:<9} {_ms(r['stage_batch_ms'])}"
        if alone:
            line += f"    {_ms(r['alone']['stage_batch_ms'])}"
        lines.append(line)
    if "backprop" in results:
        r = results["backprop"]
        n = len(r["stage_batch_ms"])
        lines += ["", "lockstep backprop has one batch in flight; a stage updates while the "
                  "stages upstream carry on backward, so its own bound is",
                  "batch / max(chain, sum t_k / cores, max t_k), chain = its period per batch "
                  "were messages free:",
                  f"  backprop  {r['lockstep_bound_samples_per_s']:>9,.0f}/s "
                  f"(measured = {fmt(r['lockstep_efficiency'], '.0%')})"
                  + (f", alone {r['alone']['lockstep_bound_samples_per_s']:,.0f}/s (measured = "
                     f"{fmt(r['alone']['lockstep_efficiency'], '.0%')})" if alone else "")]
        ms = r["batch_ms"]
        chain = r["lockstep_chain_ms"]
        upd = sum(p[2] for p in r["stage_parts_ms"][1:])
        lines.append(f"  per batch {ms:.1f} ms: a chain of {chain:.1f} ms computing (of "
                     f"{sum(r['stage_batch_ms']):.1f} ms in all; {upd:.1f} ms of updates in "
                     f"stages 1..{n - 1}), the rest ({ms - chain:.1f} ms) in its {2 * n} hops "
                     "between processes (send, wake, receive)")
    lines += [
        "",
        f"samples/s: steady state (epochs after the first {warmup}), median of {repeats} "
        "repeat(s), modes interleaved; speed-up over pipeline backprop.",
        f"bound/s: batch / max(max t_k, sum t_k / {cores} cores) with t_k from the stage "
        "processes; effic. = samples/s / bound/s.",
    ]
    if alone:
        lines.append("alone/s: the same bound with t_k timed alone (one stage at a time, one "
                     "process, one BLAS thread): the work without other processes in its way.")
    return "\n".join(lines)


def targets(res: dict | None, wire_rows: list | None) -> list:
    out = []
    if res:
        r, refs = res["results"], res["refs"]
        if "cdni" in r and "backprop" in r:
            out.append({"name": "cdni speed-up over backprop", "value": r["cdni"]["speedup"],
                        "goal": GOAL_SPEEDUP, "higher_is_better": True})
        if "cdni" in r and r["cdni"]["efficiency"] is not None:
            out.append({"name": "cdni share of its bound", "value": r["cdni"]["efficiency"],
                        "goal": GOAL_EFFICIENCY, "higher_is_better": True})
        if "cdni" in r and (r["cdni"].get("alone") or {}).get("efficiency") is not None:
            out.append({"name": "cdni share of its bound, t_k timed alone",
                        "value": r["cdni"]["alone"]["efficiency"],
                        "goal": GOAL_EFFICIENCY, "higher_is_better": True})
        if "backprop" in r and "reference" in refs:
            cost = refs["reference"]["samples_per_s"] / r["backprop"]["samples_per_s"]
            out.append({"name": "lockstep pipeline time per batch / 1-thread reference",
                        "value": cost, "goal": GOAL_LOCKSTEP_COST, "higher_is_better": False})
    if wire_rows:
        big = max(wire_rows, key=lambda w: w["bytes"])
        out.append({"name": f"wire bandwidth at {big['bytes'] >> 20} MiB / raw pyzmq",
                    "value": big["bandwidth_ratio"], "goal": GOAL_WIRE, "higher_is_better": True})
    for t in out:
        v, g = t["value"], t["goal"]
        t["met"] = v is not None and (v >= g if t["higher_is_better"] else v <= g)
        t["margin"] = None if v is None else (v / g - 1 if t["higher_is_better"] else g / v - 1)
    return out


def targets_text(ts: list) -> str:
    lines = ["the project's targets for launch/wide.toml (meaningful for that config only), "
             "measured in this run:"]
    for t in ts:
        op = ">=" if t["higher_is_better"] else "<="
        state = "met" if t["met"] else "MISSED"
        lines.append(f"  {t['name']:<56} {t['value']:.2f} (goal {op} {t['goal']:.2f}): {state}, "
                     f"{abs(t['margin']):.0%} {'over' if t['margin'] >= 0 else 'short'}")
    return "\n".join(lines)


def sweep_text(sw: dict) -> str:
    modes = sw["modes"]
    head = f"{sw['key']:>8}" + "".join(f"{m + ' /s':>14}{'bound':>11}{'share':>7}" for m in modes)
    vs = [m for m in modes if m != "backprop"] if "backprop" in modes else []
    head += "".join(f"{m + ' x':>10}" for m in vs)
    lines = [head]
    for p in sw["points"]:
        line = f"{p['value']:>8}"
        for m in modes:
            r = p["modes"][m]
            b = own_bound(m, r)
            share = fmt(r["samples_per_s"] / b if b else None, ".0%")
            line += f"{r['samples_per_s']:>14,.0f}{b:>11,.0f}{share:>7}"
        line += "".join(f"{fmt(p['modes'][m].get('speedup'), '.2f'):>9}x" for m in vs)
        lines.append(line)
    lines.append("bound: each mode's own, from t_k timed alone: batch / max(max t_k, "
                 "sum t_k / cores), and for backprop the chain of one batch in flight too;")
    lines.append("share = measured / bound: low where moving data between processes, not "
                 "computing, sets the pace")
    return "\n".join(lines)
