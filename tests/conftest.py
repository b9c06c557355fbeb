"""Test-suite setup: float64 everywhere, and the tests folder importable for shared structure builders."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Multi-threaded OpenBLAS fights JAX's CPU threads on a small machine: the small LAPACK calls of
# ASE (FrechetCellFilter's expm/logm, EMT) ran 10-30x slower. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import kups_relax  # noqa: E402,F401  (enables float64 before any array is made)
