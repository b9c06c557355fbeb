"""Capacity buckets: round sizes up so that similar batches share one compiled program.

Every array shape the jitted loop sees (atoms, systems, edges, candidate
pairs) is a capacity taken from a small ladder of sizes, ``2**k`` and
``1.5 * 2**k``. A stream of mixed batches then compiles a handful of programs
instead of one per batch, at a cost of at most 50 % padding.
"""

from __future__ import annotations


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest size on the ladder ``{2**k, 3 * 2**(k-1)}`` that is ``>= max(n, minimum)``.

    >>> [bucket(n) for n in (1, 8, 9, 13, 17, 100)]
    [8, 8, 12, 16, 24, 128]
    """
    n = max(int(n), int(minimum), 1)
    size = 1
    while True:
        if size >= n:
            return size
        if size >= 2 and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
