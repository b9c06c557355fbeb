"""The potential protocol: one energy per system from the batch geometry.

A potential is a pytree (its parameters are leaves, so changing a parameter
does not recompile) with

* ``cutoff`` -- the interaction range in Å (a Python float, read on the host to
  size the neighbor list);
* ``supported_numbers`` -- the atomic numbers it covers, or ``None`` for all;
* ``energy(geometry, neighbors) -> (S,)`` -- a pure function giving every
  system's energy in eV. ``geometry.positions`` and ``geometry.cell`` may be
  strained copies (the engine differentiates through them for stress), so a
  potential must compute pair vectors with
  :func:`kups_relax.neighbors.pair_vectors` from the geometry it is given.

Forces and stress are not the potential's business: the engine takes
``-grad`` of the summed energies (systems are independent, so every system
gets its own forces) and the derivative with respect to a per-system strain.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from kups_relax.batch import Geometry
from kups_relax.neighbors import NeighborList


@runtime_checkable
class Potential(Protocol):
    """What the engine needs from an energy model (see the module docstring)."""

    @property
    def cutoff(self) -> float:
        """Interaction range, Å."""

    @property
    def supported_numbers(self) -> frozenset[int] | None:
        """Atomic numbers the potential covers; ``None`` for every element."""

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system energies, eV, shape ``(S,)``."""
