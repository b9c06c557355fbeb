"""What the command line shows: a progress bar or log lines, the summary table, the force plot.

Only :mod:`kups_relax.cli` uses this module; it is the one place that prints.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import numpy as np

logger = logging.getLogger("kups_relax.cli")

#: The scheduler's per-chunk debug record, ending in ``(chunk index, systems still running)``
#: (a multi-device run puts the device first). Progress is read from it until the engine offers
#: a progress callback.
ENGINE_LOGGER = "kups_relax.scheduler"
ENGINE_CHUNK_MESSAGE = "chunk %d: %d systems running"


class Progress(logging.Handler):
    """Systems done of total and steps per second while :func:`kups_relax.relax` runs.

    On a terminal a one-line bar is redrawn in place; elsewhere (a log file, a batch
    job) a plain log line is written every ``interval`` seconds. Use as a context
    manager around the ``relax`` call: it listens to the engine's per-chunk records.

    With ``total=None`` (a stream whose length is unknown until it ends) the count comes from
    :meth:`finished` calls and no bar is drawn.

    Args:
        total: systems handed to the engine, or ``None`` when unknown.
        chunk_steps: steps per device call (a chunk), for the steps-per-second rate.
        stream: where the bar goes (default ``sys.stderr``).
        enabled: ``False`` shows nothing (``--quiet``).
        interval: seconds between log lines when not on a terminal.
    """

    def __init__(self, total: int | None, chunk_steps: int, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 10.0):
        super().__init__(level=logging.DEBUG)
        self.total, self.chunk_steps = total, chunk_steps
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.done, self.chunks = 0, 0
        self.t0 = self.last = 0.0
        self._first: tuple[int, float] | None = None  # (chunk, time) of the first record: compile time excluded
        self._latest = 0.0  # time of the latest record
        self._drawn = 0.0
        self._shown = ""
        self._engine = logging.getLogger(ENGINE_LOGGER)
        self._saved_level = self._engine.level

    def __enter__(self) -> "Progress":
        self.t0 = self.last = time.perf_counter()
        self._engine.addHandler(self)
        if self._engine.getEffectiveLevel() > logging.DEBUG:
            self._engine.setLevel(logging.DEBUG)  # the chunk records are debug records
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self._engine.removeHandler(self)
        self._engine.setLevel(self._saved_level)
        if exc[0] is None and self.total is not None:
            self.done = self.total
        self._draw(final=True)

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, str) or not record.msg.endswith(ENGINE_CHUNK_MESSAGE) \
                or len(record.args or ()) < 2:
            return
        chunk, running = record.args[-2:]  # type: ignore[index]
        self.chunks = int(chunk)
        self._latest = time.perf_counter()
        if self._first is None:
            self._first = (self.chunks, self._latest)
        if self.total is not None:
            self.done = max(self.total - int(running), 0)
        self._draw()

    def finished(self, n: int = 1) -> None:
        """Count ``n`` more systems done (a stream of unknown length, ``total=None``)."""
        if self.total is None:
            self.done += n
            self._draw()

    def rate(self) -> float | None:
        """Loop steps per second since the first chunk finished (compilation excluded); ``None`` before.

        Every running system advances one optimizer step per loop step.
        """
        if self._first is None or self.chunks <= self._first[0]:
            return None
        elapsed = self._latest - self._first[1]
        return (self.chunks - self._first[0]) * self.chunk_steps / elapsed if elapsed > 0 else None

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self.rate()
        parts = [f"{self.done}/{self.total} systems relaxed" if self.total is not None
                 else f"{self.done} systems done"]
        if self._first is None and not final:
            parts.append("compiling")
        elif rate is not None:
            parts.append(f"{rate:.0f} steps/s")
        text = ", ".join(parts + [f"{now - self.t0:.1f} s"])
        if self.tty:
            if not final and now - self._drawn < 0.1:
                return
            self._drawn = now
            if self.total is None:
                self.stream.write(f"\r\033[K{text}")
            else:
                width = 24
                filled = int(round(width * self.done / max(self.total, 1)))
                self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {text}")
            if final:
                self.stream.write("\n")
            self.stream.flush()
        elif (final and not self._shown.startswith(f"{self.done}/")) or now - self.last >= self.interval:
            self.last, self._shown = now, text
            logger.info("progress: %s", text)


class SummaryTally:
    """The summary table of a stream of rows, in memory that does not grow with the stream.

    Counts every row by status and keeps at most ``limit`` converged rows and ``limit`` others
    (problems: unconverged, diverged, invalid, unreadable, ...): :meth:`table` shows every row
    when there are at most ``limit``, else the problems first, cut to ``limit`` lines, then a
    line saying how many more are in ``summary.csv`` and one with the counts by status.

    Args:
        limit: most rows shown.
    """

    def __init__(self, limit: int = 40):
        self.limit = limit
        self.total = 0
        self.counts: dict[str, int] = {}
        self._converged: list[tuple[float, int, Mapping[str, object]]] = []
        self._problems: list[tuple[float, int, Mapping[str, object]]] = []

    def add(self, row: Mapping[str, object], order: float | None = None) -> None:
        """Count one row; ``order`` (default: arrival) sorts the rows shown."""
        status = str(row.get("status"))
        self.counts[status] = self.counts.get(status, 0) + 1
        kept = self._converged if status == "converged" else self._problems
        if len(kept) < self.limit:
            kept.append((self.total if order is None else order, self.total, row))
        self.total += 1

    def table(self) -> str:
        """The fixed-width table, a ``... N more rows`` line when cut, and the counts by status."""
        columns = [("name", "name", "{}"), ("atoms", "atoms", "{}"), ("status", "status", "{}"),
                   ("steps", "steps", "{}"), ("final_energy", "energy/eV", "{:.6f}"),
                   ("final_fmax", "fmax/(eV/Å)", "{:.4g}"), ("reason", "reason", "{}")]
        if self.total <= self.limit:
            shown = [r for *_, r in sorted(self._problems + self._converged, key=lambda k: k[:2])]
        else:
            shown = [r for *_, r in sorted(self._problems, key=lambda k: k[:2])]
            shown += [r for *_, r in sorted(self._converged, key=lambda k: k[:2])]
            shown = shown[:self.limit]

        def cell(row, key, fmt):
            value = row.get(key)
            if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
                return ""
            text = fmt.format(value)
            return text if len(text) <= 60 else text[:57] + "..."

        body = [[cell(r, key, fmt) for key, _, fmt in columns] for r in shown]
        header = [title for _, title, _ in columns]
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.total > len(shown):
            lines.append(f"... {self.total - len(shown)} more rows in summary.csv")
        lines.append(f"{self.total} systems: " + ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())))
        return "\n".join(lines)


def summary_table(rows: Sequence[Mapping[str, object]], limit: int = 40) -> str:
    """A fixed-width table of the summary rows (at most ``limit`` rows, problems first when cut;
    :class:`SummaryTally` for a stream)."""
    tally = SummaryTally(limit)
    for row in rows:
        tally.add(row)
    return tally.table()


def plot_max_force(path: Path, series: Mapping[str, np.ndarray], fmax: float | None,
                   total: int | None = None) -> None:
    """PNG of the largest force (eV/Å, log scale) against step for every system, with the ``fmax`` line.

    ``fmax``: eV/Å, ``None`` for no line. ``total``: the systems of the run when ``series``
    holds only some of them (the title says "N of total"). Needs matplotlib (``pip install kups-relax[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, values in series.items():
        values = np.asarray(values, dtype=float)
        ax.plot(np.arange(len(values)), np.where(values > 0, values, np.nan), lw=1, label=name)
    if fmax is not None:
        ax.axhline(fmax, color="k", ls="--", lw=1, label=f"fmax = {fmax:g} eV/Å")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("largest force / (eV/Å)")
    shown = len(series)
    ax.set_title(f"{shown} of {total} systems" if total is not None and total > shown else f"{shown} systems")
    if len(series) <= 12:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
