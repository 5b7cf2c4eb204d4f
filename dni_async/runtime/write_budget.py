"""How long the stages may take to write their snapshots before the coordinator gives up.

The seed network's checkpoint is 120 KB; a stage of a 4096-wide layer with Adam writes
hundreds of megabytes. One fixed deadline cannot suit both, so this one grows with the bytes
the stages write: each stage says in its hello how large its snapshot is, each confirmation
says how long the write took, and the deadline is `peer_timeout_s` plus the time every stage's
bytes take, written one after another, at the slowest speed seen so far in the run (and never
faster than ASSUMED_BYTES_PER_S, a slow disk, which is also the guess before anything has
been measured).

This deadline only bounds a writer that keeps sending heartbeats yet never finishes: stages
write in pieces and send heartbeats between them, so one that dies or hangs while writing is
found within `peer_timeout_s` like any other.
"""

from __future__ import annotations

ASSUMED_BYTES_PER_S = 20e6     # a slow (network) disk
SLACK = 4                      # a later write may be this much slower than the slowest so far


class WriteBudget:
    def __init__(self, floor_s: float):
        self.floor_s = floor_s
        self.sizes: dict[int, int] = {}        # stage -> bytes of its snapshot
        self.slowest: float | None = None      # bytes per second, of the slowest write seen

    def note_size(self, rank: int, nbytes) -> None:
        if type(nbytes) is int and nbytes >= 0:
            self.sizes[rank] = nbytes

    def note_write(self, nbytes, seconds) -> None:
        if type(nbytes) is int and type(seconds) in (int, float) and nbytes > 0 and seconds > 0:
            rate = nbytes / seconds
            self.slowest = rate if self.slowest is None else min(self.slowest, rate)

    def rate(self) -> float:
        if self.slowest is None:
            return ASSUMED_BYTES_PER_S
        return min(ASSUMED_BYTES_PER_S, self.slowest / SLACK)

    def deadline_s(self) -> float:
        """Seconds the stages may take to write their snapshots and confirm."""
        return self.floor_s + sum(self.sizes.values()) / self.rate()
