"""Progress as callbacks: the library reports what it does, the caller decides how (or whether) to show it.

A :data:`ProgressCallback` is called as ``callback(task, advance, total)``:
``advance`` more units (bytes) of ``task`` are done, out of ``total``. The
first call for a task has ``advance == 0`` and announces it. Library code
(``repo/``, ``load/``) only ever calls these; the CLI renders them as bars
(``shardstore.cli.progress``), and a library caller that passes no callback
gets no output at all.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]


def _ignore(_amount: int) -> None:
    return None


def progress_task(callback: ProgressCallback | None, task: str, total: int) -> Callable[[int], None]:
    """Announce ``task`` to ``callback`` and return a function that reports ``amount`` more done."""
    if callback is None:
        return _ignore
    report = callback
    report(task, 0, total)
    return lambda amount: report(task, amount, total)
