"""Key/value states of recent prefixed requests, reused by the ``hf`` backend when a new request continues one.

CoRD asks every teacher, at every step, to continue each beam's prefix — the previous step's prefix plus one
step — so without reuse each call re-encodes the whole prompt and reasoning so far (a "prefill") only to add a
few dozen tokens; curation's answer call re-encodes the reasoning its own previous call just wrote.  vLLM does
this itself (automatic prefix caching); ``transformers``' ``generate`` accepts a pre-filled cache but keeps none
across calls, so this module keeps one, bounded in bytes.

Choices (nothing prescribes them):
- only requests with an assistant prefix take part (CoRD's steps, curation's answers, continuations): plain
  prompts (collection, evaluation) keep exactly the numerics they had;
- an entry is one sequence's token ids and its per-layer keys and values (unpadded, on the model's device);
  a new sequence reuses the entry sharing its longest token prefix (entries are bucketed by their first
  ``KEY`` tokens; common prefixes found by binary search on tuple slices), always leaving at least its last
  token to compute;
- a batch (left-padded) reuses the first ``C`` columns, the largest width every row has cached; a batch whose
  rows cannot all reuse at least ``MIN_REUSE`` tokens is encoded from scratch;
- least recently used entries go first once the budget (``prefix_cache_mb``) is exceeded.

The reused states are those an earlier forward computed for the same tokens at the same positions, so the
logits match a fresh encoding up to float rounding (tested).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

KEY = 8  # tokens that bucket an entry (the start of the rendered prompt)
MIN_REUSE = 8  # reused columns below which the batch is encoded from scratch


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget, self.bytes = budget_bytes, 0
        # token ids → (keys per layer, values per layer, bytes), least recently used first
        self.entries: OrderedDict[tuple, tuple[list, list, int]] = OrderedDict()
        self.buckets: dict[tuple, set[tuple]] = {}
        self.hits = self.reused_tokens = 0

    def longest(self, ids: list[int]) -> tuple[int, tuple | None]:
        """(tokens of ``ids`` an entry holds, that entry's key): the longest shared token prefix."""
        best, key = 0, None
        if len(ids) <= KEY:
            return 0, None
        q = tuple(ids)
        for k in self.buckets.get(q[:KEY], ()):
            common = _common(k, q)
            if common > best:
                best, key = common, k
        return best, key

    def batch(self, rows: list[list[int]], width: int):
        """Keys and values of the first ``C`` columns of the left-padded batch ``rows`` (padded to ``width``), as
        ``(C, [(keys, values) per layer])``, or ``(0, None)`` when the rows cannot share enough."""
        found = [self.longest(r) for r in rows]
        if any(k is None for _, k in found):
            return 0, None
        cols = min(width - len(r) + min(n, len(r) - 1) for r, (n, _) in zip(rows, found))
        if min(cols - (width - len(r)) for r in rows) < MIN_REUSE:
            return 0, None
        first = self.entries[found[0][1]]
        layers = []
        for layer in range(len(first[0])):
            k0, v0 = first[0][layer], first[1][layer]
            ks = k0.new_zeros((len(rows), k0.shape[0], cols, k0.shape[-1]))
            vs = v0.new_zeros((len(rows), v0.shape[0], cols, v0.shape[-1]))
            for i, (r, (_, k)) in enumerate(zip(rows, found)):
                pad, e = width - len(r), self.entries[k]
                ks[i, :, pad:] = e[0][layer][:, :cols - pad]
                vs[i, :, pad:] = e[1][layer][:, :cols - pad]
            layers.append((ks, vs))
        for _, k in found:
            self.entries.move_to_end(k)
        self.hits += len(rows)
        self.reused_tokens += sum(cols - (width - len(r)) for r in rows)
        return cols, layers

    def put(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep one sequence's states (``keys[layer]``: [heads, len(ids), dim], already copied out of the batch)."""
        if len(ids) <= KEY or not self.budget:
            return
        key = tuple(ids)
        size = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if key in self.entries or size > self.budget:
            return
        self.entries[key] = (keys, values, size)
        self.buckets.setdefault(key[:KEY], set()).add(key)
        self.bytes += size
        while self.bytes > self.budget:
            old, (_, _, s) = self.entries.popitem(last=False)
            self.buckets[old[:KEY]].discard(old)
            self.bytes -= s

    def clear(self) -> None:
        self.entries.clear()
        self.buckets.clear()
        self.bytes = 0


def _common(a: tuple, b: tuple) -> int:
    """Length of the longest common prefix of two token tuples (binary search on C-level slice equality)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def layer_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values) per layer of a ``transformers`` cache — ``DynamicCache`` of 5.x (``layers``) or 4.x
    (``key_cache``/``value_cache``) — or None for any other kind (sliding windows, static caches)."""
    if type(cache).__name__ != "DynamicCache":
        return None
    if hasattr(cache, "layers"):
        if not all(type(x).__name__ == "DynamicLayer" for x in cache.layers):
            return None
        return [(x.keys, x.values) for x in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def to_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A ``DynamicCache`` holding the given per-layer states (``update`` exists in every version)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache
