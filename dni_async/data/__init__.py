"""Datasets: the seed's binary addition, and classification sets that ship offline."""
