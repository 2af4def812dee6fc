"""Small least-recently-used containers: one bounded by entry count, one by bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruSet(Generic[K]):
    """A set remembering at most ``capacity`` keys; adding past it forgets the least recent."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._keys: OrderedDict[K, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._keys))

    def touch(self, key: K) -> bool:
        """Mark ``key`` as just used; False when it is not held."""
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def add(self, key: K) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def discard(self, key: K) -> None:
        self._keys.pop(key, None)

    def clear(self) -> None:
        self._keys.clear()


class LruBytes(Generic[K, V]):
    """A cache holding at most ``max_bytes`` of values (an entry larger than that is not kept)."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._size_of = size_of
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        size = self._size_of(value)
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def pop(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
