"""How many XLA programs a stream of 1,000 mixed structures (10 to 500 atoms) compiles.

    python benchmarks/bench_compile_bound.py [--n 1000] [--steps 3] [--cache DIR]

Runs ``kups_relax.relax`` with EMT on ``--n`` structures (the mixed metal set of
``metal_structures.py``, 13 to 256 atoms, with every fifth one replaced by an fcc bulk
supercell of 288 to 500 atoms and every seventh by a 10-atom cluster) in two fresh
processes sharing one persistent compilation cache folder: the first compiles, the
second should compile nothing. ``--steps`` is small because the number of programs,
not the relaxation, is measured (neighbor-list growth is exercised all the same: every
structure is admitted into a slot and takes steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys, time, collections
t0 = time.perf_counter()
sys.path.insert(0, HERE)
from bench_compile_bound import mixed_structures
from kups_relax import enable_compilation_cache, relax
from kups_relax.compile_stats import compile_stats
from potentials import get_potential
enable_compilation_cache()  # as relax-batch does
structures = mixed_structures(N)
results = relax(structures, get_potential("emt"), fmax=0.05, max_steps=STEPS)
c = compile_stats()
print(json.dumps(dict(programs=c.programs, cached=c.cached, compile_s=c.seconds, wall_s=time.perf_counter() - t0,
                      atoms=sum(map(len, structures)), sizes=[min(map(len, structures)), max(map(len, structures))],
                      status=collections.Counter(r.status for r in results))))
"""


def mixed_structures(n: int):
    """``n`` mixed metal structures of 10 to 500 atoms (deterministic)."""
    from ase.build import bulk
    from ase.cluster import Icosahedron

    from metal_structures import METALS, lattice_constant, metal_structures

    big_reps = [(3, 4, 6), (4, 4, 5), (4, 5, 5), (5, 5, 5), (3, 5, 6), (4, 4, 6)]
    out = []
    for k, atoms in enumerate(metal_structures(n)):
        element = METALS[k % len(METALS)]
        if k % 5 == 4:
            atoms = bulk(element, "fcc", a=lattice_constant([element]), cubic=True) * big_reps[k % len(big_reps)]
            atoms.rattle(0.05, seed=k)
        elif k % 7 == 6:
            atoms = Icosahedron(element, 2)[:10]
            atoms.center(vacuum=6.0)
            atoms.rattle(0.05, seed=k)
        out.append(atoms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache", help="compilation cache folder (default: a new temporary one)")
    args = parser.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="kups-cache-")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    code = CHILD.replace("HERE", repr(HERE)).replace("N)", f"{args.n})").replace("STEPS)", f"{args.steps})")
    for run in ("first run (empty cache)", "second run (same cache)"):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{run}: {figures}")
    print(f"cache: {cache}")


if __name__ == "__main__":
    main()
