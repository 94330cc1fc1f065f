"""Progress display for a sweep, kept apart from the runner so tests and library
callers run silently and the terminal output never shares stdout with results."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from cluster.bench.client import RequestResult


class ProgressSink(Protocol):
    """What the runner reports while it works: one block at a time."""

    def start_block(self, label: str, total: int | None) -> None: ...

    def advance(self, result: RequestResult) -> None: ...

    def end_block(self) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing."""

    def start_block(self, label: str, total: int | None) -> None:
        pass

    def advance(self, result: RequestResult) -> None:
        pass

    def end_block(self) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """A rich bar per block on stderr; the description carries live ok/failed counts so
    a broken endpoint is visible before the step ends. A duration-bounded block has no
    known total and shows a pulsing bar with the count."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task: TaskID | None = None
        self._label = ""
        self._ok = self._failed = 0

    def _describe(self) -> str:
        fail = f" [red]failed {self._failed}[/red]" if self._failed else ""
        return f"{self._label} ok {self._ok}{fail}"

    def start_block(self, label: str, total: int | None) -> None:
        self._label, self._ok, self._failed = label, 0, 0
        self._task = self._progress.add_task(self._describe(), total=total)

    def advance(self, result: RequestResult) -> None:
        if self._task is None:
            return
        if result.ok:
            self._ok += 1
        else:
            self._failed += 1
        self._progress.update(self._task, advance=1, description=self._describe())

    def end_block(self) -> None:
        if self._task is not None:
            done = next(t.completed for t in self._progress.tasks if t.id == self._task)
            self._progress.update(self._task, total=done)
        self._task = None

    def close(self) -> None:
        self._progress.stop()
