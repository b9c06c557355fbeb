"""Lennard-Jones relaxation side by side: kups-relax vs kups vs torch-sim (and ASE's LBFGS/FIRE as the reference answers).

    python benchmarks/bench_lj_alternatives.py [--n 300] [--fmax 0.01] [--kups-python /tmp/kups-venv/bin/python]
        [--torchsim-python /tmp/torchsim-venv/bin/python] [--torchsim-check-every 5 1] [--torch-threads N]
        [--torchsim-neighbor-list default|torch_n2|torch_linked_cell|vesin|...]
        [--skip-kups] [--skip-torch-sim] [--skip-ase] [--keep DIR]

Structures: bench_lj_relax.py's set (the 30 test structures re-rattled), as rewritten by
lj_workload.py so that kups can batch them (mixed periodicity -> the same physics in a fully
periodic cell with vacuum; clusters get a box). Ar-like LJ, sigma 3.4 Å, epsilon 0.0104 eV,
cutoff 8.5 Å, no smoothing (forces of all four codes are the same function; energies differ by
ASE's constant shift per pair, so every final geometry is re-evaluated with ASE's LennardJones
for the energy comparison). fmax 0.01 eV/Å, at most 1000 steps, float64, all engines on the
same structures.

Engines, all on this machine:

* kups-relax: ``kups_relax.relax`` (one call for all structures), ``"lbfgs"`` (ASE's LBFGS)
  and ``"fire"`` (ASE's FIRE). First call in the process (compiling; the persistent cache is
  off for this script) and a second call (compiled).
* kups (``pip install kups``, Python >= 3.12, benchmarks/setup_kups_venv.sh): its relax
  application's code path (benchmarks/kups_lj_runner.py) in a subprocess of its venv; one
  batch per periodicity (kups cannot mix them in one batch); L-BFGS with ASE's defaults and
  FIRE. Timed: the subprocess from start to exit, and inside it a first run (compiling, with
  an empty persistent cache as kups' own app enables one) and a second run (cache hits).
  kups stops a batch when its largest force is below fmax, so every structure takes as
  many steps as the slowest one of its batch.
* torch-sim (``torch-sim-atomistic`` 0.6.2, Python >= 3.12, benchmarks/setup_torchsim_venv.sh):
  benchmarks/torchsim_runner.py in a subprocess of its venv, one process per optimizer and
  convergence-check interval, each with an empty warp kernel cache (``WARP_CACHE_PATH``; its
  default neighbor list is warp's ``alchemiops_nl_n2``, which compiles kernels on first use).
  ``ts.optimize`` with ``LennardJonesModel`` (half neighbor list, autograd forces: equal to
  ASE's LennardJones forces to 1e-15 eV/Å, also in triclinic and small cells; the 0.3.0 defects,
  doubled forces and a transposed cell, are gone, so no correction is applied) and
  ``ts.optimizers.lbfgs_init/lbfgs_step`` in ASE's mode (``alpha=70`` fixed H0, memory
  ``max_history=100``, ``max_step=0.2``; torch-sim's own defaults are a dynamic H0 and memory
  20) or ``fire_init/fire_step`` (``ase_fire`` flavour, ASE's numbers; it lowers alpha before
  the velocity mixing where ASE lowers it after, so longer FIRE paths drift from ASE's: see
  torchsim_runner.py), convergence = largest per-atom force below fmax, one ``ts.optimize``
  call per periodicity (a SimState has one pbc for all its systems), every structure in the
  batch from the start. torch-sim checks
  convergence every ``steps_between_swaps`` steps (5 by default): rows for each K in
  ``--torchsim-check-every`` (default 5, its default, and 1, every step like ASE). A first run
  in the process (warm-up, warp kernels compiled) and a second run; the whole subprocess in
  the notes. torch runs with one thread (``--torch-threads``): with torch's default of 2 on the
  shared 2-CPU machine one LJ evaluation of these small batches took 15-30x longer (thread
  contention). Missing venv: the torch-sim rows are skipped with a message.
* ASE: ``ase.optimize.LBFGS`` and ``ase.optimize.FIRE`` + ``ase.calculators.lj.LennardJones``,
  one structure at a time: the references for step counts and energies (each optimizer
  against ASE's same algorithm: FIRE and L-BFGS may end in different local minima).

Prints the machine, versions, date, load averages, the commands, and one markdown table:
wall times with and without compilation / warm-up, force evaluations (structure-steps), step
agreement with the reference, the largest final energy difference per atom against ASE's
minimum of the same optimizer, and ratios (their time / kups-relax's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KUPS_RELAX_COMPILATION_CACHE", "0")  # so the first call includes compiling

import ase  # noqa: E402
import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.lj import LennardJones as AseLJ  # noqa: E402
from ase.optimize import LBFGS  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lj_workload import LJ_PARAMS, lj_workload  # noqa: E402

MAX_STEPS = 1000


def ase_energy(atoms: Atoms) -> float:
    a = atoms.copy()
    a.calc = AseLJ(**LJ_PARAMS)
    return float(a.get_potential_energy())


def run_ase(structures, fmax, optimizer="lbfgs"):
    from ase.optimize import FIRE

    t = time.perf_counter()
    steps, energies = [], []
    for atoms in structures:
        a = atoms.copy()
        a.calc = AseLJ(**LJ_PARAMS)
        opt = (LBFGS if optimizer == "lbfgs" else FIRE)(a, logfile=None)
        opt.run(fmax=fmax, steps=MAX_STEPS)
        steps.append(opt.nsteps)
        energies.append(a.get_potential_energy())
    return time.perf_counter() - t, np.array(steps), np.array(energies)


def run_engine(structures, fmax, optimizer):
    from kups_relax import relax
    from potentials import LennardJones

    potential = LennardJones(**LJ_PARAMS)
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        results = relax(structures, potential, fmax=fmax, max_steps=MAX_STEPS, optimizer=optimizer)
        walls.append(time.perf_counter() - t)
    finals = []
    for atoms, r in zip(structures, results):
        a = atoms.copy()
        a.positions = r.atoms.positions
        finals.append(a)
    return dict(walls=walls, steps=np.array([r.steps for r in results]),
                converged=np.array([r.converged for r in results]), finals=finals)


def periodicity_groups(structures) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(structures):
        key = "periodic" if a.pbc.all() else "non-periodic"
        groups.setdefault(key, []).append(i)
    return groups


def run_torch_sim(structures, fmax, python, optimizer, check_every, work: Path, threads: int = 0,
                  neighbor_list: str = "default"):
    """torch-sim 0.6.2 through benchmarks/torchsim_runner.py in its own venv (one fresh process)."""
    source = work / "lj-all.traj"  # ASE's trajectory keeps float64 positions exactly (extxyz rounds to 1e-8 A)
    ase.io.write(source, structures, format="traj")  # afresh: a --keep folder may hold another --n
    out = work / f"torchsim-{optimizer}-k{check_every}.json"
    cmd = [python, str(HERE / "torchsim_runner.py"), str(source), str(out), "--model", "lj",
           "--sigma", str(LJ_PARAMS["sigma"]), "--epsilon", str(LJ_PARAMS["epsilon"]), "--rc", str(LJ_PARAMS["rc"]),
           "--dtype", "float64", "--optimizer", optimizer, "--check-every", str(check_every),
           "--fmax", str(fmax), "--max-steps", str(MAX_STEPS), "--repeat", "2", "--threads", str(threads),
           "--neighbor-list", neighbor_list]
    warp_cache = work / f"warp-cache-{optimizer}-k{check_every}"
    shutil.rmtree(warp_cache, ignore_errors=True)  # the first run compiles warp's kernels, as kups-relax's compiles
    log = work / f"torchsim-{optimizer}-k{check_every}.log"
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work,
                            env=os.environ | {"WARP_CACHE_PATH": str(warp_cache)}).returncode
    wall_process = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"torch-sim failed (exit status {rc}): see {log}")
    data = json.loads(out.read_text())
    run = data["runs"][0]
    finals = []
    for atoms, positions in zip(structures, run["positions"]):
        a = atoms.copy()
        a.positions = positions
        finals.append(a)
    return dict(walls=run["wall_s"][:2], wall_process=wall_process, steps=np.array(run["steps"]), finals=finals,
                fmax=np.array(run["fmax"]), model_load_s=data["model_load_s"],
                command=f"WARP_CACHE_PATH={warp_cache} " + shlex.join(cmd),
                versions=f"torch-sim-atomistic {data['torch_sim_version']}, torch {data['torch_version']} "
                         f"({data['threads']} threads), neighbor list {data['neighbor_list']}")


def run_kups(structures, fmax, python, optimizer, work: Path):
    walls_inner = np.zeros(2)
    wall_process = 0.0
    iterations = {}
    finals: list[Atoms | None] = [None] * len(structures)
    steps = np.zeros(len(structures), int)
    fmaxes = np.zeros(len(structures))
    commands = []
    for name, indices in periodicity_groups(structures).items():
        source = work / f"lj-{name}.extxyz"
        ase.io.write(source, [structures[i] for i in indices], format="extxyz")
        out = work / f"kups-{optimizer}-{name}.json"
        cmd = [python, str(HERE / "kups_lj_runner.py"), str(source), str(out), "--optimizer", optimizer,
               "--sigma", str(LJ_PARAMS["sigma"]), "--epsilon", str(LJ_PARAMS["epsilon"]), "--rc", str(LJ_PARAMS["rc"]),
               "--fmax", str(fmax), "--max-steps", str(MAX_STEPS), "--cache-dir", str(work / f"jax-cache-{optimizer}-{name}")]
        commands.append(shlex.join(cmd))
        t = time.perf_counter()
        log = work / f"kups-{optimizer}-{name}.log"
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work).returncode
        wall_process += time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"kups failed (exit status {rc}): see {log}")
        data = json.loads(out.read_text())
        walls_inner += np.array(data["wall_s"][:2])
        iterations[name] = data["iterations"]
        for i, system in zip(indices, data["systems"]):
            a = Atoms(structures[i].numbers, positions=system["positions"], cell=system["cell"], pbc=system["pbc"])
            finals[i] = a
            steps[i] = data["iterations"]
            fmaxes[i] = system["fmax"]
    return dict(walls=list(walls_inner), wall_process=wall_process, steps=steps, finals=finals,
                iterations=iterations, fmax=fmaxes, commands=commands)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{platform.machine()}, {model}, {os.cpu_count()} CPUs"


def _versions() -> str:
    import jax

    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=HERE).stdout.strip()
    except OSError:
        rev = "?"
    return f"kups-relax {rev or '?'}, jax {jax.__version__}, ase {ase.__version__}, numpy {np.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--fmax", type=float, default=0.01)
    parser.add_argument("--kups-python", default="/tmp/kups-venv/bin/python")
    parser.add_argument("--torchsim-python", default="/tmp/torchsim-venv/bin/python",
                        help="python of the torch-sim 0.6.2 venv (benchmarks/setup_torchsim_venv.sh)")
    parser.add_argument("--torchsim-check-every", type=int, nargs="+", default=[5, 1],
                        help="torch-sim's steps_between_swaps, one row each (default: 5, its default, and 1)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads for torch-sim (default 1; 0: torch's default, 2 here, which on this "
                             "shared 2-CPU machine made an LJ evaluation of these small batches 15-30x slower)")
    parser.add_argument("--torchsim-neighbor-list", default="default",
                        help="torchsim_runner.py's --neighbor-list (default: torch-sim's own choice, warp's "
                             "alchemiops_nl_n2; torch_n2, torch_linked_cell, vesin, ... on request)")
    parser.add_argument("--skip-kups", action="store_true")
    parser.add_argument("--skip-torch-sim", action="store_true")
    parser.add_argument("--skip-ase", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="keep kups' and torch-sim's inputs, outputs and logs in DIR")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_lj_alt_"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()

    structures = [a for _, a in lj_workload(args.n)]
    everything = np.arange(len(structures))
    groups = periodicity_groups(structures)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {_machine()}; {_versions()}")
    print(f"# load average (1/5/15 min) at start: {_load()}")
    print(f"# {args.n} LJ structures, {sum(map(len, structures))} atoms "
          f"({', '.join(f'{len(v)} {k}' for k, v in groups.items())}), fmax {args.fmax} eV/A, max {MAX_STEPS} steps, "
          f"float64")
    print("# command: python benchmarks/bench_lj_alternatives.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
          flush=True)

    refs = {}
    if not args.skip_ase:
        for optimizer in ("lbfgs", "fire"):
            refs[optimizer] = run_ase(structures, args.fmax, optimizer)
            print(f"ASE {optimizer}: {refs[optimizer][0]:.2f} s, {refs[optimizer][1].sum()} steps", flush=True)

    # (engine, optimizer, which structures, walls, steps, finals, note)
    rows = []
    ours = {}
    for optimizer in ("lbfgs", "fire"):
        r = run_engine(structures, args.fmax, optimizer)
        ours[optimizer] = r["walls"]
        print(f"kups-relax {optimizer}: {r['walls'][0]:.2f} s first, {r['walls'][1]:.2f} s compiled, "
              f"{r['steps'].sum()} steps", flush=True)
        rows.append(("kups-relax", optimizer, everything, r["walls"], r["steps"], r["finals"], ""))
    if not args.skip_torch_sim:
        if not Path(args.torchsim_python).exists():
            print(f"torch-sim rows skipped: no torch-sim venv at {args.torchsim_python} "
                  f"(run benchmarks/setup_torchsim_venv.sh)", flush=True)
        else:
            for optimizer in ("lbfgs", "fire"):
                for k in args.torchsim_check_every:
                    r = run_torch_sim(structures, args.fmax, args.torchsim_python, optimizer, k, work,
                                      args.torch_threads, args.torchsim_neighbor_list)
                    print(f"torch-sim {optimizer} (check every {k}): process {r['wall_process']:.2f} s (model built "
                          f"in {r['model_load_s']:.2f} s, not in the inner times); inner "
                          f"{r['walls'][0]:.2f} s first, {r['walls'][1]:.2f} s second, {r['steps'].sum()} steps; "
                          f"{r['versions']}", flush=True)
                    print(f"#   {r['command']}")
                    default = " (its default)" if k == 5 else " (every step, as ASE)" if k == 1 else ""
                    lbfgs = "ASE mode: alpha 70, memory 100; " if optimizer == "lbfgs" else "ase_fire flavour; "
                    rows.append((f"torch-sim 0.6.2, check every {k}", optimizer, everything, r["walls"], r["steps"],
                                 r["finals"], f"{lbfgs}convergence checked every {k} steps{default}; whole subprocess "
                                 f"{r['wall_process']:.1f} s; largest final fmax {r['fmax'].max():.4f}"))
    if not args.skip_kups:
        if not Path(args.kups_python).exists():
            print(f"no kups venv at {args.kups_python}: run benchmarks/setup_kups_venv.sh")
        else:
            for optimizer in ("lbfgs", "fire"):
                r = run_kups(structures, args.fmax, args.kups_python, optimizer, work)
                print(f"kups {optimizer}: process {r['wall_process']:.2f} s; inner {r['walls'][0]:.2f} s first, "
                      f"{r['walls'][1]:.2f} s second; iterations {r['iterations']}", flush=True)
                for c in r["commands"]:
                    print(f"#   {c}")
                rows.append(("kups", optimizer, everything, r["walls"], r["steps"], r["finals"],
                             f"whole subprocess {r['wall_process']:.1f} s; one batch per periodicity, batch "
                             f"iterations {r['iterations']}; largest final fmax {r['fmax'].max():.4f}"))

    n_atoms = np.array([len(a) for a in structures])
    print()
    print("| engine | optimizer | structures | wall s, first run (compiling / warm-up) | wall s, again | "
          "structure-steps | same steps as ASE (same optimizer) | max abs (E - E_ASE) per atom, eV | "
          "time / kups-relax's, first | time / kups-relax's, again | notes |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for optimizer, (t_ref, steps_ref, _) in refs.items():
        mine = ours[optimizer]
        print(f"| ASE, one at a time | {optimizer} | all {len(structures)} | {t_ref:.2f} | | {steps_ref.sum()} | | 0 | "
              f"{t_ref / mine[0]:.2f}x | {t_ref / mine[1]:.2f}x | reference |")
    for name, optimizer, idx, walls, steps, finals, note in rows:
        same = de = ""
        if optimizer in refs:
            _, steps_ref, energy_ref = refs[optimizer]
            same = f"{int(np.sum(steps == steps_ref[idx]))}/{len(idx)}"
            energies = np.array([ase_energy(a) for a in finals])
            de = f"{np.max(np.abs(energies - energy_ref[idx]) / n_atoms[idx]):.1e}"
        mine = ours[optimizer]
        print(f"| {name} | {optimizer} | all {len(idx)} | {walls[0]:.2f} | {walls[1]:.2f} | {int(steps.sum())} | "
              f"{same} | {de} | {walls[0] / mine[0]:.2f}x | {walls[1] / mine[1]:.2f}x | {note} |")
    print(f"\n# load average (1/5/15 min) at the end: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
