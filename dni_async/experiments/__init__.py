"""Experiments: the results table, sweeps, gradient fidelity, and the seed post's own DNI run.

    dni-async experiment launch/experiments/table1.toml     # the table; writes docs/results.md
    dni-async experiment launch/experiments/in-flight.toml  # one setting swept, a table printed
    dni-async experiment launch/experiments/fidelity.toml   # synthetic vs true gradients, a picture
    dni-async experiment seed-post-dni                      # the 2017 post's DNI script, as it ran

An experiment file is TOML:

    kind = "table"                 # table | sweep | fidelity
    title = "..."
    output = "docs/results.md"     # table: the Markdown it writes (--out overrides)
    images = "docs/img/results-x"  # stem of the pictures it draws (optional; needs matplotlib)
    runner = "pipeline"            # pipeline: one OS process per layer (launch.train); or reference
    modes = ["backprop", "dni", "cdni"]
    seeds = [1, 2, 3]
    layers = [3, 4, 5, 6]          # table: weight layers = stages = processes; hidden = layers - 1
    width = 128                    # table: every hidden layer's width
    frozen_control = true          # table: add the hidden-layers-never-trained column
    notes = "..."                  # table: Markdown printed under the table (multi-line is fine)
    every = 2                      # fidelity: measure every 2nd batch
    vary = "max_in_flight"         # sweep: the setting swept ...
    values = [1, 4, 16, 64]        # ... and its values
    [settings]                     # every run's settings (any key of dni_async/config.py)
    [dataset.NAME]                 # table: per-dataset settings, in table order
    [mode.NAME]                    # per-mode settings (e.g. generator_lr for dni, cdni)

The table follows the spirit of Table 1 of Jaderberg et al. 2017, "Decoupled Neural Interfaces
using Synthetic Gradients" (ICML), which compared backprop, DNI and cDNI on fully connected
networks of 3 to 6 layers: here every run is a real pipeline, one process per layer, with a
fixed budget of epochs for every mode, and each cell is the mean and sample standard
deviation over seeds (the seed sets the initial weights; the data split is fixed).

The rooms: `spec.py` (reading and checking an experiment file, the list of runs), `runs.py`
(one run), `table.py`, `sweep.py` and `fidelity.py` (one kind of experiment each),
`command.py` (the command).
"""
