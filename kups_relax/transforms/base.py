"""The optimizer-transform protocol, per system, in the spirit of optax.

A transform maps the gradient of every system (flat ``(N, 3)`` rows; a :class:`SystemIndex`
says which system every row belongs to) to an update, keeping its own state:

* ``init(params, index) -> state``
* ``update(updates, state, params, active, index) -> (updates, state)``: ``active``
  ``(S,)`` says which systems take this step; the state of the others must not
  change (a converged system keeps its history, bit for bit).
* ``reset(state, systems, index) -> state``: forget the history of the systems in the
  ``(S,)`` mask, so a slot can take a new structure.
* ``take(state, rows, systems) -> state``: the state of a smaller (or reordered) batch whose
  row ``r`` is old row ``rows[r]`` and whose system ``s`` is old system ``systems[s]``
  (out-of-range entries: new empty rows and systems). The engine compacts the running
  systems of a batch this way when nothing waits for their slots.

A rejected step (the neighbor list overflowed, so the engine keeps the old state and redoes the
step after growing it) hands ``update`` the same state, parameters and gradients again. A state
type may list in ``REWRITTEN_BY_REDO`` (a class attribute of its ``NamedTuple``) the fields that
such a redo writes identically wherever the rejected step wrote them (a ring-buffer slot at an
unchanged clock): the engine keeps those fields from the rejected step instead of copying the
old ones back (for L-BFGS that copy was the whole ``2 x memory x N x 3`` history every step,
a large part of a step's time). See :func:`partition_rewritten`.

The index is passed in, not kept in the state: it describes the batch, which the engine owns
(after a ``take`` the batch has a new one). Every reduction inside a transform is per system
(:mod:`kups_relax.segments`); nothing ever mixes systems. Transforms are frozen dataclasses of
plain Python hyper-parameters, so they are hashable and serve as static arguments to jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from ..segments import per_atom, per_system_dot, row_mask, segment_max, select_rows  # noqa: F401 (select_rows: re-exported)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SystemIndex:
    """Which system every parameter row belongs to.

    Attributes:
        system: ``(N,)`` int, the system slot of each row; ``n_systems`` marks padding rows.
        n_systems: number of system slots ``S`` (static).
        aligned: the first ``aligned`` rows come in whole row blocks of one system each
            (:mod:`kups_relax.segments`; the atom rows of a batch), so per-system reductions over
            them need no scatter; ``None``: no such rows (static).
    """

    system: jax.Array
    n_systems: int = dataclasses.field(metadata=dict(static=True))
    aligned: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def _aligned(self) -> int:
        return 0 if self.aligned is None else self.aligned

    def dot(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """Per-system inner product of two ``(N, 3)`` fields -> ``(S,)``."""
        return per_system_dot(a, b, self.system, self.n_systems, self._aligned)

    def max(self, values: jax.Array) -> jax.Array:
        """Per-system maximum of ``(N,)`` values -> ``(S,)`` (``-inf`` for systems without rows)."""
        return segment_max(values, self.system, self.n_systems, self._aligned)

    def broadcast(self, table: jax.Array) -> jax.Array:
        """A per-system ``(S, ...)`` table at every row -> ``(N, ...)`` (padding rows read a clamped row)."""
        return per_atom(table, self.system)

    def row_mask(self, systems: jax.Array) -> jax.Array:
        """``(N,)`` bool: rows whose system is selected in the ``(S,)`` mask ``systems``."""
        return row_mask(systems, self.system, self.n_systems)


@runtime_checkable
class Transform(Protocol):
    """A per-system gradient transformation (see the module docstring)."""

    def init(self, params: jax.Array, index: SystemIndex) -> Any: ...

    def update(self, updates: jax.Array, state: Any, params: jax.Array, active: jax.Array,
               index: SystemIndex) -> tuple[jax.Array, Any]: ...

    def reset(self, state: Any, systems: jax.Array, index: SystemIndex) -> Any: ...

    def take(self, state: Any, rows: jax.Array, systems: jax.Array) -> Any: ...


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def take_along(values: jax.Array, index: jax.Array, axis: int = 0) -> jax.Array:
    """``values`` at ``index`` along ``axis``; out-of-range entries read zeros (new empty rows or
    systems of a :meth:`Transform.take`)."""
    return jnp.take(values, index, axis=axis, mode="fill", fill_value=0)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Multiply updates by a constant (ASE's LBFGS ``damping``)."""

    factor: float

    def init(self, params, index):
        return EmptyState()

    def update(self, updates, state, params, active, index):
        return updates * self.factor, state

    def reset(self, state, systems, index):
        return state

    def take(self, state, rows, systems):
        return state


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def partition_rewritten(state: Any) -> tuple[Any, Any]:
    """Split a transform state into ``(rest, rewritten)``: the fields its ``NamedTuple`` types
    list in ``REWRITTEN_BY_REDO`` (see the module docstring) are ``None`` in ``rest`` and the
    only non-``None`` fields of ``rewritten``; nested states (tuples, :class:`ChainState`) are
    split field by field. :func:`merge_rewritten` puts them together again."""
    if _is_namedtuple(state):
        names = getattr(type(state), "REWRITTEN_BY_REDO", ())
        parts = [(None, v) if n in names else partition_rewritten(v) for n, v in zip(state._fields, state)]
        return type(state)(*[p[0] for p in parts]), type(state)(*[p[1] for p in parts])
    if isinstance(state, tuple):
        parts = [partition_rewritten(v) for v in state]
        return tuple(p[0] for p in parts), tuple(p[1] for p in parts)
    return state, None


def merge_rewritten(rest: Any, rewritten: Any) -> Any:
    """The inverse of :func:`partition_rewritten`."""
    if rewritten is None:
        return rest
    if rest is None:
        return rewritten
    if _is_namedtuple(rest):
        return type(rest)(*[merge_rewritten(a, b) for a, b in zip(rest, rewritten)])
    if isinstance(rest, tuple):
        return tuple(merge_rewritten(a, b) for a, b in zip(rest, rewritten))
    return rest


class ChainState(NamedTuple):
    inner: tuple


@dataclasses.dataclass(frozen=True)
class Chain:
    """Apply transforms one after another, as ``optax.chain`` does."""

    transforms: tuple

    def init(self, params, index):
        return ChainState(tuple(t.init(params, index) for t in self.transforms))

    def update(self, updates, state, params, active, index):
        new_states = []
        for t, s in zip(self.transforms, state.inner):
            updates, s = t.update(updates, s, params, active, index)
            new_states.append(s)
        return updates, ChainState(tuple(new_states))

    def reset(self, state, systems, index):
        return ChainState(tuple(t.reset(s, systems, index) for t, s in zip(self.transforms, state.inner)))

    def take(self, state, rows, systems):
        return ChainState(tuple(t.take(s, rows, systems) for t, s in zip(self.transforms, state.inner)))


def chain(*transforms: Transform) -> Chain:
    """Compose transforms left to right (``chain(ScaleByAseLbfgs(), MaxStepSize())``)."""
    return Chain(tuple(transforms))
