"""Progress bars on stderr (tqdm); the CLI turns them off for ``--json`` and ``--quiet``."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Progress:
    """A byte counter with a bar; a no-op when disabled, so callers never branch."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=True, dynamic_ncols=True,
            )

    def update(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
