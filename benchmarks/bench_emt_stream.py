"""End to end: ``relax-batch`` (cold and warm compilation cache) vs ASE's LBFGS one structure at a time, with EMT.

    python benchmarks/bench_emt_stream.py [--n 64] [--fmax 0.05] [--dtype float32] [--skip-ase] [--skip-asap]
                                          [--ase-limit K] [--keep DIR]

The structures (benchmarks/metal_structures.py: bulk, vacancies, slabs, clusters, alloys;
13 to 256 atoms) are written to one extxyz file first (not timed). Every timed run is a
separate process, clocked from its start to its exit, i.e. to the last output file written:

* ``relax-batch structures.extxyz --potential emt --fmax F --out DIR`` with an empty
  compilation cache (``JAX_COMPILATION_CACHE_DIR=<fresh dir>``; cold) and then again with the
  cache that run filled (warm). It writes one HDF5 trajectory per structure, relaxed.extxyz
  and summary.csv (more output than the ASE loop writes).
* ``python benchmarks/ase_relax_loop.py ... --calc emt``: ``ase.optimize.LBFGS`` + ASE's EMT,
  one structure at a time, relaxed structures written to one extxyz file.
* The same with asap3's EMT (``--calc asap``), compared with
  ``relax-batch ... --potential-params asap_cutoff=true`` (ASE's asap3-compatible EMT mode).

Reported: wall times, ratios (reference time / engine time; > 1: the engine is faster),
microseconds per atom-step (wall time / sum over structures of atoms x steps),
total steps, on how many structures the step counts are equal, the largest difference of
the final energy per atom, and the programs each engine run compiled (from its log). The
useful fraction of the engine's atom-steps is measured by bench_useful_steps.py.
The cache runs use the package's own cache settings (every program cached, however quick to
compile), so the warm run shows what a user's second run of the same command costs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metal_structures import write_stream_input  # noqa: E402

COMPILED = re.compile(r"compiled (\d+) programs, (\d+) more from the compilation cache")


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in ``log``'s folder to completion (stdout+stderr to ``log``); wall seconds. Raises on a bad exit.

    Not in the caller's folder: ``python -m`` puts the working folder first on ``sys.path``,
    which would shadow a ``PYTHONPATH`` that chooses the package under test.
    """
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent).returncode
    wall = time.perf_counter() - t
    # exit status 1 is also relax-batch's "some structure did not converge" (reported in the table),
    # so a crash is told apart by its traceback
    if rc not in (0, 1) or "Traceback (most recent call last)" in log.read_text(errors="replace"):
        raise SystemExit(f"{shlex.join(cmd)} failed (exit status {rc}); see {log}")
    return wall


def engine_results(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Steps, final energy, atoms and status per structure, in input order, from summary.csv."""
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["steps"] or -1) for r in rows])
    energy = np.array([float(r["final_energy"] or "nan") for r in rows])
    atoms = np.array([int(r["atoms"]) for r in rows])
    return steps, energy, atoms, [r["status"] for r in rows]


def ase_results(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    frames = ase.io.read(path, index=":")
    return (np.array([a.info["steps"] for a in frames]), np.array([a.get_potential_energy() for a in frames]),
            np.array([len(a) for a in frames]), np.array([bool(a.info["converged"]) for a in frames]))


def compiled_programs(log: Path) -> str:
    m = COMPILED.findall(log.read_text(errors="replace"))
    return f"{m[-1][0]} (+{m[-1][1]} cached)" if m else "?"


def _revision(package: Path) -> str:
    """``git describe`` of the package's checkout (``-dirty`` with uncommitted changes), or why not.

    A snapshot made with ``git archive`` may carry the commit in a ``REVISION`` file beside the package.
    """
    if (package.parent / "REVISION").exists():
        return f"snapshot of {(package.parent / 'REVISION').read_text().strip()[:12]}"
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=package, capture_output=True,
                             text=True, timeout=10)
    except OSError as err:
        return f"revision unknown ({err})"
    return f"revision {out.stdout.strip()}" if out.returncode == 0 else "not a git checkout"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of structures (default 64)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=10000)
    parser.add_argument("--skip-ase", action="store_true", help="skip ASE + ASE's EMT (the slow reference)")
    parser.add_argument("--skip-asap", action="store_true", help="skip the asap_cutoff mode and asap3")
    parser.add_argument("--skip-default", action="store_true", help="skip the default EMT mode (engine and ASE)")
    parser.add_argument("--ase-limit", type=int, metavar="K",
                        help="run the ASE loops on the first K structures only and extrapolate their time x n/K "
                             "(structure k depends only on k, so the first K are the engine's first K)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="the engine's precision (the ASE loops are float64 always)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)

    work, structures, source, load = write_stream_input(args.n, args.keep, prefix="bench_emt_stream_")
    n_atoms = sum(len(a) for a in structures)
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start; "
          f"{args.n} structures, {n_atoms} atoms ({min(map(len, structures))}..{max(map(len, structures))} per "
          f"structure), fmax {args.fmax} eV/A; work folder {work}")
    import kups_relax

    print(f"# kups_relax from {Path(kups_relax.__file__).parent}, {_revision(Path(kups_relax.__file__).parent)}")
    print("# command: python benchmarks/bench_emt_stream.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))

    base_env = dict(os.environ)
    base_env.pop("KUPS_RELAX_COMPILATION_CACHE", None)
    relax_batch = [sys.executable, "-m", "kups_relax.cli"]
    common = [str(source), "--fmax", str(args.fmax), "--max-steps", str(args.max_steps), "--dtype", args.dtype]
    k_ref = min(args.ase_limit or args.n, args.n)
    ref_source = source
    if k_ref < args.n:
        ref_source = work / f"structures-first{k_ref}.extxyz"
        ase.io.write(ref_source, structures[:k_ref], format="extxyz")
    ase_loop = [sys.executable, str(HERE / "ase_relax_loop.py"), str(ref_source)]

    modes = []
    if not args.skip_default:
        modes.append(("default", [], "emt", "ASE LBFGS + ASE EMT", args.skip_ase))
    if not args.skip_asap:
        modes.append(("asap_cutoff", ["--potential-params", "asap_cutoff=true"], "asap", "ASE LBFGS + asap3 EMT", False))

    rows = []
    for mode, params, calc, ref_name, skip_ref in modes:
        cache = work / f"jax-cache-{mode}"
        env = dict(base_env, JAX_COMPILATION_CACHE_DIR=str(cache))
        runs = {}
        for label in ("cold", "warm"):
            out = work / f"engine-{mode}-{label}"
            cmd = relax_batch + common + ["--potential", "emt", *params, "--out", str(out), "--overwrite"]
            log = work / f"engine-{mode}-{label}.log"
            wall = timed(cmd, env, log)
            runs[label] = (wall, out, log)
            print(f"engine {mode} {label} ({args.dtype}): {wall:.2f} s   {shlex.join(cmd)}", flush=True)
        steps_e, energy_e, atoms_e, status_e = engine_results(runs["warm"][1])
        steps_c, energy_c, _, _ = engine_results(runs["cold"][1])
        if not np.array_equal(steps_c, steps_e):
            print(f"WARNING: cold and warm runs took different step counts ({steps_c.sum()} vs {steps_e.sum()})")
        ref = None
        if not skip_ref:
            ref_out = work / f"ase-{calc}.extxyz"
            cmd = ase_loop + [str(ref_out), "--calc", calc, "--fmax", str(args.fmax), "--steps", str(args.max_steps)]
            wall_ref = timed(cmd, base_env, work / f"ase-{calc}.log")
            print(f"{ref_name}: {wall_ref:.2f} s on {k_ref} structures   {shlex.join(cmd)}", flush=True)
            wall_ref *= args.n / k_ref  # extrapolated to all n with --ase-limit
            steps_r, energy_r, atoms_r, conv_r = ase_results(ref_out)
            assert np.array_equal(atoms_r, atoms_e[:k_ref])
            ref = (wall_ref, steps_r, energy_r, conv_r)
        rows.append((mode, runs, steps_e, energy_e, atoms_e, status_e, ref_name, ref))

    print()
    print("| EMT mode | run | wall s | ratio (reference s / this) | µs per atom-step | programs compiled | steps total |"
          " converged | same step count as reference | max abs dE per atom (eV) |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for mode, runs, steps_e, energy_e, atoms_e, status_e, ref_name, ref in rows:
        n_conv = sum(s == "converged" for s in status_e)
        for label in ("cold", "warm"):
            wall, _, log = runs[label]
            ratio = f"{ref[0] / wall:.3g}x" if ref else ""
            k = len(ref[1]) if ref else 0
            same = f"{int(np.sum(steps_e[:k] == ref[1]))}/{k}" if ref else ""
            de = f"{np.max(np.abs(energy_e[:k] - ref[2]) / atoms_e[:k]):.1e}" if ref else ""
            per = 1e6 * wall / np.sum(atoms_e * steps_e)
            print(f"| {mode} | relax-batch, {label} cache | {wall:.2f} | {ratio} | {per:.2f} | {compiled_programs(log)} | "
                  f"{int(steps_e.sum())} | {n_conv}/{len(steps_e)} | {same} | {de} |")
        if ref:
            k = len(ref[1])
            label = f"{ref_name}, one at a time" + ("" if k == len(steps_e) else
                                                   f", first {k} timed, x{len(steps_e) / k:g} extrapolated")
            per = 1e6 * ref[0] / (np.sum(atoms_e[:k] * ref[1]) * len(steps_e) / k)
            print(f"| {mode} | {label} | {ref[0]:.2f} | 1x | {per:.2f} | | {int(ref[1].sum())} (engine: "
                  f"{int(steps_e[:k].sum())}) | {int(ref[3].sum())}/{k} | | |")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
