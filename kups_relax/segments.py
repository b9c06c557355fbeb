"""Per-system reductions over flat, padded per-atom arrays.

Every array in the engine is flat over atoms (or neighbor-matrix columns) with a ``system``
index array that maps each row to its system slot. Padding rows carry the index
``n_systems`` (one past the last slot) and are dropped by every reduction here, so padding
never leaks into a real system's numbers.

**Row blocks.** A system's rows are contiguous, start at a multiple of :data:`ROW_BLOCK`
and own whole blocks of :data:`ROW_BLOCK` rows (the packing in :mod:`kups_relax.batch` and
the slot layouts of :mod:`kups_relax.layout` guarantee it, and
:func:`kups_relax.batch.device_geometry` checks it). A per-system reduction then first
reduces every block (a reshape and a fused sum: no scatter) and scatters only one value per
block: on XLA's CPU backend a scatter costs an order of magnitude more per element than a
fused reduction, so scattering one value per block instead of per row makes a per-system
dot several times faster. Rows
beyond the aligned ones (the 3 cell rows per system of a variable-cell optimizer) are
reduced row by row.

Reductions accumulate each block's rows in row order and the blocks of a system in block
order, and a system's rows always appear in the same relative order whatever slot it sits
in, which is what makes a system's numbers independent of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Rows per block; every system starts at a multiple of it and owns whole blocks.
ROW_BLOCK = 8


def _blocked(values: jax.Array, system: jax.Array, n_systems: int, aligned: int, combine, identity):
    """``(block values, block systems, rest values, rest systems)`` for a blocked reduction."""
    if aligned % ROW_BLOCK or aligned == 0:
        return None, None, values, system
    head, rest = values[:aligned], values[aligned:]
    # padding rows of a block are replaced by the reduction's identity (one fused select)
    padding = (system[:aligned] >= n_systems).reshape((aligned,) + (1,) * (values.ndim - 1))
    head = jnp.where(padding, jnp.asarray(identity, values.dtype), head)
    blocks = head.reshape((aligned // ROW_BLOCK, ROW_BLOCK) + head.shape[1:])
    block_values = combine(blocks, axis=1)
    # a block belongs to the system of its first row (padding rows of a slot follow its atoms)
    return block_values, system[:aligned:ROW_BLOCK], rest, system[aligned:]


def _reduce(values, system, n_systems, aligned, combine, segment_op, identity):
    aligned = values.shape[0] if aligned is None else min(aligned, values.shape[0])
    block_values, block_system, rest, rest_system = _blocked(values, system, n_systems, aligned, combine, identity)
    out = None
    if block_values is not None:
        out = segment_op(block_values, block_system, num_segments=n_systems)
    if rest.shape[0]:
        tail = segment_op(rest, rest_system, num_segments=n_systems)
        out = tail if out is None else combine(jnp.stack([out, tail]), axis=0)
    return out


def segment_sum(values: jax.Array, system: jax.Array, n_systems: int, aligned: int | None = None) -> jax.Array:
    """Sum rows of ``values`` (shape ``(N, ...)``) per system -> ``(n_systems, ...)``.

    The first ``aligned`` rows (default: all) are in :data:`ROW_BLOCK`-row blocks of one
    system each (module docstring); later rows are summed one by one. Padding rows are dropped.
    """
    return _reduce(values, system, n_systems, aligned, jnp.sum, jax.ops.segment_sum, 0)


def segment_max(values: jax.Array, system: jax.Array, n_systems: int, aligned: int | None = None) -> jax.Array:
    """Maximum of rows per system (as :func:`segment_sum`); systems without rows get the
    smallest value of the dtype (``-inf`` for floats)."""
    lowest = -jnp.inf if jnp.issubdtype(values.dtype, jnp.floating) else jnp.iinfo(values.dtype).min
    return _reduce(values, system, n_systems, aligned, jnp.max, jax.ops.segment_max, lowest)


def segment_min(values: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """Minimum of rows per system; systems without rows get ``+inf`` (row by row: any layout)."""
    return jax.ops.segment_min(values, system, num_segments=n_systems)


def segment_any(mask: jax.Array, system: jax.Array, n_systems: int, aligned: int | None = None) -> jax.Array:
    """Whether any row of a system is ``True`` -> bool ``(n_systems,)``."""
    return segment_max(mask.astype(jnp.int32), system, n_systems, aligned) > 0


def per_atom(table: jax.Array, system: jax.Array) -> jax.Array:
    """Broadcast a per-system table ``(n_systems, ...)`` to atoms ``(N, ...)``.

    Padding rows (index ``n_systems``) read a clamped row; callers mask them.
    """
    return jnp.take(table, system, axis=0, mode="clip")


def row_mask(systems: jax.Array, system: jax.Array, n_systems: int) -> jax.Array:
    """``(N,)`` bool: rows whose system is selected in the ``(n_systems,)`` mask (padding rows: False)."""
    padded = jnp.concatenate([systems, jnp.zeros((1,), bool)])
    return padded[jnp.clip(system, 0, n_systems)]


def select_rows(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where the leading-axis ``mask`` is set, else ``old`` (broadcast over trailing axes).

    ``mask`` is ``(N,)`` over rows or ``(S,)`` over systems, matching the first axis of ``old``."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(old) - 1)), new, old)


def per_system_dot(a: jax.Array, b: jax.Array, system: jax.Array, n_systems: int,
                   aligned: int | None = None) -> jax.Array:
    """Inner product of two ``(N, 3)`` fields taken separately for every system -> ``(n_systems,)``."""
    return segment_sum(jnp.sum(a * b, axis=-1), system, n_systems, aligned)
