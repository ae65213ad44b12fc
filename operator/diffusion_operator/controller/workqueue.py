"""A keyed work queue (client-go's workqueue, in small): events coalesce per key.

A key added while it waits runs once (at the earliest due time asked for); a key added while it
runs is marked dirty and runs once more after the current run; a key never runs on two workers at
once. Delays let a burst of child events (a new Deployment's status updates) fold into one run.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Hashable

Key = Hashable


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Key, float] = {}  # waiting keys -> when they may run
        self._heap: list[tuple[float, int, Key]] = []  # (due, seq, key); stale entries skipped
        self._seq = itertools.count()
        self._running: set[Key] = set()
        self._dirty: dict[Key, float] = {}  # added while running -> due time for the rerun
        self._closed = False

    def add(self, key: Key, delay: float = 0.0) -> bool:
        """Queue `key` to run after `delay` seconds; False when it folded into a pending run."""
        due = time.monotonic() + max(0.0, delay)
        with self._cond:
            if self._closed:
                return False
            if key in self._running:
                folded = key in self._dirty
                self._dirty[key] = min(self._dirty.get(key, due), due)
                return not folded
            return self._push(key, due)

    def _push(self, key: Key, due: float) -> bool:
        current = self._due.get(key)
        if current is not None and current <= due:
            return False
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._cond.notify()
        return current is None

    def get(self, timeout: float | None = None) -> Key | None:
        """The next due key (now running), or None on timeout or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier due time
                wait: float | None = None
                if self._heap:
                    due, _, key = self._heap[0]
                    if due <= now:
                        heapq.heappop(self._heap)
                        del self._due[key]
                        self._running.add(key)
                        return key
                    wait = due - now
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return None

    def done(self, key: Key) -> None:
        """The run of `key` ended; a key added meanwhile is queued again."""
        with self._cond:
            self._running.discard(key)
            due = self._dirty.pop(key, None)
            if due is not None:
                self._push(key, due)
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._due and not self._running and not self._dirty

    def next_due(self) -> float | None:
        """Seconds until the earliest waiting key is due (None when nothing waits)."""
        with self._cond:
            if not self._due:
                return None
            return max(0.0, min(self._due.values()) - time.monotonic())

    def __len__(self) -> int:
        with self._cond:
            return len(self._due) + len(self._dirty)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
