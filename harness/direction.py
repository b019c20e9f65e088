"""'Better' in a study metric's direction (maximize or minimize), in one place (pure).

>>> better(0.8, 0.7, "maximize"), better(0.3, 0.4, "minimize"), better(0.5, None, "maximize")
(True, True, True)
>>> best_of([0.2, 0.9, 0.5], "minimize")
0.2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def sign(direction: str) -> float:
    """+1 where higher is better, -1 where lower is: `sign * value` is then always "higher is better"."""
    return 1.0 if direction == "maximize" else -1.0


def better(value: float, than: float | None, direction: str) -> bool:
    """Strictly better than `than`; anything is better than nothing (None)."""
    if than is None:
        return True
    return value > than if direction == "maximize" else value < than


def at_least_as_good(value: float, than: float | None, direction: str) -> bool:
    """Matches or beats `than`; a value that is not finite never does, and anything beats None or NaN."""
    if not math.isfinite(value):
        return False
    if than is None or not math.isfinite(than):
        return True
    return value >= than if direction == "maximize" else value <= than


def best_of(items: Iterable[T], direction: str, key: Callable[[T], float] = lambda x: x) -> T:  # type: ignore[assignment,return-value]
    """The best item by `key` (the first of equals), as `max` or `min` would pick it."""
    pick = max if direction == "maximize" else min
    return pick(items, key=key)
