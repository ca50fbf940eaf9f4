"""Progress of a long stage as log records: step, measures, rate and ETA, at most every few seconds.

The library does not import Prefect. A long stage (fine-tuning, captioning, guidance embeddings, classifier
training) makes a :class:`StageProgress` and calls :meth:`StageProgress.update` after each unit of work; at most
every ``every_s`` seconds (and at the first and the last unit) it logs one line on the ``realfake.progress``
logger, e.g. ``finetune demo/v1 adapter all: step 40/320 (12%), loss 0.1184, 212.3 samples/s, ETA 2m11s``,
with the figures attached to the record as ``record.realfake_progress``. Anything listening on that logger can
show it: the Prefect layer (:class:`tasks.artifacts.ProgressBridge`) turns each record into a line of the run's log
and an update of the stage's progress artifact; without a listener the line goes wherever logging is configured.

The cost is one ``time.monotonic()`` per unit and one log record per ``every_s`` (default
:data:`DEFAULT_EVERY_S`, overridable with ``REALFAKE_PROGRESS_SECONDS``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

__all__ = ["DEFAULT_EVERY_S", "LOGGER", "StageProgress", "format_seconds"]

LOGGER = "realfake.progress"
DEFAULT_EVERY_S = 15.0  # ours: a line every 15 s is readable in a run's log and one API call per stage per 15 s
log = logging.getLogger(LOGGER)


def format_seconds(s: float) -> str:
    """``2h05m``, ``3m07s`` or ``42s``."""
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class StageProgress:
    """Throttled progress lines of one stage of one dataset version.

    Args:
        stage: ``finetune``, ``caption``, ``guidance``, ``classifier``, ...
        total: units of work (steps, images, epochs).
        unit: what a unit is called in the line (``step``, ``image``, ``epoch``).
        dataset, version: the version worked on (they name the Prefect artifact).
        scope: what within the stage (an adapter scope, a training set), or None.
        samples_per_unit: images per unit, for a samples/s rate (None: no rate shown beyond units/s).
        start: units already done (a resumed run), not counted in the rate.
        every_s: least seconds between two lines (None: ``REALFAKE_PROGRESS_SECONDS`` or the default).
    """

    def __init__(self, stage: str, total: int, unit: str, dataset: str, version: str, scope: str | None = None,
                 samples_per_unit: float | None = None, start: int = 0, every_s: float | None = None):
        self.stage, self.total, self.unit = stage, max(int(total), 0), unit
        self.dataset, self.version, self.scope = dataset, version, scope
        self.samples_per_unit = samples_per_unit
        self.start = self.done = int(start)
        if every_s is None:
            every_s = float(os.environ.get("REALFAKE_PROGRESS_SECONDS", DEFAULT_EVERY_S))
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._last: float | None = None

    def update(self, done: int, **measures: Any) -> None:
        """Record that ``done`` units are complete, with the current measures (loss, accuracy, ...)."""
        self.done = int(done)
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed  # units per second
        figures: dict[str, Any] = {"stage": self.stage, "dataset": self.dataset, "version": self.version,
                                   "scope": self.scope, "unit": self.unit, "done": self.done, "total": self.total,
                                   "percent": 100.0 * self.done / self.total if self.total else 100.0,
                                   "elapsed_s": round(elapsed, 1)}
        parts = [f"{self.unit} {self.done}/{self.total} ({figures['percent']:.0f}%)"]
        for name, value in measures.items():
            if value is None:
                continue
            figures[name] = value
            parts.append(f"{name.replace('_', ' ')} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        if self.samples_per_unit:
            figures["samples_per_s"] = round(rate * self.samples_per_unit, 2)
            parts.append(f"{figures['samples_per_s']:.1f} samples/s")
        else:
            parts.append(f"{rate:.3g} {self.unit}s/s")
        if 0 < self.done < self.total and rate > 0:
            figures["eta_s"] = round((self.total - self.done) / rate, 1)
            parts.append(f"ETA {format_seconds(figures['eta_s'])}")
        where = f"{self.dataset}/{self.version}" + (f" {self.scope}" if self.scope else "")
        figures["text"] = f"{self.stage} {where}: " + ", ".join(parts)
        log.info("%s", figures["text"], extra={"realfake_progress": figures})
