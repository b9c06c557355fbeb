"""Force-evaluation throughput against total atoms in one batch (EMT, float64, CPU or GPU).

    python benchmarks/bench_scaling.py [--reps 7 10 16 20 25 30] [--repeat 3]

For each size: an fcc Cu cubic supercell (4 * reps**3 atoms, rattled) and, separately,
the same number of atoms as a batch of 500-atom cells. Reported per size: neighbor
list build time (a full build, cell list), energy + forces time (best of ``--repeat``,
after warm-up), atoms/s and microseconds per atom per evaluation. Linear scaling shows
as flat atoms/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import numpy as np
from ase.build import bulk

import kups_relax
from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from potentials import EMT

jax.config.update("jax_enable_x64", True)  # float64: this script calls the engine's modules directly
if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
    kups_relax.enable_compilation_cache()  # as relax-batch does

_evaluate = jax.jit(evaluate, static_argnames="compute_stress")
_rebuild = jax.jit(nl.rebuild)


def timed(fn, repeat):
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def measure(structures, potential, repeat):
    batch = Batch.from_atoms(structures)
    g = batch.geometry
    neighbors = nl.allocate(g, potential.cutoff, 0.5)
    t_build = timed(lambda: _rebuild(neighbors, g), repeat)
    t_eval = timed(lambda: _evaluate(potential, g, neighbors, compute_stress=False), repeat)
    return int(neighbors.n_pairs), t_build, t_eval


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, nargs="+", default=[7, 10, 16, 20, 25, 30])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    potential = EMT()
    print(f"# {datetime.date.today()}, {platform.machine()}, jax {jax.__version__}, backend {jax.default_backend()}")
    print("| layout | atoms | pairs | build s | evaluate s | atoms/s | us/atom |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for reps in args.reps:
        cell = bulk("Cu", "fcc", a=3.6, cubic=True) * (reps, reps, reps)
        cell.rattle(0.05, seed=reps)
        n = len(cell)
        small = bulk("Cu", "fcc", a=3.6, cubic=True) * (5, 5, 5)  # 500 atoms
        batch = []
        for k in range(max(1, n // len(small))):
            s = small.copy()
            s.rattle(0.05, seed=1000 + k)
            batch.append(s)
        for label, structures in [("one cell", [cell]), ("500-atom cells", batch)]:
            try:
                pairs, t_build, t_eval = measure(structures, potential, args.repeat)
            except Exception as err:  # out of memory on this machine: say so and go on
                print(f"| {label} | {n} | failed: {type(err).__name__} | | | | |", flush=True)
                continue
            atoms = sum(len(s) for s in structures)
            print(f"| {label} | {atoms} | {pairs} | {t_build:.3f} | {t_eval:.4f} | {atoms / t_eval:.3g} | "
                  f"{1e6 * t_eval / atoms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
