"""Per-system reductions over flat, padded per-atom arrays.

Every array in the engine is flat over atoms (or edges) with a ``system``
index array that maps each row to its system slot. Padding rows carry the
index ``n_systems`` (one past the last slot) and are dropped by every
reduction here, so padding never leaks into a real system's numbers.

Reductions accumulate each segment's rows in row order, and a system's rows
always appear in the same relative order whatever slot it sits in, which is
what makes a system's numbers independent of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_sum(values: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Sum rows of ``values`` (shape ``(N, ...)``) per system -> ``(n_systems, ...)``."""
    return jax.ops.segment_sum(values, system, num_segments=n_systems)


def segment_max(values: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Maximum of rows per system; systems without rows get ``-inf``."""
    return jax.ops.segment_max(values, system, num_segments=n_systems)


def segment_min(values: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Minimum of rows per system; systems without rows get ``+inf``."""
    return jax.ops.segment_min(values, system, num_segments=n_systems)


def segment_any(mask: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Whether any row of a system is ``True`` -> bool ``(n_systems,)``."""
    return segment_sum(mask.astype(jnp.int32), system, n_systems) > 0


def per_atom(table: jax.Array, system: jax.Array) -> jax.Array:
    """Broadcast a per-system table ``(n_systems, ...)`` to atoms ``(N, ...)``.

    Padding rows (index ``n_systems``) read a clamped row; callers mask them.
    """
    return jnp.take(table, system, axis=0, mode="clip")


def per_system_dot(a: jax.Array, b: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Inner product of two ``(N, 3)`` fields taken separately for every system -> ``(n_systems,)``."""
    return segment_sum(jnp.sum(a * b, axis=-1), system, n_systems)
