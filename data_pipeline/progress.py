"""A rich progress bar for long data jobs (sharding, verifying, benchmarking)."""
from __future__ import annotations

import contextlib

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def progress_bar(description: str, *, total: int, unit: str = "items", enabled: bool = True):
    """Yields an object with .advance(n); a no-op when not enabled."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TaskProgressColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
