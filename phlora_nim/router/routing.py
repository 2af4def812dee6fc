"""Which replica serves a request: rendezvous hashing on the adapter name, with bounded load.

Rendezvous (highest-random-weight) hashing ranks every replica by ``hash(adapter, replica)``; an
adapter goes to its first replica, so its weights stay warm in few caches, and when a replica
leaves or joins only the adapters ranked first on it move. The bounded-load rule (consistent
hashing with bounded loads, Mirrokni et al.) keeps a hot adapter from drowning its replica: a
replica whose in-flight count would exceed ``(1 + ε) ×`` the mean in-flight load spills the
request to the next replica in the ranking. Requests for the base model carry no adapter and go
to the least loaded replica.

Example:
    >>> rank_replicas("support", ["10.0.0.1:8001", "10.0.0.2:8001"])[0] in ("10.0.0.1:8001", "10.0.0.2:8001")
    True
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence

_rotation = itertools.count()


def _weight(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_replicas(key: str, replicas: Sequence[str]) -> list[str]:
    """Replicas in rendezvous order for ``key`` (best first); stable for a given set."""
    return sorted(replicas, key=lambda r: (_weight(key, r), r), reverse=True)


def load_bound(loads: Mapping[str, int], spill_factor: float) -> int:
    """The most in-flight requests a replica may hold after taking one more request.

    ``ceil((1 + ε) · (total + 1) / n)``, at least 1: the sum of the loads is below ``n ×`` the
    bound, so some replica is always under it.
    """
    if not loads:
        return 1
    mean = (sum(loads.values()) + 1) / len(loads)
    return max(1, math.ceil((1.0 + spill_factor) * mean))


def choose_replicas(key: str | None, loads: Mapping[str, int], *, spill_factor: float) -> list[str]:
    """Every replica in ``loads``, in the order to try them for one request.

    Args:
        key: the adapter name, or None for a base-model request.
        loads: in-flight count of each healthy replica.
        spill_factor: ε of the bounded-load rule (≥ 0).

    Returns:
        With a key: the rendezvous ranking, except that replicas at or above the load bound move
        behind those under it (each group keeps its rendezvous order). Without a key: least loaded
        first, ties rotated so equal replicas share the work.
    """
    replicas = list(loads)
    if not replicas:
        return []
    if key is None:
        start = next(_rotation) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        return sorted(rotated, key=lambda r: loads[r])  # stable: rotation breaks ties
    bound = load_bound(loads, spill_factor)
    ranked = rank_replicas(key, replicas)
    under = [r for r in ranked if loads[r] + 1 <= bound]
    over = [r for r in ranked if loads[r] + 1 > bound]
    return under + over
