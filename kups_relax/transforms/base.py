"""The optimizer-transform protocol, per system, in the spirit of optax.

A transform maps the gradient of every system (flat ``(N, 3)`` rows with a
:class:`SystemIndex`) to an update, keeping its own state:

* ``init(params, index) -> state``
* ``update(updates, state, params, active) -> (updates, state)``: ``active``
  ``(S,)`` says which systems take this step; the state of the others must not
  change (a converged system keeps its history, bit for bit).
* ``reset(state, systems) -> state``: forget the history of the systems in the
  ``(S,)`` mask, so a slot can take a new structure.

Every reduction inside a transform is per system (:mod:`kups_relax.segments`);
nothing ever mixes systems. Transforms are frozen dataclasses of plain Python
hyper-parameters, so they are hashable and serve as static arguments to jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SystemIndex:
    """Which system every parameter row belongs to.

    Attributes:
        system: ``(N,)`` int, the system slot of each row; ``n_systems`` marks padding rows.
        n_systems: number of system slots ``S`` (static).
    """

    system: jax.Array
    n_systems: int = dataclasses.field(metadata=dict(static=True))

    def row_mask(self, systems: jax.Array) -> jax.Array:
        """``(N,)`` bool: rows whose system is selected in the ``(S,)`` mask ``systems``."""
        padded = jnp.concatenate([systems, jnp.zeros((1,), bool)])
        return padded[jnp.clip(self.system, 0, self.n_systems)]


@runtime_checkable
class Transform(Protocol):
    """A per-system gradient transformation (see the module docstring)."""

    def init(self, params: jax.Array, index: SystemIndex) -> Any: ...

    def update(self, updates: jax.Array, state: Any, params: jax.Array,
               active: jax.Array) -> tuple[jax.Array, Any]: ...

    def reset(self, state: Any, systems: jax.Array) -> Any: ...


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def select_rows(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where the ``(N,)`` row mask is set, else ``old`` (broadcast over trailing axes)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(old) - 1)), new, old)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Multiply updates by a constant (ASE's LBFGS ``damping``)."""

    factor: float

    def init(self, params, index):
        return EmptyState()

    def update(self, updates, state, params, active):
        return updates * self.factor, state

    def reset(self, state, systems):
        return state


class ChainState(NamedTuple):
    inner: tuple


@dataclasses.dataclass(frozen=True)
class Chain:
    """Apply transforms one after another, as ``optax.chain`` does."""

    transforms: tuple

    def init(self, params, index):
        return ChainState(tuple(t.init(params, index) for t in self.transforms))

    def update(self, updates, state, params, active):
        new_states = []
        for t, s in zip(self.transforms, state.inner):
            updates, s = t.update(updates, s, params, active)
            new_states.append(s)
        return updates, ChainState(tuple(new_states))

    def reset(self, state, systems):
        return ChainState(tuple(t.reset(s, systems) for t, s in zip(self.transforms, state.inner)))


def chain(*transforms: Transform) -> Chain:
    """Compose transforms left to right (``chain(ScaleByAseLbfgs(), MaxStepSize())``)."""
    return Chain(tuple(transforms))
