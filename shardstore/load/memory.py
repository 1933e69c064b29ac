"""Peak resident memory of this process over a block of code: what ``shardstore load`` and the bench report.

``ru_maxrss`` is exact but covers the whole life of the process, so a peak
reached earlier (imports, a previous load) hides the one we want. A sampling
thread reading ``/proc/self/statm`` sees only our block but can miss a short
spike. Together they are exact: if ``ru_maxrss`` grew during the block, the
block set the process's peak and ``ru_maxrss`` is it; if not, the block's peak
is below the old maximum and the samples bound it from below within one
sampling interval.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType

SAMPLE_INTERVAL_S = 0.002
_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    """Resident bytes now (``/proc/self/statm``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return max_rss()


def max_rss() -> int:
    """Peak resident bytes of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRss:
    """``with PeakRss() as rss: ...`` then ``rss.baseline`` and ``rss.peak`` in bytes."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._max_before = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="shardstore-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = current_rss()
        self._max_before = max_rss()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        max_after = max_rss()
        if max_after > self._max_before:
            self.peak = max(self.peak, max_after)

    @property
    def growth(self) -> int:
        """Peak minus baseline: what the block added at its worst."""
        return max(0, self.peak - self.baseline)
