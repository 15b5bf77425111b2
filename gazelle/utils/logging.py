"""Logging and progress display: rich on a terminal, plain lines otherwise; only rank 0 speaks."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the moment (redirections made after start-up included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("gazelle")
    if not root.handlers:
        if sys.stderr.isatty():
            from rich.logging import RichHandler

            handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        else:
            handler = _CurrentStderr()
            handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
    return logging.getLogger(name)


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, **fields)


@contextmanager
def progress(total: int, completed: int = 0, disable: bool = False):
    """A step progress bar showing the latest loss; a no-op when disabled, off a terminal, or off rank 0."""
    if disable or not is_main_process() or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=completed, loss=float("nan"))
        yield _Bar(bar, task)
