"""Peak memory and wall time of ``relax-batch`` on campaigns of N small structures (issue 15, item 4).

Target: peak memory on 100,000 structures <= 2x that on 1,000 (inputs are read as the
relaxation goes, rows and frames are streamed to temporaries, trajectories are written and
dropped as systems finish).

    python benchmarks/bench_campaign_memory.py                      # N = 1000, 10000; none and per-shard
    python benchmarks/bench_campaign_memory.py --n 1000 10000 100000 --modes none

For each N, one extended-XYZ file of N small EMT structures (2 to 16 atoms: compact
clusters of one metal cut from an fcc lattice, and 1-, 2-, 4- and 8-atom fcc cells; each
rattled by 0.05 Å; structure ``k`` depends only on ``k``) is written frame by frame, and
``relax-batch FILE --potential emt --fmax 0.1 --max-steps 200 --trajectories MODE -q`` runs in a subprocess, measured by
``/usr/bin/time -v`` (peak resident set size of the process) or, without it,
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``. A warm-up run of 64 structures first
fills the compilation cache, so every measured run loads its programs instead of compiling
them (compilation would otherwise dominate the peak of the first run only).

Prints one line per run and a JSON list at the end; writes nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, reference_states

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
SCRIPT = shutil.which("relax-batch") or str(Path(sys.executable).parent / "relax-batch")


def small_structure(k: int) -> Atoms:
    """Structure ``k``: a compact cluster of 2-16 atoms or a 1/2/4/8-atom fcc cell, rattled 0.05 Å."""
    rng = np.random.default_rng(k)
    metal = METALS[k % len(METALS)]
    a = reference_states[atomic_numbers[metal]]["a"]
    if k % 3 == 2:  # a small periodic cell
        kind = (k // 3) % 4
        if kind == 0:
            atoms = bulk(metal, "fcc", a=a)
        elif kind == 1:
            atoms = bulk(metal, "fcc", a=a, orthorhombic=True)
        elif kind == 2:
            atoms = bulk(metal, "fcc", a=a, cubic=True)
        else:
            atoms = bulk(metal, "fcc", a=a, cubic=True) * (2, 1, 1)
    else:  # a compact cluster: the n lattice sites nearest a point, in a box with vacuum
        n = int(rng.integers(2, 17))
        lattice = bulk(metal, "fcc", a=a, cubic=True) * (4, 4, 4)
        centre = lattice.positions.mean(axis=0) + rng.uniform(-0.5, 0.5, 3)
        nearest = np.argsort(np.linalg.norm(lattice.positions - centre, axis=1), kind="stable")[:n]
        atoms = Atoms(metal * n, positions=lattice.positions[nearest])
        atoms.center(vacuum=6.0)
        atoms.pbc = False
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def write_inputs(path: Path, n: int) -> None:
    """``n`` structures in one extended-XYZ file, written one frame at a time."""
    import ase.io

    with open(path, "w") as f:
        for k in range(n):
            ase.io.write(f, small_structure(k), format="extxyz")


def measure(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; its wall time (s), peak RSS (MiB) and exit status."""
    t0 = time.perf_counter()
    if Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak_kib = int(match[1]) if match else -1
        how = "/usr/bin/time -v"
    else:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
        how = "getrusage(RUSAGE_CHILDREN)"
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}")
    return dict(wall_s=round(wall, 1), peak_rss_mib=round(peak_kib / 1024, 1), returncode=proc.returncode,
                measured_by=how)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="campaign sizes")
    parser.add_argument("--modes", nargs="+", default=["none", "per-shard"],
                        choices=["none", "per-shard", "per-system"], help="--trajectories modes")
    parser.add_argument("--workdir", help="folder for inputs and outputs (default: a temporary one, removed)")
    parser.add_argument("--extra", default="", help="more relax-batch flags, e.g. '--fmax 0.1'")
    args = parser.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kups-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = ["--potential", "emt", "--fmax", "0.1", "--max-steps", "200", "-q", *args.extra.split()]
    results = []
    try:
        warm = work / "warm.extxyz"
        write_inputs(warm, 64)
        for mode in args.modes:
            measure([SCRIPT, str(warm), "--out", str(work / f"warm-{mode}"), "--trajectories", mode, *flags], env)
        for n in args.n:
            inputs = work / f"structures-{n}.extxyz"
            t0 = time.perf_counter()
            write_inputs(inputs, n)
            print(f"wrote {n} structures in {time.perf_counter() - t0:.1f} s ({inputs.stat().st_size / 2**20:.1f} MiB)",
                  flush=True)
            for mode in args.modes:
                out = work / f"out-{n}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                record = dict(n=n, trajectories=mode,
                              **measure([SCRIPT, str(inputs), "--out", str(out), "--trajectories", mode, *flags], env))
                record["files_in_out"] = len(os.listdir(out))
                results.append(record)
                print(f"N={n:>7}  --trajectories {mode:<10}  peak RSS {record['peak_rss_mib']:8.1f} MiB  "
                      f"wall {record['wall_s']:8.1f} s  ({record['files_in_out']} files in --out)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            inputs.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
