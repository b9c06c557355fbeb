"""One EMT (and EAM) force evaluation: kups-relax (JAX, jitted, float64) against ASE (numpy) and asap3's EMT (C++).

For every case the same structures go to every engine. Timed: energy + forces of
structures whose neighbor list is already built (ours: ``kups_relax.neighbors.allocate``
before the clock starts, ``evaluate(..., compute_stress=False)``, all structures of a
case in one batch; ASE/asap3: structure by structure, one warm-up call, then positions
moved by 1e-6 Å so each timed call recomputes but keeps its list; ASE's EMT always
computes the virial too, a small part of its cost). Reported: best-of-``--repeat`` wall time,
atoms per second, and our speed-up over theirs (their time / ours).

asap3 is used when importable (``pip install asap3``); its EMT follows ASE's
``asap_cutoff=True`` conventions, so it is compared with ``EMT(asap_cutoff=True)``
and the largest energy difference per atom is printed alongside. asap3 has no EAM, so EAM
(``--eam``: a Cu/Ag/Ni ``.eam.alloy`` file of smooth analytic functions, the tests' writer)
is compared with ASE's ``EAM`` calculator only. Our programs are compiled as the engine
compiles them (``kups_relax.executables.compiler_options``), with each system's own cutoff
(``system_cutoffs``).

Usage::

    python benchmarks/bench_emt_forces.py                 # 256, 1k, 4k fcc Cu and 64 mixed structures
    python benchmarks/bench_emt_forces.py --sizes 4 6 --repeat 3 --eam
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import time
import warnings

import jax
import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron, Octahedron

import kups_relax
from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from kups_relax.executables import compiler_options
from kups_relax.loop import system_cutoffs
from potentials.emt import EMT

jax.config.update("jax_enable_x64", True)  # float64: this script calls the engine's modules directly
if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
    kups_relax.enable_compilation_cache()  # as relax-batch does

try:
    import asap3
except ImportError:  # optional
    asap3 = None
else:  # asap3 warns about the heights of non-periodic cell directions; harmless here
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="asap3")

METALS = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]

def cu_supercell(reps: tuple[int, int, int]) -> Atoms:
    a = bulk("Cu", "fcc", a=3.61, cubic=True) * reps
    a.rattle(0.02, seed=1)
    return a


def mixed_structures(n: int = 64) -> list[Atoms]:
    """``n`` mixed structures (alloys with vacancies, slabs, clusters), 13 to ~150 atoms."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            a = bulk("Cu", "fcc", a=3.8, cubic=True) * (2, 2, 2 + k % 3)
            a.symbols = list(rng.choice(METALS, size=len(a)))
            del a[[0]]
        elif kind == 1:
            a = (fcc111 if k % 8 == 1 else fcc100)(METALS[k % 7], size=(3, 3, 4), vacuum=6.0)
        elif kind == 2:
            a = Icosahedron(METALS[k % 7], 2 + k % 3)
        else:
            a = Octahedron(METALS[k % 7], 4, 1)
            a.symbols = list(rng.choice(METALS[:3], size=len(a)))
        a.rattle(0.03, seed=k)
        if not a.pbc.any():
            a.center(vacuum=6.0)  # asap3 needs a cell even for a cluster (pbc stays False)
        out.append(a)
    return out


def time_ours(structures: list[Atoms], potential, repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time of one batched energy + forces evaluation, and the energies."""
    batch = Batch.from_atoms(structures)
    geometry = batch.geometry
    cutoffs = jax.jit(system_cutoffs, static_argnums=2)(potential, geometry, float(potential.cutoff))
    neighbors = nl.allocate(geometry, potential.cutoff, skin=0.0, cutoffs=cutoffs)
    run = jax.jit(functools.partial(evaluate, compute_stress=False)).lower(potential, geometry, neighbors).compile(
        compiler_options=compiler_options())
    energies = np.asarray(run(potential, geometry, neighbors).energy)[: len(structures)]  # warm-up
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(run(potential, geometry, neighbors))
        best = min(best, time.perf_counter() - t0)
    return best, energies


def time_calculator(structures: list[Atoms], make_calc, repeat: int) -> tuple[float, list[float]]:
    """Best wall time of one energy+forces call per structure (summed), and the energies."""
    copies = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = make_calc()
        atoms.get_forces()  # builds the calculator's neighbor list
        copies.append(atoms)
    best = np.inf
    for r in range(repeat):
        total = 0.0
        for atoms in copies:
            atoms.positions[0, 0] += 1e-6 * (-1) ** r  # forces a recompute, the list stays valid
            t0 = time.perf_counter()
            atoms.get_forces()
            total += time.perf_counter() - t0
        best = min(best, total)
    return best, [a.get_potential_energy() for a in copies]


def fmt_rate(n_atoms: int, seconds: float) -> str:
    return f"{n_atoms / seconds:12.3e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 10],
                        help="fcc Cu supercells of n x n x n cubic cells (4 atoms each); 6 -> 6x6x7")
    parser.add_argument("--mixed", type=int, default=64, help="structures in the mixed batch (0: none)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (best is reported)")
    parser.add_argument("--eam", action="store_true", help="also EAM (Cu/Ag/Ni setfl) against ASE's EAM")
    args = parser.parse_args()

    cases: list[tuple[str, list[Atoms]]] = []
    for n in args.sizes:
        reps = (n, n, n + 1) if n == 6 else (n, n, n)  # 6x6x7 = 1008 atoms ("1k")
        cases.append((f"fcc Cu {4 * int(np.prod(reps))}", [cu_supercell(reps)]))
    if args.mixed:
        cases.append((f"{args.mixed} mixed structures", mixed_structures(args.mixed)))

    print(f"# EMT force evaluation, {datetime.date.today()}, {platform.node()}, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, float64")
    print(f"# asap3: {asap3.__version__ if asap3 else 'not installed'}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| case | atoms | mode | ours s | ours µs/atom | ASE s | ASE µs/atom | vs ASE | asap3 s | asap3 µs/atom "
          "| vs asap3 | max dE/atom vs asap3 |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    us = lambda t, n: f"{1e6 * t / n:.2f}"  # noqa: E731
    for label, structures in cases:
        n_atoms = sum(len(a) for a in structures)
        for asap_cutoff in (False, True):
            if asap_cutoff and not asap3:
                continue
            potential = EMT(asap_cutoff=asap_cutoff)
            ours, ours_e = time_ours(structures, potential, args.repeat)
            ase_s, ase_e = time_calculator(structures, lambda: AseEMT(asap_cutoff=asap_cutoff), args.repeat)
            line = (f"| {label} | {n_atoms} | {'asap' if asap_cutoff else 'default'} | {ours:.4f} | {us(ours, n_atoms)} "
                    f"| {ase_s:.4f} | {us(ase_s, n_atoms)} | {ase_s / ours:.1f}x |")
            if asap_cutoff:
                asap_s, asap_e = time_calculator(structures, asap3.EMT, args.repeat)
                diff = max(abs(a - b) / len(s) for a, b, s in zip(ours_e, asap_e, structures))
                line += f" {asap_s:.4f} | {us(asap_s, n_atoms)} | **{asap_s / ours:.2f}x** | {diff:.1e} |"
            else:
                line += " | | | |"
            print(line, flush=True)
    if args.eam:
        eam_cases(cases, args.repeat, us)


def eam_cases(cases, repeat: int, us) -> None:
    """EAM (a Cu/Ag/Ni setfl file of the tests' analytic functions) against ASE's EAM calculator."""
    import sys
    import tempfile
    from pathlib import Path

    from ase.calculators.eam import EAM as AseEAM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_eam import write_eam  # noqa: E402  (the tests' file writer: smooth analytic tables)

    from potentials import EAM

    folder = Path(tempfile.mkdtemp())
    path = folder / "CuAgNi.eam.alloy"
    write_eam(path, ("Cu", "Ag", "Ni"), "alloy")
    potential = EAM.from_file(path)
    rng = np.random.default_rng(3)
    print("\n| EAM case | atoms | ours s | ours µs/atom | ASE s | ASE µs/atom | vs ASE | max dE/atom vs ASE |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, structures in cases:
        alloyed = []
        for a in structures:
            a = a.copy()
            a.symbols = list(rng.choice(["Cu", "Ag", "Ni"], size=len(a)))
            alloyed.append(a)
        n_atoms = sum(len(a) for a in alloyed)
        ours, ours_e = time_ours(alloyed, potential, repeat)
        ase_s, ase_e = time_calculator(alloyed, lambda: AseEAM(potential=str(path)), max(1, repeat // 2))
        diff = max(abs(a - b) / len(s) for a, b, s in zip(ours_e, ase_e, alloyed))
        print(f"| {label} (Cu/Ag/Ni) | {n_atoms} | {ours:.4f} | {us(ours, n_atoms)} | {ase_s:.4f} | "
              f"{us(ase_s, n_atoms)} | {ase_s / ours:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
