"""Training in one process: the reference trainer the pipeline is checked against, and the seed
post's own synthetic-gradient script."""
