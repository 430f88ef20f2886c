"""A generator run ahead in a daemon thread: the loader's batches are made while training steps."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Generator
from typing import Any


class Prefetch:
    """Runs an iterator in a daemon thread, up to `depth` items ahead; re-raises its errors."""

    _END = object()

    def __init__(self, items: Generator[Any, None, None], depth: int):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        args = (items, self._queue, self._stop)  # not self: a dropped Prefetch can be collected
        threading.Thread(
            target=Prefetch._run, args=args, daemon=True, name="saeflow-batches"
        ).start()
        weakref.finalize(self, self._stop.set)

    @staticmethod
    def _run(items: Generator[Any, None, None], q: queue.Queue, stop: threading.Event) -> None:
        try:
            for item in items:
                if not Prefetch._put(q, item, stop):
                    return
            Prefetch._put(q, Prefetch._END, stop)
        except BaseException as e:
            Prefetch._put(q, e, stop)
        finally:
            items.close()

    @staticmethod
    def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is Prefetch._END or isinstance(item, BaseException):
            self._done = True
            if isinstance(item, BaseException):
                raise item
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
