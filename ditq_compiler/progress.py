"""Progress of long work: a rich bar on a terminal, terse plain lines on stderr everywhere else.

A compile in CI or with stderr sent to a file used to print nothing for a minute or more. Plain lines
(``ditq: calibrating 12/25 (48%), 6 s``) go to stderr instead, never to stdout, so a command's result
stays the only thing on stdout. Rules, chosen to stay terse:

* :func:`track` (a loop with a known length) prints a line when another tenth is done or
  ``EVERY_SECONDS`` have passed, and nothing for a loop that ends within ``QUIET_SECONDS``, so tiny
  models and tests stay silent. On a terminal it is a rich bar, as before.
* :func:`phase` names what runs now (``exporting``, ``writing the artifact``). It prints nothing
  itself: the :func:`heartbeat` that the CLI runs around every command prints the current phase and its
  elapsed time whenever ``EVERY_SECONDS`` passed without a progress line. A command that fails within
  that time (every bad input checked at the boundary) prints its one error line and nothing else.
  Library code (passes, the pipeline) only calls ``track`` and ``phase``; nothing prints unless a
  heartbeat runs or a loop is long.
* :func:`timed_phases` is the one instrument of where a command's time goes: inside it, every ``phase``
  (nested ones too) is timed, and the :class:`PhaseClock` it yields renders the table a compile prints,
  keeps in ``compile_log.json`` and ``inspect`` writes into its dump.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

QUIET_SECONDS = 2.0
EVERY_SECONDS = 10.0
INTERVAL_ENV = "DITQ_PROGRESS_SECONDS"  # overrides EVERY_SECONDS: more lines for a debug log, fewer for CI


def interval() -> float:
    """Seconds between plain lines: ``$DITQ_PROGRESS_SECONDS`` when it is a positive number, else 10."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return EVERY_SECONDS
    return value if 0 < value < float("inf") else EVERY_SECONDS


class _Activity:
    """What runs now, shared by track, phase and the heartbeat thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.name: str | None = None
        self.since = time.monotonic()
        self.reporting_itself = False  # a rich bar is on screen: the heartbeat keeps quiet
        self.last_line = time.monotonic()

    def enter(self, name: str, reporting_itself: bool = False) -> tuple:
        with self.lock:
            previous = (self.name, self.since, self.reporting_itself)
            self.name, self.since = name, time.monotonic()
            self.reporting_itself = reporting_itself
            return previous

    def leave(self, previous: tuple) -> None:
        with self.lock:
            self.name, self.since, self.reporting_itself = previous


_ACTIVITY = _Activity()
_WRITE_LOCK = threading.Lock()


def emit(text: str, stream: TextIO | None = None) -> None:
    """One plain progress line on stderr."""
    with _WRITE_LOCK:
        print(f"ditq: {text}", file=stream or sys.stderr, flush=True)
    _ACTIVITY.last_line = time.monotonic()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Name the work that runs inside the block, for the heartbeat's lines (and the :class:`PhaseClock`
    of an enclosing :func:`timed_phases`)."""
    previous = _ACTIVITY.enter(name)
    clocks = _clocks()
    clock = clocks[-1] if clocks else None
    row = clock.enter(name) if clock is not None else None
    try:
        yield
    finally:
        if row is not None:
            clock.leave(row)
        _ACTIVITY.leave(previous)


@dataclass
class PhaseTime:
    name: str
    depth: int  # 0 for a phase of the command itself, 1 for one inside it (a pass inside the passes), ...
    seconds: float = 0.0


class PhaseClock:
    """Wall time of each phase run inside :func:`timed_phases`, in the order they started. A phase that runs
    twice (the numeric check of each per-group model) is two rows. ``other`` in the table is the time no
    top-level phase covered (argument checks, the manifest, loading the artifact back)."""

    def __init__(self) -> None:
        self.rows: list[PhaseTime] = []
        self.depth = 0
        self.start = time.perf_counter()
        self.total: float | None = None  # set when the timed block ends

    def enter(self, name: str) -> tuple[PhaseTime, float]:
        row = PhaseTime(name, self.depth)
        self.rows.append(row)
        self.depth += 1
        return row, time.perf_counter()

    def leave(self, entry: tuple[PhaseTime, float]) -> None:
        row, started = entry
        row.seconds = time.perf_counter() - started
        self.depth -= 1

    def elapsed(self) -> float:
        return self.total if self.total is not None else time.perf_counter() - self.start

    def other_seconds(self) -> float:
        return max(0.0, self.elapsed() - sum(r.seconds for r in self.rows if r.depth == 0))

    def to_log(self) -> list[dict]:
        """The rows as ``compile_log.json`` keeps them (seconds to the millisecond), ``other`` last."""
        rows = [{"name": r.name, "depth": r.depth, "seconds": round(r.seconds, 3)} for r in self.rows]
        return rows + [{"name": "other", "depth": 0, "seconds": round(self.other_seconds(), 3)}]

    def table(self) -> list[str]:
        return phase_table(self.to_log(), self.elapsed())


def phase_table(rows: list[dict], total: float) -> list[str]:
    """Plain lines of a phase log (:meth:`PhaseClock.to_log`'s rows): each phase, indented by its depth, with
    its seconds and its share of ``total``."""
    named = [("  " * int(r.get("depth", 0)) + str(r["name"]), float(r["seconds"])) for r in rows]
    width = max(len(name) for name, _ in named + [("phase", 0.0)])
    lines = [f"{'phase':<{width}}  {'seconds':>8}  {'share':>6}"]
    lines += [f"{name:<{width}}  {seconds:8.2f}  {seconds / total if total else 0.0:6.1%}" for name, seconds in named]
    return lines + [f"{'total':<{width}}  {total:8.2f}"]


_THREAD = threading.local()  # each thread's open clocks: a compile in a worker thread times its own phases


def _clocks() -> list[PhaseClock]:
    if not hasattr(_THREAD, "clocks"):
        _THREAD.clocks = []
    return _THREAD.clocks


@contextmanager
def timed_phases() -> Iterator[PhaseClock]:
    """Time every :func:`phase` that starts in the block on this thread; yields the clock."""
    clock = PhaseClock()
    _clocks().append(clock)
    try:
        yield clock
    finally:
        clock.total = time.perf_counter() - clock.start
        _clocks().remove(clock)


def track(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterable[T]:
    if sys.stderr.isatty():
        yield from _rich_track(items, total, description)
        return
    previous = _ACTIVITY.enter(description)  # its lines reset the heartbeat; a short loop leaves it the word
    reporter = PlainReporter(description, total)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            reporter.update(done)
        reporter.close(done)
    finally:
        _ACTIVITY.leave(previous)


def _rich_track(items, total, description):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    previous = _ACTIVITY.enter(description, reporting_itself=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)
    finally:
        _ACTIVITY.leave(previous)


class PlainReporter:
    """The plain lines of one loop: a tenth more done or ``every`` seconds passed, after ``quiet`` seconds."""

    def __init__(self, description: str, total: int | None, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, quiet: float = QUIET_SECONDS,
                 every: float | None = None):
        self.description, self.total, self.stream, self.clock = description, total, stream, clock
        self.quiet, self.every = quiet, every or interval()
        self.start = self.last = clock()
        self.last_tenth = 0
        self.printed = False

    def update(self, done: int) -> None:
        now = self.clock()
        tenth = (10 * done) // self.total if self.total else 0
        if now - self.start < self.quiet:
            self.last_tenth = tenth  # too early: a short loop prints nothing at all
            return
        if tenth > self.last_tenth or now - self.last >= self.every:
            self._line(done, now)
            self.last_tenth = tenth

    def close(self, done: int) -> None:
        """A last line with the total time, only when the loop printed anything before."""
        if self.printed and (self.total is None or self.last_done != done):
            self._line(done, self.clock())

    def _line(self, done: int, now: float) -> None:
        count = f"{done}/{self.total} ({100 * done // self.total}%)" if self.total else f"{done}"
        emit(f"{self.description} {count}, {now - self.start:.0f} s", self.stream)
        self.last, self.printed, self.last_done = now, True, done


@contextmanager
def heartbeat(default: str, *, every: float | None = None, tick: float = 0.1) -> Iterator[None]:
    """Run the block with a thread that prints the current phase whenever ``every`` seconds passed without
    a progress line, so a long silent step (loading, tracing, exporting) still shows in a log.
    ``default`` names the work while no phase is set (``compiling``). A command that ends (or fails)
    within ``every`` seconds prints nothing: a bad input stays one line."""
    previous = _ACTIVITY.enter(default)
    _ACTIVITY.last_line = time.monotonic()
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(stop, every or interval(), tick), name="ditq-heartbeat",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _ACTIVITY.leave(previous)


def _beat(stop: threading.Event, every: float, tick: float) -> None:
    while not stop.wait(tick):
        with _ACTIVITY.lock:
            name, since, silent = _ACTIVITY.name, _ACTIVITY.since, _ACTIVITY.reporting_itself
        now = time.monotonic()
        if name and not silent and now - _ACTIVITY.last_line >= every:
            emit(f"{name}, {now - since:.0f} s")
