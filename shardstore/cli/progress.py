"""How the CLI shows progress: one tqdm bar on stderr per task the library reports (``shardstore.progress``)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class ProgressBars:
    """A :data:`~shardstore.progress.ProgressCallback` that draws bars; a bar closes when its task is done."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def __call__(self, task: str, advance: int, total: int) -> None:
        bar = self._bars.get(task)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[task] = tqdm(total=total, desc=task, unit="B", unit_scale=True, unit_divisor=1024,
                                          file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.update(advance)
        if bar.n >= total:
            bar.close()
            del self._bars[task]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

