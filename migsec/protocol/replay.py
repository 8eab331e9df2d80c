"""A bounded replay cache with expiring entries and an injected clock.

An entry only has to be remembered while the message carrying it would still be
accepted (its expiry or time window); after that the freshness check rejects it
anyway, so it can be forgotten. When the cache is full of live entries it
refuses new ones (ReplayCacheFullError) instead of evicting one, because
forgetting a live entry would re-open the replay it guards against.
"""
from __future__ import annotations

import heapq
from datetime import datetime, timezone
from typing import Callable

from migsec.errors import ReplayError
from migsec.protocol.errors import ReplayCacheFullError

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ReplayCache:
    """``check_and_add(kind, value, expires_at)``: raises ReplayError if seen and unexpired."""

    def __init__(self, *, max_entries: int = 100_000, clock: Clock = utc_now) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._clock = clock
        self._expiry: dict[tuple[str, bytes], float] = {}
        self._heap: list[tuple[float, tuple[str, bytes]]] = []

    def __len__(self) -> int:
        self._purge(self._clock().timestamp())
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            when, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == when:
                del self._expiry[key]

    def seen(self, kind: str, value: bytes) -> bool:
        now = self._clock().timestamp()
        self._purge(now)
        return (kind, bytes(value)) in self._expiry

    def check(self, kind: str, value: bytes) -> None:
        """Raise ReplayError if ``value`` was recorded under ``kind`` and has not expired."""
        if self.seen(kind, value):
            raise ReplayError(f"{kind} was seen before (replay)")

    def add(self, kind: str, value: bytes, expires_at: datetime) -> None:
        """Remember ``value`` until ``expires_at``."""
        now = self._clock().timestamp()
        self._purge(now)
        key = (kind, bytes(value))
        if key in self._expiry:
            raise ReplayError(f"{kind} was seen before (replay)")
        when = expires_at.timestamp()
        if when <= now:
            return  # already unacceptable by its own expiry
        if len(self._expiry) >= self._max:
            raise ReplayCacheFullError(
                f"replay cache holds {self._max} unexpired entries; refusing new {kind}")
        self._expiry[key] = when
        heapq.heappush(self._heap, (when, key))

    def check_and_add(self, kind: str, value: bytes, expires_at: datetime) -> None:
        self.add(kind, value, expires_at)
