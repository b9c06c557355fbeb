"""Energy models behind one protocol (:class:`potentials.base.Potential`).

Name one with :func:`get_potential` (``"lj"``, ``"morse"``, ``"eam:<path>"``, ``"emt"``).
"""

from .base import Potential
from .eam import EAM
from .lennard_jones import LennardJones
from .morse import MorsePotential
from .registry import available_potentials, get_potential, register_potential

__all__ = ["EAM", "EMT", "LennardJones", "MorsePotential", "Potential", "available_potentials", "get_potential",
           "register_potential"]


def __getattr__(name):
    # EMT lives in its own module; import it on first use so this package loads without it
    if name == "EMT":
        from .emt import EMT

        return EMT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
