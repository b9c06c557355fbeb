"""A queue of structures that other threads fill while :func:`kups_relax.relax_iter` runs.

    feed = Feed()
    results = relax_iter(feed, potential)        # in one thread: the stream never waits on the queue
    feed.put(("a", atoms_a)); feed.put(atoms_b)  # from any thread, at any time
    feed.close()                                 # no more: the stream ends once all have finished

A plain iterator makes the stream wait whenever it asks for the next structure, and it asks
between chunks while other systems are running; a stream that reads from a :class:`Feed` takes
what is queued and goes on running whatever it holds. Only when it holds nothing does it
wait for the next structure (or for :meth:`Feed.close`). So a long-lived stream can be handed
work in pieces (a Dask worker's tasks, :mod:`kups_relax.distributed`) without draining its
batches between them: the next piece's structures take the slots the last one frees.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterator

__all__ = ["Feed", "PENDING"]


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


#: What a :class:`Feed`'s reader yields when nothing is queued and the feed is still open.
PENDING: Any = _Pending()


class Feed:
    """A thread-safe queue of structures (``Atoms`` or ``(name, Atoms)``, as :func:`~kups_relax.relax_iter`
    takes them), read without waiting.

    Iterating a feed gives a reader that yields the queued items in order, :data:`PENDING`
    when the queue is empty and the feed open, and stops once the feed is closed and empty.
    """

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self.put_count = 0  # items put so far: the next item's index in the stream

    def put(self, item: Any) -> int:
        """Queue ``item``; return its position in the stream (0, 1, ...: :func:`relax_iter`'s index).

        Raises:
            ValueError: the feed is closed.
        """
        with self._changed:
            if self._closed:
                raise ValueError("put on a closed Feed")
            self._items.append(item)
            self.put_count += 1
            self._changed.notify_all()
            return self.put_count - 1

    def close(self) -> None:
        """No more items: a stream reading this feed ends when every queued one has finished."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Items queued and not yet taken by the stream."""
        return len(self._items)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until an item is queued or the feed is closed (or ``timeout`` seconds); whether one of them holds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._items or self._closed, timeout)

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._changed:
                if self._items:
                    item = self._items.popleft()
                elif self._closed:
                    return
                else:
                    item = PENDING
            yield item
