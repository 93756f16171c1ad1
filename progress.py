"""A progress line with a rate and an ETA, on stderr every few seconds, for long loops.

    meter = Progress(total=len(samples), what="recall (tiny)", unit="samples")
    for sample in samples:
        ...
        meter.advance()

Short jobs print nothing but their own summary: the first line comes after `every` seconds. The
last unit always prints, so a finished job says so. Imports only the standard library.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Units done of `total`, their rate, the time elapsed and the ETA, every `every` seconds."""

    def __init__(self, total: int, what: str, unit: str = "", every: float = 10.0, enabled: bool = True,
                 scale: float = 1.0):
        # scale: units shown per unit counted (e.g. 1e-6 to count bytes and show MB)
        self.total, self.what, self.unit, self.every, self.enabled = max(total, 1), what, unit, every, enabled
        self.scale = scale
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def advance(self, n: int = 1, note: str = ""):
        """Count n more units done; `note` (e.g. tokens so far) is added to the line."""
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            print(self.line(now, note), file=sys.stderr, flush=True)

    def line(self, now: float, note: str = "") -> str:
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        done, total = self.done * self.scale, self.total * self.scale
        numbers = f"{done:g}/{total:g}{unit}" if self.scale == 1 else f"{done:.1f}/{total:.1f}{unit}"
        extra = f", {note}" if note else ""
        return (f"  {self.what}: {numbers} ({100 * min(self.done / self.total, 1):.0f}%){extra}, "
                f"{duration(elapsed)} elapsed, ETA {duration(eta)}")


def duration(seconds: float) -> str:
    """4m05s, 1h02m: how long something took or will take."""
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
