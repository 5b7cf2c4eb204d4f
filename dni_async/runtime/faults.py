"""Fault injection for tests and demonstrations: DNI_ASYNC_FAULT="RANK:exit|hang|drop:BATCH".

`exit` ends the stage process abruptly (os._exit, as a crash would) when it reaches its
BATCH-th batch (0: at start-up); `hang` stops its loop there without exiting, as a deadlock
would; `drop` silently discards what the stage would send on for that batch (its output, or
on the last stage its loss), as a connection reset loses what ZeroMQ had queued. BATCH
`final` fires once the stage has sent its final report and closed its sockets, as a process
killed on its way out would be.
"""

from __future__ import annotations

import os
import sys
import time

KINDS = ("exit", "hang", "drop")
FINAL = -1      # BATCH "final": after the final report


class Fault:
    def __init__(self, kind: str, at: int):
        self.kind, self.at = kind, at

    @classmethod
    def from_env(cls, rank: int):
        spec = os.environ.get("DNI_ASYNC_FAULT", "")
        try:
            r, kind, at = spec.split(":")
            if int(r) == rank and kind in KINDS:
                return cls(kind, FINAL if at == "final" else int(at))
        except ValueError:
            pass
        return None

    def maybe_fire(self, batches: int) -> bool:
        """Fire at the BATCH-th batch; True when this batch's message on is to be dropped."""
        if batches != self.at:
            return False
        where = "after its final report" if batches == FINAL else f"at batch {batches}"
        print(f"stage: injected fault {self.kind} {where}", file=sys.stderr, flush=True)
        if self.kind == "drop":
            return True
        if self.kind == "exit":
            os._exit(17)
        while True:
            time.sleep(3600)
