"""Test-suite setup: float64 everywhere, and the tests folder importable for shared structure builders."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

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

# A compilation cache of this run only: JAX's persistent cache and our saved executables
# (kups_relax.executables) in a fresh temporary folder, created here and removed at exit, so
# nothing depends on what an earlier run left in ~/.cache, while a module that needs a program
# another module compiled (the per-module release below dropped it) loads it from disk instead
# of compiling it again. pytest-xdist's workers share the folder of the process that started
# them: our executables are renamed into place; JAX writes its entries in place, and an entry
# read while another worker writes it is a cache miss (JAX warns and compiles), never an error.
# The CLI tests give their subprocesses a cache folder of their own (that is what they test).
# KUPS_RELAX_TEST_CACHE=1 uses the user's cache instead, for quicker local reruns;
# KUPS_RELAX_TEST_NO_CACHE=1 keeps no cache at all (every module compiles afresh: for measuring).
_SESSION_CACHE = "KUPS_RELAX_TEST_SESSION_CACHE"
if os.environ.get("KUPS_RELAX_TEST_CACHE") == "1":
    kups_relax.enable_compilation_cache()
elif os.environ.get("KUPS_RELAX_TEST_NO_CACHE") == "1":
    jax.config.update("jax_enable_compilation_cache", False)
else:
    if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_SESSION_CACHE)):
        os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="kups-relax-tests-")
        atexit.register(shutil.rmtree, os.environ[_SESSION_CACHE], ignore_errors=True)
    kups_relax.enable_compilation_cache(os.environ[_SESSION_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    Each XLA CPU executable keeps ~200 memory mappings; a full run compiles thousands of
    programs and passed the kernel's default limit of 65,530 mappings per process, after which
    XLA's compiler crashed (segmentation fault). A program another module needs again is loaded
    from this run's cache folder (above), not compiled again.
    """
    yield
    jax.clear_caches()
    kups_relax.executables.clear()
    gc.collect()


#: The modules that take longest (compiling their own relaxation loops or running relax-batch in
#: subprocesses), heaviest first (a full run on 2 cores, 2026-12-03). They run first, so that pytest-xdist's
#: two workers (``-n 2 --dist loadfile`` in pyproject.toml: a module's tests, and so its
#: module-scoped fixtures, stay on one worker) end together instead of one waiting on a long
#: module handed out last. The other modules follow in their usual order.
HEAVIEST_FIRST = ["test_sevennet.py", "test_precon_lbfgs.py", "test_cell_filter.py", "test_cli.py", "test_engine_lj.py",
                  "test_fire.py",
                  "test_ase_interop.py", "test_ase_conformance.py", "test_batch_invariance.py",
                  "test_campaign_io.py", "test_eam.py", "test_devices.py", "test_emt.py", "test_streaming.py",
                  "test_optax.py", "test_neighbors.py", "test_failure_isolation.py", "test_distributed.py",
                  "test_morse.py"]


@pytest.hookimpl(trylast=True)  # after any plugin that shuffles the tests (pytest-randomly)
def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
