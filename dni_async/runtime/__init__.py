"""N processes: the wire format, the stage and coordinator processes, the supervisor that starts
and ends them, the run's plan, checkpoints and CURVE security. Imports the math, and from
measuring only the clock and trace it records with."""
