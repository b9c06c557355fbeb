"""Lennard-Jones relaxation side by side: kups-relax vs kups vs torch-sim (and ASE's LBFGS as the reference answer).

    python benchmarks/bench_lj_alternatives.py [--n 300] [--fmax 0.01] [--kups-python /tmp/kups-venv/bin/python]
        [--skip-kups] [--skip-torch-sim] [--skip-ase]

Structures: bench_lj_relax.py's set (the 30 test structures re-rattled), as rewritten by
lj_workload.py so that kups and torch-sim can batch them (mixed periodicity -> the same
physics in a fully periodic cell with vacuum; clusters get a box). Ar-like LJ, sigma 3.4 Å,
epsilon 0.0104 eV, cutoff 8.5 Å, no smoothing (forces of all four codes are the same
function; energies differ by ASE's constant shift, so every final geometry is re-evaluated
with ASE's LennardJones for the energy comparison). fmax 0.01 eV/Å, at most 1000 steps.

Engines, all on this machine, float64:

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
* torch-sim (``torch-sim-atomistic`` 0.3.0): ``torch_sim.optimize`` with its
  ``LennardJonesModel`` (vesin neighbor list) and ``optimizers.fire`` (``md_flavor="ase_fire"``,
  its default), ``generate_force_convergence_fn(fmax, include_cell_forces=False)``, an
  ``InFlightAutoBatcher`` holding all structures of one periodicity at once (torch-sim 0.3.0
  has one ``pbc`` flag per batch), convergence checked every 5 steps (its default). It has no
  L-BFGS in 0.3.0. Two runs in process (the first includes torch's warm-up). Two defects of
  its 0.3.0 LennardJonesModel shape this comparison (checked against ASE's LennardJones and
  against finite differences of its own energy): its forces are exactly twice ``-dE/dr``
  (each pair of the full neighbor list is added to both atoms), and a non-orthogonal cell is
  applied transposed to the neighbor shifts (wrong forces). So torch-sim runs only the
  structures whose cells are orthogonal (or that have no periodicity), through a subclass
  that multiplies its forces by 0.5 (one tensor product per call); kups-relax's FIRE is
  timed on the same subset for its ratio.
* ASE: ``ase.optimize.LBFGS`` and ``ase.optimize.FIRE`` + ``ase.calculators.lj.LennardJones``,
  one structure at a time: the references for step counts and energies (each optimizer
  against ASE's same algorithm: FIRE and L-BFGS may end in different local minima).

Prints one markdown table: wall times with and without compilation / warm-up, force
evaluations (structure-steps), step agreement with the reference, the largest final energy
difference per atom against ASE's LBFGS minimum, and ratios (their time / ours).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KUPS_RELAX_COMPILATION_CACHE", "0")  # so the first call includes compiling

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


def orthogonal(atoms: Atoms) -> bool:
    """No periodic direction, or a cell whose lattice vectors are mutually orthogonal."""
    if not atoms.pbc.any():
        return True
    c = atoms.cell.array
    off = c @ c.T - np.diag(np.diag(c @ c.T))
    return bool(np.all(np.abs(off) < 1e-8))


def periodicity_groups(structures) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(structures):
        key = "periodic" if a.pbc.all() else "non-periodic"
        groups.setdefault(key, []).append(i)
    return groups


def run_torch_sim(structures, fmax):
    import torch
    import torch_sim as ts
    from torch_sim.autobatching import InFlightAutoBatcher
    from torch_sim.models.lennard_jones import LennardJonesModel

    class LennardJonesForcesHalved(LennardJonesModel):
        """torch-sim 0.3.0's LJ with its forces divided by 2 (they are twice -dE/dr; see the module docstring)."""

        def forward(self, state):
            out = super().forward(state)
            out["forces"] = 0.5 * out["forces"]
            return out

    model = LennardJonesForcesHalved(sigma=LJ_PARAMS["sigma"], epsilon=LJ_PARAMS["epsilon"], cutoff=LJ_PARAMS["rc"],
                                     dtype=torch.float64, device=torch.device("cpu"), compute_stress=False)
    convergence = ts.generate_force_convergence_fn(force_tol=fmax, include_cell_forces=False)
    steps_between_swaps = 5
    walls = []
    for _ in range(2):
        steps = np.zeros(len(structures), int)
        finals: list[Atoms | None] = [None] * len(structures)
        t = time.perf_counter()
        for indices in periodicity_groups(structures).values():
            group = [structures[i] for i in indices]
            batcher = InFlightAutoBatcher(model, memory_scales_with="n_atoms",
                                          max_memory_scaler=sum(len(a) for a in group) + 1)
            final = ts.optimize(system=group, model=model, optimizer=ts.optimizers.fire, convergence_fn=convergence,
                                autobatcher=batcher, max_steps=MAX_STEPS, steps_between_swaps=steps_between_swaps)
            positions = final.positions.detach().numpy()
            counts = np.array([len(a) for a in group])
            for i, chunk, tries in zip(indices, np.split(positions, np.cumsum(counts)[:-1]), batcher.swap_attempts):
                a = structures[i].copy()
                a.positions = chunk
                finals[i] = a
                steps[i] = tries * steps_between_swaps
        walls.append(time.perf_counter() - t)
    return dict(walls=walls, steps=steps, finals=finals, version=ts.__version__ if hasattr(ts, "__version__") else "")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--fmax", type=float, default=0.01)
    parser.add_argument("--kups-python", default="/tmp/kups-venv/bin/python")
    parser.add_argument("--skip-kups", action="store_true")
    parser.add_argument("--skip-torch-sim", action="store_true")
    parser.add_argument("--skip-ase", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="keep kups' inputs, outputs and logs in DIR")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_lj_alt_"))
    work.mkdir(parents=True, exist_ok=True)

    structures = [a for _, a in lj_workload(args.n)]
    everything = np.arange(len(structures))
    ortho = np.array([i for i, a in enumerate(structures) if orthogonal(a)])
    groups = periodicity_groups(structures)
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.n} LJ structures, {sum(map(len, structures))} atoms "
          f"({', '.join(f'{len(v)} {k}' for k, v in groups.items())}; {len(ortho)} with orthogonal or no cells), "
          f"fmax {args.fmax} eV/A, max {MAX_STEPS} steps")
    print("# command: python benchmarks/bench_lj_alternatives.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
          flush=True)

    refs = {}
    if not args.skip_ase:
        for optimizer in ("lbfgs", "fire"):
            refs[optimizer] = run_ase(structures, args.fmax, optimizer)
            print(f"ASE {optimizer}: {refs[optimizer][0]:.2f} s, {refs[optimizer][1].sum()} steps", flush=True)

    # (engine, optimizer, which structures, walls, steps, finals, note, our walls on the same set)
    rows = []
    ours = {}
    for optimizer in ("lbfgs", "fire"):
        r = run_engine(structures, args.fmax, optimizer)
        ours[optimizer, "all"] = r["walls"]
        print(f"kups-relax {optimizer}: {r['walls'][0]:.2f} s first, {r['walls'][1]:.2f} s compiled, "
              f"{r['steps'].sum()} steps", flush=True)
        rows.append(("kups-relax", optimizer, "all", everything, r["walls"], r["steps"], r["finals"], ""))
    if not args.skip_torch_sim:
        subset = [structures[i] for i in ortho]
        r = run_engine(subset, args.fmax, "fire")
        ours["fire", "orthogonal"] = r["walls"]
        rows.append(("kups-relax", "fire", "orthogonal", ortho, r["walls"], r["steps"], r["finals"], ""))
        r = run_torch_sim(subset, args.fmax)
        print(f"torch-sim fire: {r['walls'][0]:.2f} s first, {r['walls'][1]:.2f} s second", flush=True)
        rows.append(("torch-sim", "fire", "orthogonal", ortho, r["walls"], r["steps"], r["finals"],
                     "forces halved (its 0.3.0 LJ doubles them); steps counted per 5-step convergence check"))
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
                rows.append(("kups", optimizer, "all", everything, r["walls"], r["steps"], r["finals"],
                             f"whole subprocess {r['wall_process']:.1f} s; one batch per periodicity, batch "
                             f"iterations {r['iterations']}; largest final fmax {r['fmax'].max():.4f}"))

    n_atoms = np.array([len(a) for a in structures])
    print()
    print("| engine | optimizer | structures | wall s, first run (compiling / warm-up) | wall s, again | "
          "structure-steps | same steps as ASE (same optimizer) | max abs (E - E_ASE) per atom, eV | "
          "time / kups-relax's, first | time / kups-relax's, again | notes |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for optimizer, (t_ref, steps_ref, _) in refs.items():
        mine = ours[optimizer, "all"]
        print(f"| ASE, one at a time | {optimizer} | all {len(structures)} | {t_ref:.2f} | | {steps_ref.sum()} | | 0 | "
              f"{t_ref / mine[0]:.2f}x | {t_ref / mine[1]:.2f}x | reference |")
    for name, optimizer, subset, idx, walls, steps, finals, note in rows:
        same = de = ""
        if optimizer in refs:
            _, steps_ref, energy_ref = refs[optimizer]
            same = f"{int(np.sum(steps == steps_ref[idx]))}/{len(idx)}"
            energies = np.array([ase_energy(a) for a in finals])
            de = f"{np.max(np.abs(energies - energy_ref[idx]) / n_atoms[idx]):.1e}"
        mine = ours[optimizer, subset]
        print(f"| {name} | {optimizer} | {subset} {len(idx)} | {walls[0]:.2f} | {walls[1]:.2f} | {int(steps.sum())} | "
              f"{same} | {de} | {walls[0] / mine[0]:.2f}x | {walls[1] / mine[1]:.2f}x | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
