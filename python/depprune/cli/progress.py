"""io stage, on the command line: a progress bar fed by the io callback, and a spinner.

Both show only on a terminal and when not quiet:

>>> import io
>>> from rich.console import Console
>>> with _Transfer(Console(file=io.StringIO()), "writing", enabled=True) as progress:
...     progress(1_000, 2_000, 1, 2)  # not a terminal: nothing shown
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console


class _Transfer:
    """A rich progress bar over bytes and tensors, fed by the io callback.

    Shown only on a terminal and when not quiet; a no-op callback otherwise.
    """

    def __init__(self, console: Console, label: str, enabled: bool) -> None:
        self._progress = None
        if enabled and console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[tensors]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task(label, total=None, tensors="")

    def __enter__(self) -> _Transfer:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, bytes_done: int, bytes_total: int, tensors_done: int, tensors_total: int):
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=bytes_done,
                total=bytes_total,
                tensors=f"{tensors_done}/{tensors_total} tensors",
            )


@contextlib.contextmanager
def _status(console: Console, text: str, enabled: bool) -> Iterator[None]:
    """A spinner for a step with no progress to count (tracing, planning), on a terminal."""
    if enabled and console.is_terminal:
        with console.status(text):
            yield
    else:
        yield
