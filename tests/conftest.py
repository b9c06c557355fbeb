"""Test-suite setup: float64 everywhere, and the tests folder importable for shared structure builders."""

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Multi-threaded OpenBLAS fights JAX's CPU threads on a small machine: the small LAPACK calls of
# ASE (FrechetCellFilter's expm/logm, EMT) ran 10-30x slower. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import kups_relax  # noqa: E402,F401
import kups_relax.executables  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests build arrays with the engine's lower-level modules directly: float64 for the whole test
# process (importing kups_relax does not switch it on; test_import_side_effects.py checks that).
jax.config.update("jax_enable_x64", True)

# No persistent compilation cache inside the test process: the suite must not depend on what
# an earlier run left in ~/.cache. The CLI tests give their
# subprocesses a cache folder of their own (that is what they test). KUPS_RELAX_TEST_CACHE=1
# keeps the cache, for quicker local reruns.
if os.environ.get("KUPS_RELAX_TEST_CACHE") != "1":
    jax.config.update("jax_enable_compilation_cache", False)
else:
    kups_relax.enable_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    Each XLA CPU executable keeps ~200 memory mappings; a full run compiles thousands of
    programs and passed the kernel's default limit of 65,530 mappings per process, after which
    XLA's compiler crashed (segmentation fault). Modules share few programs, so little is recompiled.
    """
    yield
    jax.clear_caches()
    kups_relax.executables.clear()
    gc.collect()
