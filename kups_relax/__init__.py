"""kups-relax: batched atomistic geometry relaxation on JAX.

>>> from ase.cluster import Icosahedron
>>> from kups_relax import relax
>>> from potentials import LennardJones
>>> results = relax([Icosahedron("Ar", 2)], LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5), fmax=0.05)

float64 is enabled on import (ASE parity); pass ``dtype="float32"`` for speed.
"""

import jax

jax.config.update("jax_enable_x64", True)

from .batch import Batch, Geometry  # noqa: E402
from .engine import DEFAULT_MAX_STEPS, RelaxResult, relax  # noqa: E402
from .validate import InvalidStructure, check_structure  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Batch", "DEFAULT_MAX_STEPS", "Geometry", "InvalidStructure", "RelaxResult",
           "check_structure", "relax", "__version__"]
