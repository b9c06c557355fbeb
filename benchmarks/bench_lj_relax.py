"""Relax a few hundred Lennard-Jones structures: kups-relax (one batch) vs ASE's LBFGS one at a time.

    python benchmarks/bench_lj_relax.py [--n 300] [--fmax 0.01]

Prints wall times (engine with and without compilation), total steps and the ratio.
Both sides use float64 and the same structures; the engine's answers are checked
against ASE's (same step counts) so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from ase.calculators.lj import LennardJones as AseLJ
from ase.optimize import LBFGS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from structures import LJ_PARAMS, lj_structures  # noqa: E402

from kups_relax import enable_compilation_cache, relax  # noqa: E402
from potentials import LennardJones  # noqa: E402

if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
    enable_compilation_cache()  # as relax-batch does


def workload(n: int):
    """``n`` structures: the 30 test structures re-rattled with different seeds."""
    base = lj_structures()
    out = []
    for k in range(n):
        name, atoms = base[k % len(base)]
        atoms = atoms.copy()
        atoms.rattle(0.05, seed=1000 + k)
        out.append((f"{name}-{k}", atoms))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--fmax", type=float, default=0.01)
    parser.add_argument("--ase-limit", type=int, default=None, help="time ASE on only this many (extrapolated)")
    args = parser.parse_args()
    structures = workload(args.n)
    atoms_list = [a for _, a in structures]
    potential = LennardJones(**LJ_PARAMS)
    print(f"{args.n} LJ structures, {sum(len(a) for a in atoms_list)} atoms, fmax {args.fmax}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")

    t = time.perf_counter()
    cold = relax(atoms_list, potential, fmax=args.fmax, max_steps=1000)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm = relax(atoms_list, potential, fmax=args.fmax, max_steps=1000)
    t_warm = time.perf_counter() - t
    steps_engine = sum(r.steps for r in warm)
    assert [r.steps for r in cold] == [r.steps for r in warm]

    n_ase = args.ase_limit or args.n
    t = time.perf_counter()
    steps_ase = []
    for atoms in atoms_list[:n_ase]:
        atoms = atoms.copy()
        atoms.calc = AseLJ(**LJ_PARAMS)
        opt = LBFGS(atoms, logfile=None)
        opt.run(fmax=args.fmax, steps=1000)
        steps_ase.append(opt.nsteps)
    t_ase = (time.perf_counter() - t) * args.n / n_ase
    same = sum(a == r.steps for a, r in zip(steps_ase, warm))

    print(f"engine, with compilation : {t_cold:8.2f} s")
    print(f"engine, compiled         : {t_warm:8.2f} s   ({steps_engine} steps in total)")
    print(f"ASE LBFGS one at a time  : {t_ase:8.2f} s   ({sum(steps_ase)} steps on {n_ase} structures"
          f"{'' if n_ase == args.n else ', extrapolated'}; same step count on {same}/{n_ase})")
    print(f"speed-up: {t_ase / t_cold:.1f}x with compilation, {t_ase / t_warm:.1f}x compiled")


if __name__ == "__main__":
    main()
