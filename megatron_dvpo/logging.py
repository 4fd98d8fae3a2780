"""What a run reports: TensorBoard scalars and progress lines (step, rate, ETA), on rank 0."""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Prints ``label step/total  rate unit/s  ETA`` at most every ``interval`` seconds."""

    def __init__(self, label: str, total: float, unit: str = "items", interval: float = 5.0,
                 enabled: bool = True, stream=None):
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
                  file=self.stream or sys.stdout, flush=True)


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_metrics() -> dict[str, float]:
    """The process's resident memory now (``perf/host_mem_gib``) and, on a GPU, the most the
    caching allocator reserved (``perf/max_memory_reserved_gib``), beside ``peak_mem_gib``."""
    import psutil

    metrics = {"perf/peak_mem_gib": peak_memory_gib(),
               "perf/host_mem_gib": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        metrics["perf/max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return metrics


def release_freed_memory() -> None:
    """Give memory the process freed back to the system (glibc keeps it otherwise), so that a
    ``PeakRSS`` after a warm-up sees the next run's allocations instead of reused ones."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        getattr(ctypes.CDLL(libc), "malloc_trim", lambda pad: None)(0)


class PeakRSS:
    """The largest resident set size of this process over a ``with`` block, sampled every
    ``interval`` seconds in a thread (for benchmarks: ``ru_maxrss`` cannot be reset between
    two measurements in one process). ``baseline`` is the RSS on entry."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.baseline = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


# tags logged only when their value changes: a constant schedule (a learning rate, a fixed KL
# coefficient) is one point, not a flat card
ON_CHANGE = ("/lr", "/beta")


@dataclass(frozen=True)
class Dashboard:
    """What a user asks of a run, in order: is it learning, is it healthy, is it fast.

    TensorBoard opens on Time Series and sorts its groups by name, so the run's link pins the
    ``pinned`` tags' cards above every group and unticks "Ignore outliers" (both stay in the
    browser: later visits open on them too). ``charts``, ``{category: {chart: [tag regex,
    ...]}}``, lay out the Custom Scalars tab."""

    pinned: tuple[str, ...] = ()
    charts: dict = field(default_factory=dict)

    MAX_PINS = 10  # TensorBoard's own limit

    def __post_init__(self):
        if len(self.pinned) > self.MAX_PINS:
            raise ValueError(f"{len(self.pinned)} pinned cards; TensorBoard pins at most "
                             f"{self.MAX_PINS}")

    def link(self, host: str = "localhost", port: int = 6006, **options: str) -> str:
        """Time Series with the pinned cards first, smoothing off and each chart's full range,
        through this package's TensorBoard page (``tensorboard_view``); ``options``: more of
        TensorBoard's query flags (e.g. ``forceSVG="true"``)."""
        from megatron_dvpo.tensorboard_view import VIEW_PATH

        pins = [{"plugin": "scalars", "tag": tag} for tag in self.pinned]
        query = urllib.parse.urlencode({"smoothing": "0", "pinnedCards": json.dumps(
            pins, separators=(",", ":")), **options})
        return f"http://{host}:{port}{VIEW_PATH}?{query}"


class MetricsLogger:
    """TensorBoard event files under ``directory`` plus a one-line summary per logged step.

    Tag names follow docs/algorithm.md §4 so that runs compare across versions.
    """

    def __init__(self, directory: str | Path, total_steps: int, enabled: bool = True,
                 stream=None):
        self.enabled, self.total_steps, self.stream = enabled, total_steps, stream
        self.directory = Path(directory)
        self.writer = None
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.last: dict[str, float] = {}  # the ON_CHANGE tags' last logged values

    def open(self, resumed_at: int | None = None, text: dict[str, str] | None = None,
             hparams: dict | None = None, metrics: tuple[str, ...] = (),
             dashboard: Dashboard | None = None) -> None:
        """Start the event file. A run resumed at step S logs S+1... again: TensorBoard drops
        the earlier events from S+1 on (``purge_step``), so no step shows twice. ``text``:
        tag -> markdown, written once (the resolved config); ``hparams``: the run's settings
        for TensorBoard's HParams tab, beside the final values of the ``metrics`` tags;
        ``dashboard``: the Custom Scalars tab's charts in their order."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.directory.mkdir(parents=True, exist_ok=True)
        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=purge)
        self.text(resumed_at or 0, text or {})
        if dashboard and dashboard.charts:
            self.writer.add_custom_scalars({
                category: {title: ["Multiline", tags] for title, tags in charts.items()}
                for category, charts in dashboard.charts.items()})
        if hparams:  # in this run's own file, not the subdirectory add_hparams would make
            for summary in hparams_summaries(hparams, dict.fromkeys(metrics, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def _write(self, step: int, values: dict, add: str) -> bool:
        """Each of ``values`` through the writer's ``add`` method at ``step``; False on the
        ranks that do not log."""
        if not self.enabled:
            return False
        if self.writer is None:
            self.open()
        for tag, value in values.items():
            getattr(self.writer, add)(tag, value, step)
        self.writer.flush()
        return True

    def text(self, step: int, text: dict[str, str]) -> None:
        """``text``: tag -> markdown, in TensorBoard's Text tab at ``step``."""
        if text:
            self._write(step, text, "add_text")

    def histograms(self, step: int, values: dict) -> None:
        """``values``: tag -> tensor, in TensorBoard's Histograms (and Time Series) at ``step``."""
        if values:
            self._write(step, {tag: v.detach().float().cpu() for tag, v in values.items()
                               if v.numel()}, "add_histogram")

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` at ``step`` without a progress line (e.g. a checkpoint's time)."""
        self._write(step, metrics, "add_scalar")

    def log(self, step: int, metrics: dict[str, float], summary: tuple[str, ...] = ()) -> None:
        unchanged = {tag for tag, value in metrics.items()
                     if tag.endswith(ON_CHANGE) and self.last.get(tag) == value}
        self.last.update({tag: v for tag, v in metrics.items() if tag.endswith(ON_CHANGE)})
        if not self._write(step, {t: v for t, v in metrics.items() if t not in unchanged},
                           "add_scalar"):
            return
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.perf_counter()
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{tag.split('/')[-1]} {metrics[tag]:.4g}" for tag in summary if tag in metrics]
        parts.append(f"ETA {format_seconds(eta)}")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
