"""Steps a stage has already run: a message for one of them again is a replay, and is refused.

Each data link of a stage has one sender (the coordinator or one neighbour; under CURVE,
`security.Curve` makes sure of it), and that sender sends its steps in increasing order: the
coordinator numbers batches, and gpipe's micro-batches, upwards, and every stage runs and sends
on what it receives in the order it arrives. So a batch whose step is at or below the last batch
this stage ran, or a gradient at or below the last one it applied, has been trained on already:
it is refused whatever it carries, and counted, in every mode. A decoupled stage, which updates
on receipt without waiting for anyone, would otherwise train on the same batch twice.

One integer per link and one comparison per message. Evaluation messages change no weights
and are not tracked.
"""

from __future__ import annotations


class Replays:
    def __init__(self):
        self.last = {"fwd": -1, "grad": -1}     # the last step run on each link
        self.refused = 0

    def refuses(self, link: str, step: int) -> bool:
        """True (and counted) when `step` is not beyond the last one run on `link`."""
        if step <= self.last[link]:
            self.refused += 1
            return True
        return False

    def ran(self, link: str, step: int) -> None:
        self.last[link] = max(self.last[link], step)
