"""Energy models behind one protocol (:class:`potentials.base.Potential`)."""

import kups_relax  # noqa: F401  (enables float64 before any array is made)

from .base import Potential
from .lennard_jones import LennardJones

__all__ = ["LennardJones", "Potential"]
