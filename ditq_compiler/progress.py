"""Progress bars for long work (calibration, sampling), quiet when output is not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterable[T]:
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
