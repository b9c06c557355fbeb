"""The SevenNet family on the CPU: kups-relax (JAX) vs sevenn's torch model (ASE calculator, torch-sim), evaluation and relaxation.

    python benchmarks/bench_sevennet.py [--model sevennet-0] [--n 24] [--dtype float32] [--fmax 0.05] [--skin S] [--skip-relax]
        [--optimizers lbfgs fire] [--torch-threads 1] [--torchsim-python /tmp/torchsim-venv/bin/python]
        [--torchsim-check-every 5 1] [--torchsim-neighbor-list default] [--skip-torch-sim] [--keep DIR]

* forces: one batched evaluation (energy, forces, stress) of ``--n`` structures with the engine
  (compiled; compile time reported apart) vs ``sevenn``'s ASE calculator one structure at a
  time, and vs torch-sim 0.6.2's batched ``SevenNetModel`` (``torch_sim.models.sevennet``, which
  re-exports ``sevenn.torchsim.SevenNetModel``), run by benchmarks/torchsim_runner.py
  (``--task evaluate``) in torch-sim's own venv (benchmarks/setup_torchsim_venv.sh; Python >=
  3.12); the energies and forces of each method are checked against the calculator's;
* relax, for each optimizer of ``--optimizers`` (default L-BFGS and FIRE, ASE's defaults):
  ``kups_relax.relax(..., optimizer=...)`` on the same structures (first call, compiling, and a
  second call), ``ase.optimize.LBFGS`` / ``ase.optimize.FIRE`` + sevenn's calculator structure
  by structure (the reference), and torch-sim's batched ``ts.optimize`` with its SevenNetModel
  (benchmarks/torchsim_runner.py: L-BFGS in ASE's mode, alpha 70 and memory 100; FIRE
  ``ase_fire``, which lowers alpha before the velocity mixing where ASE lowers it after; one
  process per optimizer and convergence-check interval K, a first run with
  torch's warm-up and warp's kernels compiled into an empty cache, then a second run; torch-sim
  checks convergence every K = ``--torchsim-check-every`` steps, 5 by default, so rows for
  K = 5 and K = 1); reports the times and the parity: step counts against ASE's same
  optimizer (equal / how many) and final energies per atom. Same fmax, at most 1000 steps.
  Without the torch-sim venv its rows are skipped with a message.

``--model``: one of ``sevennet-0``, ``sevennet-0-22may2024``, ``sevennet-l3i5``,
``sevennet-mf-0:PBE``, ``sevennet-mf-0:R2SCAN`` (our registry names); the reference and torch-sim
run the same checkpoint (and modality) from the sevenn wheel. Besides the wall times, the tables
give atoms/s for an evaluation and, for a relaxation, µs per atom-step: the wall time over
``sum over structures of (steps + 1) x atoms`` (the evaluations ASE makes), the same count for
every method, so the figure says what a useful atom-step costs each of them.

Structures (``relax_structures``): rattled bulk metals, semiconductors and ionic crystals, an
fcc vacancy cell, an fcc(111) slab, oxides (MgO, SrTiO3, rutile TiO2) and molecules in a box;
2 to 31 atoms, all fully periodic (torch-sim has one pbc for a whole batch). Prints the
machine, versions, date, load averages, the commands and markdown tables for
benchmarks/RESULTS.md. Timings on a shared machine are noisy; torch runs with one thread per
process unless ``--torch-threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KUPS_RELAX_COMPILATION_CACHE", "0")
warnings.filterwarnings("ignore")

import ase.io  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, fcc111, molecule  # noqa: E402
from ase.optimize import FIRE, LBFGS  # noqa: E402

from kups_relax import neighbors as nbl  # noqa: E402
from kups_relax import relax  # noqa: E402
from kups_relax.batch import Batch  # noqa: E402
from kups_relax.evaluate import evaluate  # noqa: E402
from potentials import get_potential  # noqa: E402
from potentials.sevennet import SEVENN_MODELS  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64: this script calls the engine's modules directly

HERE = Path(__file__).resolve().parent
MAX_STEPS = 1000
ASE_OPTIMIZERS = {"lbfgs": LBFGS, "fire": FIRE}


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


#: our potential name -> (sevenn's name of the same checkpoint, modality)
MODELS = SEVENN_MODELS


def sevenn_calculator(threads: int, model: str = "sevennet-0"):
    import torch
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(threads)
    name, modal = MODELS[model]
    return SevenNetCalculator(name, device="cpu", modal=modal)


class TorchSim:
    """benchmarks/torchsim_runner.py in torch-sim's venv, one fresh process per call."""

    def __init__(self, python: str, work: Path, threads: int, neighbor_list: str, model: str = "sevennet-0"):
        self.python, self.work, self.threads, self.neighbor_list = python, work, threads, neighbor_list
        self.model = model
        self.commands: list[str] = []
        self.versions = ""

    def available(self) -> bool:
        return Path(self.python).exists()

    def run(self, structures, tag: str, *extra: str) -> tuple[dict, float]:
        source = self.work / "sevennet-structures.traj"  # exact positions (extxyz would round them to 1e-8 A)
        ase.io.write(source, structures, format="traj")  # afresh: a --keep folder may hold another --n
        out = self.work / f"torchsim-{tag}.json"
        sevenn_name, modal = MODELS[self.model]
        cmd = [self.python, str(HERE / "torchsim_runner.py"), str(source), str(out), "--model", "sevennet",
               "--sevennet-model", sevenn_name, *(["--sevennet-modal", modal] if modal else []),
               "--dtype", "float32", "--threads", str(self.threads), "--neighbor-list", self.neighbor_list, *extra]
        warp_cache = self.work / f"warp-cache-{tag}"
        shutil.rmtree(warp_cache, ignore_errors=True)  # the first call compiles warp's kernels (its neighbor list)
        self.commands.append(f"WARP_CACHE_PATH={warp_cache} " + shlex.join(cmd))
        log = self.work / f"torchsim-{tag}.log"
        t = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.work,
                                env=os.environ | {"WARP_CACHE_PATH": str(warp_cache)}).returncode
        wall = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"torch-sim runner failed (exit status {rc}): see {log}")
        data = json.loads(out.read_text())
        self.versions = (f"torch-sim-atomistic {data['torch_sim_version']}, torch {data['torch_version']} "
                         f"({data['threads']} threads), sevenn {data['sevenn_version']}, "
                         f"neighbor list {data['neighbor_list']}")
        return data, wall


def bench_forces(potential, structures, dtype, calc, torchsim: TorchSim | None, repeats=3):
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
    if torchsim is not None:
        try:
            data, _ = torchsim.run(structures, "evaluate", "--task", "evaluate", "--evaluate-repeats", str(repeats))
            ev = data["evaluate"]
            t_ts = ev["wall_per_call"]
            parity["torch-sim"] = (np.abs(np.array(ev["energy"]) - e_ref) / n_atoms).max()
            parity["torch-sim forces"] = np.abs(np.concatenate([np.array(f) for f in ev["forces"]]) - f_ref).max()
        except Exception as err:  # torch-sim is optional; say why it did not run
            print(f"torch-sim skipped: {type(err).__name__}: {err}")
    return t_compile, t_ours, t_ref, t_ts, int(neighbors.n_pairs), neighbors.neighbors.size, parity


def run_ase(structures, calc, fmax, optimizer):
    t = time.perf_counter()
    steps, energies = [], []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = ASE_OPTIMIZERS[optimizer](atoms, logfile=None)
        converged = opt.run(fmax=fmax, steps=MAX_STEPS)
        steps.append(opt.nsteps)
        energies.append((atoms.get_potential_energy(), converged))
    wall = time.perf_counter() - t
    return dict(walls=[wall], steps=np.array(steps), energy=np.array([e for e, _ in energies]),
                converged=np.array([c for _, c in energies]))


def run_ours(potential, named, dtype, fmax, skin, optimizer):
    names = [n for n, _ in named]
    structures = [a for _, a in named]
    options = dict(fmax=fmax, dtype=dtype, names=names, optimizer=optimizer, max_steps=MAX_STEPS)
    options |= {} if skin is None else dict(skin=skin)
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        results = relax(structures, potential, **options)
        walls.append(time.perf_counter() - t)
    return dict(walls=walls, steps=np.array([r.steps for r in results]), energy=np.array([r.energy for r in results]),
                converged=np.array([r.status == "converged" for r in results]))


def run_torchsim(torchsim: TorchSim, structures, fmax, optimizer, check_every):
    data, wall = torchsim.run(structures, f"{optimizer}-k{check_every}", "--optimizer", optimizer,
                              "--check-every", str(check_every), "--fmax", str(fmax), "--max-steps", str(MAX_STEPS),
                              "--repeat", "2")
    run = data["runs"][0]
    return dict(walls=run["wall_s"][:2], steps=np.array(run["steps"]), energy=np.array(run["energy"]),
                converged=np.array(run["fmax"]) < fmax, wall_process=wall, model_load_s=data["model_load_s"])


def bench_relax(potential, named, dtype, calc, fmax, skin, optimizers, torchsim: TorchSim | None, check_every):
    """Rows (label, short label, optimizer, result dict) for every method, and the ASE reference per optimizer."""
    structures = [a for _, a in named]
    refs, rows = {}, []
    for optimizer in optimizers:
        refs[optimizer] = run_ase(structures, calc, fmax, optimizer)
        print(f"ASE {optimizer}: {refs[optimizer]['walls'][0]:.1f} s, {refs[optimizer]['steps'].sum()} steps", flush=True)
        r = run_ours(potential, named, dtype, fmax, skin, optimizer)
        print(f"kups-relax {optimizer}: {r['walls'][0]:.1f} s first, {r['walls'][1]:.1f} s compiled, "
              f"{r['steps'].sum()} steps", flush=True)
        rows.append(("kups-relax (one batch)", "kups-relax", optimizer, r))
        if torchsim is None:
            continue
        for k in check_every:
            try:
                r = run_torchsim(torchsim, structures, fmax, optimizer, k)
            except Exception as err:  # torch-sim is optional; say why it did not run
                print(f"torch-sim {optimizer} skipped: {type(err).__name__}: {err}")
                continue
            print(f"torch-sim {optimizer} (check every {k}): process {r['wall_process']:.1f} s (model built in "
                  f"{r['model_load_s']:.1f} s, not in the inner times); inner "
                  f"{r['walls'][0]:.1f} s first, {r['walls'][1]:.1f} s second, {r['steps'].sum()} steps", flush=True)
            default = ", its default" if k == 5 else ", every step as ASE" if k == 1 else ""
            rows.append((f"torch-sim 0.6.2 (one batch, check every {k}{default})", f"torch-sim K={k}", optimizer, r))
    return refs, rows


def _machine() -> str:
    import platform

    import sevenn
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=HERE).stdout.strip()
    except OSError:
        rev = ""
    return (f"{platform.machine()}, {model}, {os.cpu_count()} CPUs; kups-relax {rev or '?'}, jax {jax.__version__}, "
            f"torch {torch.__version__} and sevenn {sevenn.__version__} (ASE calculator), ase {ase.__version__}; load average "
            f"{_load()}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sevennet-0", choices=list(MODELS), help="default: %(default)s")
    parser.add_argument("--n", type=int, default=24, help="structures (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--skin", type=float, default=None,
                        help="neighbour-list skin for the relaxation, A (default: the engine's)")
    parser.add_argument("--skip-relax", action="store_true")
    parser.add_argument("--optimizers", nargs="+", choices=["lbfgs", "fire"], default=["lbfgs", "fire"],
                        help="relaxation optimizers (default: both)")
    parser.add_argument("--torchsim-python", default="/tmp/torchsim-venv/bin/python",
                        help="python of the torch-sim 0.6.2 venv (benchmarks/setup_torchsim_venv.sh)")
    parser.add_argument("--torchsim-check-every", type=int, nargs="+", default=[5, 1],
                        help="torch-sim's steps_between_swaps, one row each (default: 5, its default, and 1)")
    parser.add_argument("--torchsim-neighbor-list", default="default",
                        help="torchsim_runner.py's --neighbor-list (default: torch-sim's own choice)")
    parser.add_argument("--skip-torch-sim", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="keep torch-sim's inputs, outputs and logs in DIR")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sevennet_"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    potential = get_potential(args.model)
    named = relax_structures(args.n)
    structures = [a for _, a in named]
    n_atoms = sum(len(a) for a in structures)
    calc = sevenn_calculator(args.torch_threads, args.model)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {_machine()}")
    print(f"model {args.model} ({potential.name}); {args.n} structures, {n_atoms} atoms, {args.dtype}, "
          f"torch threads {args.torch_threads} "
          f"(shared machine: noisy)")
    print("command: python benchmarks/bench_sevennet.py " + " ".join(map(shlex.quote, sys.argv[1:])), flush=True)
    torchsim = None
    if args.skip_torch_sim:
        pass
    elif args.dtype != "float32":
        print("torch-sim rows skipped: sevenn's SevenNetModel runs float32 only")
    else:
        torchsim = TorchSim(args.torchsim_python, work, args.torch_threads, args.torchsim_neighbor_list, args.model)
        if not torchsim.available():
            print(f"torch-sim rows skipped: no torch-sim venv at {args.torchsim_python} "
                  f"(run benchmarks/setup_torchsim_venv.sh)")
            torchsim = None

    t_compile, t_ours, t_ref, t_ts, pairs, capacity, parity = bench_forces(potential, structures, args.dtype, calc,
                                                                          torchsim)
    print(f"\nforce evaluation ({pairs} pairs in a {capacity}-pair list; compile {t_compile:.1f} s)\n")
    print("| method | s per evaluation of all | atoms/s | µs per atom | structures/s | ratio (ASE + sevenn time / this) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, t in [(f"kups-relax {potential.name} (JAX, one batch)", t_ours),
                     ("ASE + sevenn calculator (one by one)", t_ref),
                     ("torch-sim 0.6.2 + sevenn SevenNetModel (one batch)", t_ts)]:
        if t is not None:
            print(f"| {label} | {t:.3f} | {n_atoms / t:.0f} | {1e6 * t / n_atoms:.0f} | {args.n / t:.1f} | "
                  f"{t_ref / t:.2f}x |")
    print("\nagainst the calculator: " + "; ".join(
        f"{k} max |dF| {v:.1e} eV/A" if "forces" in k else f"{k} max |dE| {v:.1e} eV/atom" for k, v in parity.items()))

    if not args.skip_relax:
        refs, rows = bench_relax(potential, named, args.dtype, calc, args.fmax, args.skin, args.optimizers, torchsim,
                                 args.torchsim_check_every)
        print_relax(named, args, refs, rows)
    if torchsim is not None and torchsim.commands:
        print(f"\ntorch-sim: {torchsim.versions}; commands:")
        for c in torchsim.commands:
            print(f"    {c}")
    print(f"\nload average at the end: {_load()}")


def print_relax(named, args, refs, rows):
    names = [n for n, _ in named]
    sizes = np.array([len(a) for _, a in named])
    skin = "engine default" if args.skin is None else f"{args.skin} A"
    print(f"\nrelaxation to fmax {args.fmax} eV/A (ASE's defaults; kups-relax skin {skin}; at most {MAX_STEPS} steps)\n")
    print("| method | optimizer | s, first call (compilation / warm-up) | s, again | structures/s (again) | "
          "µs per useful atom-step (again) | steps | same steps as ASE | max abs dE vs ASE, eV/atom | converged | "
          "ratio (ASE time / this, first) | ratio (ASE time / this, again) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    n = len(names)
    for optimizer, ref in refs.items():
        t_ref = ref["walls"][0]
        atom_steps = int(np.sum((ref["steps"] + 1) * sizes))  # the evaluations ASE makes, in atoms
        print(f"| ASE {ASE_OPTIMIZERS[optimizer].__name__} + sevenn calculator (one by one) | "
              f"{optimizer} | {t_ref:.1f} | | {n / t_ref:.2f} | {1e6 * t_ref / atom_steps:.0f} | {ref['steps'].sum()} | "
              f"| 0 | {ref['converged'].sum()}/{n} | 1.00x | 1.00x |")
        for label, short, opt, r in rows:
            if opt != optimizer:
                continue
            same = int(np.sum(r["steps"] == ref["steps"]))
            de = np.abs(r["energy"] - ref["energy"]) / sizes
            print(f"| {label} | {optimizer} | {r['walls'][0]:.1f} | {r['walls'][1]:.1f} | {n / r['walls'][1]:.2f} | "
                  f"{1e6 * r['walls'][1] / atom_steps:.0f} | "
                  f"{r['steps'].sum()} | {same}/{n} | {de.max():.1e} | {r['converged'].sum()}/{n} | "
                  f"{t_ref / r['walls'][0]:.2f}x | {t_ref / r['walls'][1]:.2f}x |")
    # per structure: steps of every method, and |dE| against ASE's same optimizer
    header = ["structure", "atoms"]
    columns = []
    for optimizer, ref in refs.items():
        header.append(f"ASE {optimizer} steps")
        columns.append(ref["steps"].astype(str))
        for label, short, opt, r in rows:
            if opt == optimizer:
                header += [f"{short} {optimizer} steps", f"{short} {optimizer} abs dE eV/atom"]
                columns += [r["steps"].astype(str), [f"{x:.1e}" for x in np.abs(r["energy"] - ref["energy"]) / sizes]]
    print("\n| " + " | ".join(header) + " |")
    print("| --- | " + " | ".join("---:" for _ in header[1:]) + " |")
    for i, name in enumerate(names):
        print(f"| {name} | {sizes[i]} | " + " | ".join(str(c[i]) for c in columns) + " |")
    print()
    for optimizer, ref in refs.items():
        for label, short, opt, r in rows:
            if opt != optimizer:
                continue
            diffs = np.abs(r["steps"] - ref["steps"])
            differing = ", ".join(f"{names[i]} {r['steps'][i]} vs {ref['steps'][i]}" for i in np.flatnonzero(diffs)) \
                or "none"
            print(f"{label}, {optimizer}: same step count {int(np.sum(diffs == 0))}/{n}; largest step difference "
                  f"{diffs.max()}; total steps {r['steps'].sum()} / ASE {ref['steps'].sum()}; largest final energy "
                  f"difference {(np.abs(r['energy'] - ref['energy']) / sizes).max():.1e} eV/atom; converged "
                  f"{r['converged'].sum()}/{n}; differing (this vs ASE): {differing}")


if __name__ == "__main__":
    main()
