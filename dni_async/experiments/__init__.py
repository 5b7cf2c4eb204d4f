"""Experiments: the results table, sweeps, gradient fidelity, the seed post's DNI run."""
