"""Test-suite setup: float64 everywhere, and the tests folder importable for shared structure builders."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import kups_relax  # noqa: E402,F401  (enables float64 before any array is made)
