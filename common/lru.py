"""The one least-recently-used cache of the project, bounded by a total size: by default every
entry counts 1 (a bound on entries); a caller may weigh entries (the template caches weigh them
by their estimated bytes, so a few large templates cannot hold as much as thousands of small)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int = 1) -> None:
        """Keep `value`, dropping the least recently used until the total fits; a value larger
        than the whole limit is not kept."""
        if size > self.limit:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self._items[key] = (value, size)
        self.size += size
        while self.size > self.limit:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped

    def __len__(self) -> int:
        return len(self._items)
