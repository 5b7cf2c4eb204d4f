"""`dni-async bench`: every mode on the same layout, data and initial weights, side by side.

    dni-async bench --config launch/wide.toml --json out.json          # the compute-bound table
    dni-async bench --config launch/wide.toml --modes none --sweep width=64,256,1024,2048 \
        --json sweep.json                                              # both regimes
    dni-async bench --wire --json wire.json                            # the transport alone
    dni-async bench --config launch/bench-tiny.toml --repeats 1        # a smoke check

Method (docs/benchmarks.md):
- one run per mode and repeat, modes interleaved within a repeat so drifts in machine load hit
  every mode alike; every run builds the same weights from the same seed and data;
- samples/s in the steady state: training samples of the epochs after `--warmup` divided by
  their training seconds (evaluation is excluded), median over repeats;
- per stage, busy seconds per batch t_k = (forward + backward + generator + update) / batches;
  with P = os.cpu_count() cores a pipeline cannot beat 1 / max(max_k t_k, sum_k t_k / P)
  batches per second; efficiency = measured / that bound. Lockstep backprop has one batch in
  flight, and a stage's update runs beside the backward of the stages upstream of it; its own
  bound also counts its period were messages free (`bounds.lockstep_period`), reported too.
  The same bounds again with t_k timed alone: each stage's per-batch work, one stage at a time, in a fresh
  process with one BLAS thread (`alone` in the JSON);
- two rows without processes: the single-process reference (backprop) with one BLAS thread
  and with all cores, each in a fresh interpreter so the thread count is set before numpy loads;
- timelines (`--trace`, and the Gantt picture): per mode, a warm-up + 1 epoch run untraced and
  then the same run with every span recorded; the pair gives the tracing overhead.

A `[bench]` table in the config file can set repeats, warmup, target and modes; flags win.

The rooms: `command.py` (flags, the order of work, the printed report), `runner.py` (modes side
by side, traced runs, sweeps), `children.py` (one pipeline or one reference run in a process of
its own), `calibrate.py` (each stage's work timed alone), `figures.py` (from runs to figures),
`report.py` (the printed tables).
"""
