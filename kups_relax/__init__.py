"""kups-relax: batched atomistic geometry relaxation on JAX.

>>> from ase.cluster import Icosahedron
>>> from kups_relax import relax
>>> from potentials import LennardJones
>>> results = relax([Icosahedron("Ar", 2)], LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5), fmax=0.05)

float64 is enabled on import (ASE parity); pass ``dtype="float32"`` for speed.
JAX's persistent compilation cache is switched on (``~/.cache/kups-relax/jax``) unless
``JAX_COMPILATION_CACHE_DIR`` or ``KUPS_RELAX_COMPILATION_CACHE=0`` is set.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)

# JAX's persistent compilation cache, on by default so that running the same job again
# compiles nothing: every program is cached, however quick to compile (JAX's default skips
# those under a second, and a warm run would still compile dozens of small ones). Set
# JAX_COMPILATION_CACHE_DIR to choose the folder, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
# to cache fewer programs, or KUPS_RELAX_COMPILATION_CACHE=0 to leave JAX's configuration alone.
if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(os.path.expanduser("~"), ".cache", "kups-relax", "jax"))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from .batch import Batch, Geometry  # noqa: E402
from .engine import DEFAULT_MAX_STEPS, RelaxResult, relax, relax_iter  # noqa: E402
from .filters import CellFilter  # noqa: E402
from .validate import InvalidStructure, check_structure  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Batch", "CellFilter", "DEFAULT_MAX_STEPS", "Geometry", "InvalidStructure", "RelaxResult",
           "check_structure", "relax", "relax_iter", "__version__"]
