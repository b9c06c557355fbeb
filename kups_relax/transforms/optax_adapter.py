"""Optax optimizers run per system: the :class:`OptaxTransform` adapter and :func:`optax_optimizer`.

An optax ``GradientTransformation`` keeps one state for its whole parameter tree: one step
``count`` (bias correction, learning-rate schedules) and, in some transforms, norms over all
parameters. In a batch of systems both would mix the systems. :class:`OptaxTransform` gives
every atom row its own optax state (``jax.vmap`` of optax's ``init``/``update`` over rows). All
rows of a system take every step together, so each row's ``count`` is its own system's step
count, restarted when a slot takes a new structure; and for an *elementwise* transform (adam,
sgd, ...) applying it row by row is exactly applying it to the system alone. Which transforms
are elementwise, and how names such as ``"optax:adam(learning_rate=0.01)"`` are read, is
:mod:`kups_relax.transforms.optax_spec`'s job (re-exported here: :data:`OPTIMIZERS`,
:data:`BUILDING_BLOCKS`, :func:`canonical_spec`, :func:`is_optax_spec`, ...).

``maxstep`` (Å, default 0.2, ASE's) is not optax's: every optax optimizer is chained with
:class:`~kups_relax.transforms.MaxStepSize`, which scales a system's whole step so that no atom
moves more than ``maxstep`` (ASE's ``determine_step``).

Units: the gradients optax sees are minus the forces, eV/Å, and its updates are displacements,
Å. So for adam-like optimizers (normalised steps) ``learning_rate`` is roughly the step of
each coordinate in Å; for sgd it is Å²/eV (step = learning_rate * force).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import Chain, SystemIndex, chain, select_rows, take_along
from .max_step import MaxStepSize
from .optax_spec import (  # noqa: F401 -- re-exported: this module was the spec's home before issue 14
    BUILDING_BLOCKS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MAXSTEP,
    OPTIMIZERS,
    PREFIX,
    REFUSED,
    SCHEDULES,
    canonical_spec,
    is_optax_spec,
    optax_transform,
    parse_spec,
    standard,
)


class OptaxState(NamedTuple):
    """State of :class:`OptaxTransform`.

    Attributes:
        inner: the optax state, every leaf with a leading ``(N,)`` axis: one optax state per atom
            row (its ``count`` is the row's system's steps since its start).
    """

    inner: Any


@dataclasses.dataclass(frozen=True)
class OptaxTransform:
    """An elementwise optax transform run per system (one optax state per atom row).

    ``updates`` given to :meth:`update` are gradients ``(N, 3)`` (eV/Å, minus the forces); the
    result is optax's update, a displacement ``(N, 3)`` in Å (zero for inactive systems).
    Usually built by :func:`optax_optimizer`, which also chains :class:`MaxStepSize`.

    Attributes:
        spec: the optax optimizer, ``"optax:adam(learning_rate=0.01)"`` (stored in canonical form,
            so equal optimizers are equal objects and share compiled programs).
    """

    spec: str

    def __post_init__(self):
        object.__setattr__(self, "spec", canonical_spec(self.spec))
        optax_transform(self.spec)

    @property
    def optax(self) -> optax.GradientTransformation:
        """The wrapped optax transform (acting on one row's ``(3,)`` parameters)."""
        return optax_transform(self.spec)

    def init(self, params: jax.Array, index: SystemIndex) -> OptaxState:
        return OptaxState(inner=jax.vmap(self.optax.init)(params))

    def update(self, updates, state: OptaxState, params, active, index: SystemIndex):
        new_updates, inner = jax.vmap(self.optax.update)(updates, state.inner, params)
        rows = index.row_mask(active)
        inner = jax.tree.map(lambda new, old: select_rows(rows, new, old).astype(old.dtype), inner, state.inner)
        step = jnp.where(rows[:, None], new_updates, 0.0).astype(updates.dtype)
        return step, OptaxState(inner=inner)

    def take(self, state: OptaxState, rows: jax.Array, systems: jax.Array) -> OptaxState:
        return OptaxState(inner=jax.tree.map(lambda leaf: take_along(leaf, rows), state.inner))

    def reset(self, state: OptaxState, systems: jax.Array, index: SystemIndex) -> OptaxState:
        # the allowlisted transforms' initial states do not depend on parameter values (zeros,
        # constants, counts), so a fresh state from zero parameters is a fresh state
        rows = index.row_mask(systems)
        floats = [x.dtype for x in jax.tree.leaves(state.inner) if jnp.issubdtype(x.dtype, jnp.floating)]
        dtype = floats[0] if floats else jnp.float32
        fresh = jax.vmap(self.optax.init)(jnp.zeros((rows.shape[0], 3), dtype))
        inner = jax.tree.map(lambda new, old: select_rows(rows, new.astype(old.dtype), old), fresh, state.inner)
        return OptaxState(inner=inner)


def optax_optimizer(spec: str | Mapping, maxstep: float | None = None) -> Chain:
    """The transform for an optax optimizer name: ``chain(OptaxTransform(spec), MaxStepSize(maxstep))``.

    Args:
        spec: ``"optax:adam(learning_rate=0.01)"`` or a mapping (see :mod:`.optax_spec`).
        maxstep: largest displacement of any atom per step, Å; overrides a ``maxstep`` in the
            spec; default 0.2 (ASE's).

    Raises:
        ValueError: unknown names (the message lists the available ones), transforms that would
            mix systems, unknown or bad hyper-parameters.
    """
    call, spec_maxstep = parse_spec(spec, warn=True)
    step = maxstep if maxstep is not None else spec_maxstep if spec_maxstep is not None else DEFAULT_MAXSTEP
    if not step > 0:
        raise ValueError(f"maxstep must be > 0 (Å), got {step!r}")
    return chain(OptaxTransform(PREFIX + call.render()), MaxStepSize(max_step=float(step)))
