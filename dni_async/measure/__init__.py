"""Measuring: the clock and trace every process records with, the bench, its bounds, the
transport's own bench, and the pictures."""
