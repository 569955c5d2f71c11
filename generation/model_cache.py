"""Loaded models kept by least recent use under a memory budget, one cache per device.

Only the device's worker thread touches its cache, so it needs no lock; a job for a model that is
not loaded simply waits on that thread while the cache swaps it in.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

M = TypeVar("M")


class ModelCache(Generic[M]):
    """`load(name)` builds a model on the device; `size_of(model)` says how many bytes it holds."""

    def __init__(
        self, load: Callable[[str], M], size_of: Callable[[M], int], budget_bytes: int
    ) -> None:
        self._load = load
        self._size_of = size_of
        self._budget = budget_bytes
        self._models: OrderedDict[str, M] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}  # sizes seen, kept after eviction to plan the next load

    @property
    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return list(self._models)

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes[name] for name in self._models)

    def get(self, name: str) -> M:
        """The model, loading it on a miss after evicting the least recently used models until it
        should fit (its size from an earlier load, else the largest size seen). A model larger
        than the whole budget is still loaded, alone."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        expected = self._sizes.get(name, max(self._sizes.values(), default=0))
        self._evict_until(self._budget - expected)
        model = self._load(name)
        self._sizes[name] = self._size_of(model)
        self._models[name] = model
        self._evict_until(self._budget, keep=name)
        return model

    def keep_only(self, name: str | None) -> None:
        """Evict every model but `name` (after an out-of-memory error)."""
        for other in [n for n in self._models if n != name]:
            self._evict(other)

    def _evict_until(self, budget: int, keep: str | None = None) -> None:
        for name in [n for n in self._models if n != keep]:
            if self.used_bytes <= budget:
                return
            self._evict(name)

    def _evict(self, name: str) -> None:
        """Drop a model and collect it now: its compiled calls hold reference cycles (a text
        tower's compiled call refers back to the tower), which reference counting alone would
        leave holding device memory until some later full collection, while the next model loads."""
        del self._models[name]
        gc.collect()
