"""kups-relax: batched atomistic geometry relaxation on JAX.

>>> from ase.cluster import Icosahedron
>>> from kups_relax import relax
>>> from potentials import LennardJones
>>> results = relax([Icosahedron("Ar", 2)], LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5), fmax=0.05)

Importing kups-relax changes nothing in JAX's configuration. Its entry points (``relax``,
``relax_iter``, ``Batch.from_atoms``, the ASE calculator and optimizers, the potentials'
constructors that build arrays, ``relax-batch``) run with JAX's 64-bit types on in their own
scope (:mod:`kups_relax.precision`): float64 by default for classical potentials (ASE parity),
float32 for learned ones (SevenNet, as sevenn runs it), ``dtype=`` to choose, and a float32 JAX
model beside them stays float32.

Compiled programs: the engine's big programs are saved on disk and reused across processes
(:mod:`kups_relax.executables`; ``KUPS_RELAX_SAVED_EXECUTABLES=0`` turns that off). JAX's own
persistent compilation cache is the process's: :func:`enable_compilation_cache` switches it on
(``~/.cache/kups-relax/jax`` or ``JAX_COMPILATION_CACHE_DIR``); ``relax-batch`` does so unless
``KUPS_RELAX_COMPILATION_CACHE=0``.
"""

from .batch import Batch, Geometry
from .engine import DEFAULT_MAX_STEPS, RelaxResult, relax, relax_iter
from .executables import enable_compilation_cache
from .feed import Feed
from .filters import CellFilter
from .validate import InvalidStructure, check_structure

__version__ = "0.1.0"

__all__ = ["Batch", "CellFilter", "DEFAULT_MAX_STEPS", "Feed", "Geometry", "InvalidStructure", "RelaxResult",
           "check_structure", "enable_compilation_cache", "relax", "relax_iter", "__version__"]
