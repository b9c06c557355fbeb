"""Relax mixed metal structures with EMT: kups-relax vs ASE's LBFGS + ASE's EMT, and vs ASE's LBFGS + asap3's EMT.

    python benchmarks/bench_emt_relax.py [--n 64] [--fmax 0.05]

Same structures (benchmarks/bench_emt_forces.py's mixed set: alloys with a vacancy, fcc111/fcc100
slabs, icosahedra, truncated octahedra; 13 to ~150 atoms), same fmax, float64, one process.
The engine runs once with compilation and once compiled (both in-process: the persistent
compilation cache is disabled here so the first figure includes compiling). asap3's EMT follows
ASE's ``asap_cutoff=True`` conventions, so it is compared with the engine's EMT in that mode.
ASE is run on ``--ase-limit`` structures and extrapolated when given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KUPS_RELAX_COMPILATION_CACHE", "0")

from ase.calculators.emt import EMT as AseEMT  # noqa: E402
from ase.optimize import LBFGS  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_emt_forces import mixed_structures  # noqa: E402

from kups_relax import relax  # noqa: E402
from potentials import EMT  # noqa: E402


def run_ase(structures, make_calc, fmax, limit):
    steps = []
    t = time.perf_counter()
    for atoms in structures[:limit]:
        atoms = atoms.copy()
        atoms.calc = make_calc()
        opt = LBFGS(atoms, logfile=None)
        opt.run(fmax=fmax, steps=2000)
        steps.append(opt.nsteps)
    return (time.perf_counter() - t) * len(structures) / limit, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--ase-limit", type=int, default=None)
    args = parser.parse_args()
    structures = mixed_structures(args.n)
    limit = args.ase_limit or args.n
    print(f"{args.n} structures, {sum(len(a) for a in structures)} atoms, fmax {args.fmax} eV/A, {os.cpu_count()} cores")
    rows = []
    for mode, asap in [("default", False), ("asap_cutoff", True)]:
        potential = EMT(asap_cutoff=asap)
        t = time.perf_counter()
        first = relax(structures, potential, fmax=args.fmax, max_steps=2000)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        again = relax(structures, potential, fmax=args.fmax, max_steps=2000)
        t_warm = time.perf_counter() - t
        assert [r.steps for r in first] == [r.steps for r in again]
        if asap:
            try:
                from asap3 import EMT as AsapEMT
            except ImportError:
                print("asap3 not installed: pip install asap3")
                continue
            t_ref, steps = run_ase(structures, AsapEMT, args.fmax, limit)
            ref = "ASE LBFGS + asap3 EMT"
        else:
            t_ref, steps = run_ase(structures, AseEMT, args.fmax, limit)
            ref = "ASE LBFGS + ASE EMT"
        same = sum(s == r.steps for s, r in zip(steps, again))
        rows.append((mode, t_cold, t_warm, ref, t_ref, sum(r.steps for r in again), sum(steps), same, len(steps)))
    print("| EMT mode | engine incl. compile s | engine compiled s | reference | reference s | ratio incl. compile | ratio compiled | steps ours / theirs | same step count |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    for mode, tc, tw, ref, tr, so, st, same, n in rows:
        print(f"| {mode} | {tc:.2f} | {tw:.2f} | {ref} | {tr:.2f} | {tr / tc:.2f}x | {tr / tw:.2f}x | {so} / {st} | {same}/{n} |")


if __name__ == "__main__":
    main()
