"""Pacing a server's sends to a given link speed, so benchmarks can show a 1 or 2.5 Gbit/s link on loopback."""

from __future__ import annotations

import asyncio
import time

from shardstore.errors import InvalidInputError
from shardstore.rpc.wire import CHUNK_BYTES


class Pacer:
    """Server-side pacing to emulate a link of ``rate`` bytes/s shared by every stream (benchmarks).

    A token bucket holding at most one chunk: like a real link's send buffer it
    keeps the line busy while the sender is busy writing the previous chunk,
    instead of adding the sender's own time to every chunk's transmission time.
    """

    def __init__(self, rate: float, burst: int = CHUNK_BYTES) -> None:
        if rate <= 0:
            raise InvalidInputError(f"pacing rate must be positive, not {rate}")
        self.rate = rate
        self._burst_s = burst / rate
        self._free_at = time.monotonic()

    async def send(self, nbytes: int) -> None:
        """Wait until ``nbytes`` would have left the link (one event loop: no lock needed)."""
        now = time.monotonic()
        self._free_at = max(self._free_at, now - self._burst_s) + nbytes / self.rate
        delay = self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)
