"""SevenNet-0 on the CPU: kups-relax (JAX) vs sevenn's torch model, evaluation and relaxation.

    python benchmarks/bench_sevennet.py [--n 24] [--dtype float32] [--fmax 0.05] [--skin S] [--skip-relax]

* forces: one batched evaluation (energy, forces, stress) of ``--n`` structures with the engine
  (compiled; compile time reported apart) vs ``sevenn``'s ASE calculator one structure at a
  time, and vs torch-sim's batched ``SevenNetModel`` (``torch_sim.models.sevennet``) when it loads offline
  (torch-sim 0.3.0 imports ``sevenn.calculator.torch_script_type``, which sevenn 0.13 no longer has:
  it is set to ``torch.jit.ScriptModule`` first, which only serves an ``isinstance`` test there);
  the energies of each method are checked against the calculator's;
* relax: ``kups_relax.relax`` (L-BFGS, ASE's defaults) on the same structures vs
  ``ase.optimize.LBFGS`` + sevenn's calculator, structure by structure; reports both times
  and the parity: step counts (equal / within how many) and final energies per atom.

Structures (``relax_structures``): rattled bulk metals, semiconductors and ionic crystals, an
fcc vacancy cell, an fcc(111) slab, oxides (MgO, SrTiO3, rutile TiO2) and molecules in a box;
2 to 31 atoms. Prints markdown tables for benchmarks/RESULTS.md. Timings on a shared machine
are noisy; torch runs with one thread per process unless ``--torch-threads``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("KUPS_RELAX_COMPILATION_CACHE", "0")
warnings.filterwarnings("ignore")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, fcc111, molecule  # noqa: E402
from ase.optimize import LBFGS  # noqa: E402

from kups_relax import neighbors as nbl  # noqa: E402
from kups_relax import relax  # noqa: E402
from kups_relax.batch import Batch  # noqa: E402
from kups_relax.evaluate import evaluate  # noqa: E402
from potentials import get_potential  # noqa: E402


def _rattle(atoms: Atoms, seed: int, amount: float = 0.1) -> Atoms:
    atoms = atoms.copy()
    atoms.rattle(amount, seed=seed)
    return atoms


def _boxed(name: str, box: float) -> Atoms:
    m = molecule(name)
    m.set_cell([box, box, box])
    m.center()
    m.pbc = True
    return m


def relax_structures(n: int) -> list[tuple[str, Atoms]]:
    """``n`` named structures (cycling through the set below with new rattles)."""
    rutile = Atoms("Ti2O4", cell=[4.59, 4.59, 2.96], pbc=True,
                   scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.305, 0.305, 0), (0.695, 0.695, 0),
                                     (0.805, 0.195, 0.5), (0.195, 0.805, 0.5)])
    srtio3 = Atoms("SrTiO3", cell=[3.9, 3.9, 3.9], pbc=True,
                   scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)])
    vacancy = bulk("Cu", "fcc", a=3.63, cubic=True) * (2, 2, 2)
    del vacancy[0]
    slab = fcc111("Pt", size=(2, 2, 3), a=3.97, vacuum=6.0)
    slab.pbc = True  # 12 A of vacuum between images (> 5 A cutoff); torch-sim wants one pbc for all
    base = [
        ("Cu-fcc", bulk("Cu", "fcc", a=3.63, cubic=True)),
        ("Al-fcc", bulk("Al", "fcc", a=4.04, cubic=True)),
        ("Fe-bcc", bulk("Fe", "bcc", a=2.84, cubic=True) * (2, 1, 1)),
        ("W-bcc", bulk("W", "bcc", a=3.18, cubic=True)),
        ("Mg-hcp", bulk("Mg", "hcp", a=3.2, c=5.2) * (1, 1, 2)),
        ("Si-diamond", bulk("Si", "diamond", a=5.47, cubic=True)),
        ("GaAs-zincblende", bulk("GaAs", "zincblende", a=5.75, cubic=True)),
        ("NaCl-rocksalt", bulk("NaCl", "rocksalt", a=5.7, cubic=True)),
        ("MgO-rocksalt", bulk("MgO", "rocksalt", a=4.25, cubic=True)),
        ("SrTiO3-perovskite", srtio3),
        ("TiO2-rutile", rutile),
        ("Cu-vacancy", vacancy),
        ("Pt111-slab", slab),
        ("H2O-in-box", _boxed("H2O", 8.0)),
        ("CH4-in-box", _boxed("CH4", 8.0)),
        ("NH3-in-box", _boxed("NH3", 8.0)),
    ]
    out = []
    for k in range(n):
        name, atoms = base[k % len(base)]
        amount = 0.03 if "box" in name else 0.1
        out.append((f"{name}-{k}", _rattle(atoms, seed=100 + k, amount=amount)))
    return out


def sevenn_calculator(threads: int):
    import torch
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(threads)
    return SevenNetCalculator("7net-0", device="cpu")


def bench_forces(potential, structures, dtype, calc, repeats=3):
    batch = Batch.from_atoms(structures, dtype=dtype)
    neighbors = nbl.allocate(batch.geometry, potential.cutoff, 0.0)
    fn = jax.jit(lambda p, g, n: evaluate(p, g, n, True))
    t = time.perf_counter()
    compiled = fn.lower(potential, batch.geometry, neighbors).compile()
    t_compile = time.perf_counter() - t
    jax.block_until_ready(compiled(potential, batch.geometry, neighbors))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(potential, batch.geometry, neighbors))
    t_ours = (time.perf_counter() - t) / repeats
    ours = jax.device_get(compiled(potential, batch.geometry, neighbors))
    n_atoms = np.array([len(a) for a in structures])
    first = np.asarray(batch.geometry.first_atom)[:len(structures)]
    t = time.perf_counter()
    reference = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        reference.append((atoms.get_potential_energy(), atoms.get_forces()))
        atoms.get_stress()
    t_ref = time.perf_counter() - t
    e_ref = np.array([e for e, _ in reference])
    f_ref = np.concatenate([f for _, f in reference])
    f_ours = np.concatenate([np.asarray(ours.forces[f:f + n], np.float64) for f, n in zip(first, n_atoms)])
    parity = {"kups-relax": (np.abs(np.asarray(ours.energy[:len(structures)], np.float64) - e_ref) / n_atoms).max(),
              "kups-relax forces": np.abs(f_ours - f_ref).max()}
    t_ts = None
    try:
        import sevenn.calculator
        import sevenn.util
        import torch

        if not hasattr(sevenn.calculator, "torch_script_type"):  # removed in sevenn 0.13; see the docstring
            sevenn.calculator.torch_script_type = torch.jit.ScriptModule
        import torch_sim as ts
        from torch_sim.models.sevennet import SevenNetModel

        net = sevenn.util.load_checkpoint("7net-0").build_model()
        model = SevenNetModel(net, device="cpu", dtype=torch.float32)
        state = ts.io.atoms_to_state(structures, torch.device("cpu"), torch.float32)
        out = model(state)
        t = time.perf_counter()
        for _ in range(repeats):
            model(state)
        t_ts = (time.perf_counter() - t) / repeats
        parity["torch-sim"] = (np.abs(out["energy"].double().numpy() - e_ref) / n_atoms).max()
        parity["torch-sim forces"] = np.abs(out["forces"].double().numpy() - f_ref).max()
    except Exception as err:  # torch-sim is optional; say why it did not run
        print(f"torch-sim skipped: {type(err).__name__}: {err}")
    return t_compile, t_ours, t_ref, t_ts, int(neighbors.n_pairs), neighbors.capacity, parity


def bench_relax(potential, named, dtype, calc, fmax, skin):
    names = [n for n, _ in named]
    structures = [a for _, a in named]
    options = dict(fmax=fmax, dtype=dtype, names=names) | ({} if skin is None else dict(skin=skin))
    t = time.perf_counter()
    relax(structures, potential, **options)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    ours = relax(structures, potential, **options)
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    theirs = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = LBFGS(atoms, logfile=None)
        opt.run(fmax=fmax, steps=1000)
        theirs.append((opt.nsteps, atoms.get_potential_energy()))
    t_ref = time.perf_counter() - t
    rows = []
    for name, atoms, r, (steps, energy) in zip(names, structures, ours, theirs):
        rows.append((name, len(atoms), r.steps, steps, abs(r.energy - energy) / len(atoms), r.status))
    return t_cold, t_warm, t_ref, rows


def _machine() -> str:
    import platform
    import subprocess

    import sevenn
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return (f"{model}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__}, "
            f"sevenn {sevenn.__version__}; load average {_load()}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="structures (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--skin", type=float, default=None,
                        help="neighbour-list skin for the relaxation, A (default: the engine's)")
    parser.add_argument("--skip-relax", action="store_true")
    args = parser.parse_args()
    potential = get_potential("sevennet-0")
    named = relax_structures(args.n)
    structures = [a for _, a in named]
    n_atoms = sum(len(a) for a in structures)
    calc = sevenn_calculator(args.torch_threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {_machine()}")
    print(f"{args.n} structures, {n_atoms} atoms, {args.dtype}, torch threads {args.torch_threads} "
          f"(shared machine: noisy)")

    t_compile, t_ours, t_ref, t_ts, pairs, capacity, parity = bench_forces(potential, structures, args.dtype, calc)
    print(f"\nforce evaluation ({pairs} pairs in a {capacity}-pair list; compile {t_compile:.1f} s)\n")
    print("| method | s per evaluation of all | atoms/s | structures/s | ratio (ASE + sevenn time / this) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, t in [("kups-relax SevenNet-0 (JAX, one batch)", t_ours),
                     ("ASE + sevenn calculator (one by one)", t_ref),
                     ("torch-sim + sevenn SevenNetModel (one batch)", t_ts)]:
        if t is not None:
            print(f"| {label} | {t:.3f} | {n_atoms / t:.0f} | {args.n / t:.1f} | {t_ref / t:.2f}x |")
    print("\nagainst the calculator: " + "; ".join(
        f"{k} max |dF| {v:.1e} eV/A" if "forces" in k else f"{k} max |dE| {v:.1e} eV/atom" for k, v in parity.items()))

    if args.skip_relax:
        print(f"\nload average at the end: {_load()}")
        return
    t_cold, t_warm, t_ref, rows = bench_relax(potential, named, args.dtype, calc, args.fmax, args.skin)
    skin = "engine default" if args.skin is None else f"{args.skin} A"
    print(f"\nrelaxation to fmax {args.fmax} eV/A (L-BFGS, ASE defaults; skin {skin})\n")
    steps_ours, steps_ase = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print("| method | s | structures/s | steps | ratio (ASE time / this) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| kups-relax incl. compilation (one batch) | {t_cold:.1f} | {args.n / t_cold:.2f} | {steps_ours} "
          f"| {t_ref / t_cold:.2f}x |")
    print(f"| kups-relax compiled (one batch) | {t_warm:.1f} | {args.n / t_warm:.2f} | {steps_ours} "
          f"| {t_ref / t_warm:.2f}x |")
    print(f"| ASE LBFGS + sevenn calculator (one by one) | {t_ref:.1f} | {args.n / t_ref:.2f} | {steps_ase} | 1.00x |")
    print("\n| structure | atoms | steps ours | steps ASE | abs dE eV/atom | status |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, n, s_ours, s_ase, de, status in rows:
        print(f"| {name} | {n} | {s_ours} | {s_ase} | {de:.1e} | {status} |")
    diffs = np.array([abs(r[2] - r[3]) for r in rows])
    worst_de = max(r[4] for r in rows)
    differing = ", ".join(f"{r[0]} {r[2]} vs {r[3]}" for r in rows if r[2] != r[3]) or "none"
    print(f"\nsame step count: {int(np.sum(diffs == 0))}/{len(rows)}; largest step difference {diffs.max()}; "
          f"total steps ours {steps_ours} / ASE {steps_ase}; largest final energy difference {worst_de:.1e} eV/atom; "
          f"converged {sum(r[5] == 'converged' for r in rows)}/{len(rows)}")
    print(f"differing step counts (ours vs ASE): {differing}")
    print(f"\nload average at the end: {_load()}")


if __name__ == "__main__":
    main()
