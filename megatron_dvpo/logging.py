"""Progress lines on rank 0 (step, rate, ETA) for long work."""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Prints ``label step/total  rate unit/s  ETA`` at most every ``interval`` seconds."""

    def __init__(self, label: str, total: float, unit: str = "items", interval: float = 5.0,
                 enabled: bool = True, stream=sys.stdout):
        self.label, self.total, self.unit = label, total, unit
        self.interval, self.enabled, self.stream = interval, enabled, stream
        self.start = self.last = time.perf_counter()
        self.done = 0.0

    def update(self, amount: float, note: str = "") -> None:
        self.done += amount
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label} {self.done:,.0f}/{self.total:,.0f} {self.unit}  "
                  f"{rate:,.1f} {self.unit}/s  ETA {format_seconds(eta)}  {note}".rstrip(),
                  file=self.stream, flush=True)
