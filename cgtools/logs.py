"""Logging and progress bars, both on stderr (stdout carries data)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

LOGGER_NAME = "cgtools"


class _StderrHandler(logging.StreamHandler):
    """A stream handler bound to whatever sys.stderr is at the time of each message (test runners
    and embedding applications swap it; a handler holding the old stream would write to a closed
    file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def setup_logging(verbosity: int) -> None:
    """Install one stderr handler on the `cgtools` logger: -1 quiet, 0 warnings+info, >=1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_cgtools", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cgtools = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def progress_enabled() -> bool:
    """Bars show only on an interactive stderr and when info messages are on."""
    return sys.stderr.isatty() and logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO)


class _Bar:
    def __init__(self, progress, task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: float = 1.0) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def update(self, **fields) -> None:
        """Set extra fields shown after the bar (e.g. loss=0.12)."""
        if self._progress is not None:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self._progress.update(self._task, info=text)


def silent_bar() -> _Bar:
    """A bar that shows nothing: for work that runs inside another command's bar."""
    return _Bar(None, None)


@contextmanager
def progress(total: float | None, description: str) -> Iterator[_Bar]:
    """A rich progress bar on stderr with ETA; a silent stand-in when bars are off."""
    if not progress_enabled():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, info="")
        yield _Bar(bar, task)
