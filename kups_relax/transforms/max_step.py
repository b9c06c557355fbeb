"""Per-system step-length control (ASE's ``Optimizer.determine_step``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..segments import per_atom
from .base import EmptyState, SystemIndex


@dataclasses.dataclass(frozen=True)
class MaxStepSize:
    """Scale each system's whole step so that no row moves more than ``max_step``.

    For every system, if the longest per-row step ``L`` (Euclidean norm over the
    last axis) is ``>= max_step``, all its rows are multiplied by ``max_step / L``
    (ASE's ``determine_step``: the direction is kept). Systems are scaled
    independently.

    Attributes:
        max_step: largest allowed displacement of any atom, Å (ASE's ``maxstep``, 0.2).
    """

    max_step: float = 0.2

    def init(self, params: jax.Array, index: SystemIndex) -> EmptyState:
        return EmptyState()

    def update(self, updates, state: EmptyState, params, active, index: SystemIndex):
        lengths = jnp.linalg.norm(updates, axis=-1)
        longest = index.max(lengths)
        clip = longest >= self.max_step
        scale = jnp.where(clip, self.max_step / jnp.where(clip, longest, 1.0), 1.0)
        return updates * per_atom(scale, index.system)[:, None], state

    def reset(self, state, systems, index):
        return state

    def take(self, state, rows, systems):
        return state
