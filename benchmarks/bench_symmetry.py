"""FixSymmetry: what finding the symmetry costs on the metal stream, and the stream with and without it.

    python benchmarks/bench_symmetry.py [--n 2048] [--cell frechet] [--keep DIR]

1. Detection per structure, on the host as the engine does it when it reads a structure
   (:func:`kups_relax.symmetry.fix_symmetry`: ASE's ``FixSymmetry`` -- spglib's dataset, the
   refinement of cell and positions, the atom maps -- and the space group of the input):
   mean, median and largest seconds per structure, by kind.
2. ``relax-batch`` on the stream (EMT, ``--cell``), warm caches, with and without
   ``--fix-symmetry``: end-to-end wall time of each, and the share of the ``--fix-symmetry``
   run spent finding symmetry (the line the engine logs). The issue's target: <= 5 %.

The stream (benchmarks/metal_structures.py) is rattled by 0.05 Å, beyond the default symprec,
so most bulk structures come out P1 and the clusters (pbc False, in a box) are taken as
periodic by spglib, as ASE's FixSymmetry takes them.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metal_structures import write_stream_input  # noqa: E402

SYMMETRY_LINE = re.compile(r"finding symmetry \(spglib, on the host as structures were read\): ([\d.]+) s, ([\d.]+) %")


def detection_times(structures) -> dict[str, list[float]]:
    from kups_relax.symmetry import fix_symmetry, space_group

    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for atoms in structures:
        t = time.perf_counter()
        space_group(atoms)
        try:
            fix_symmetry(atoms)
        except ValueError:
            pass
        by_kind[atoms.info["name"].rsplit("-", 1)[0]].append(time.perf_counter() - t)
    return by_kind


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent).returncode
    if rc not in (0, 1):
        raise SystemExit(f"{shlex.join(cmd)} failed (exit status {rc}); see {log}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--cell", default="frechet", help="--cell of relax-batch (default frechet; 'none': positions)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--keep", metavar="DIR")
    args = parser.parse_args(argv)
    work, structures, source, load = write_stream_input(args.n, args.keep, prefix="bench_symmetry_")
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start; "
          f"{args.n} structures; command: python benchmarks/bench_symmetry.py "
          + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))

    times = detection_times(structures)
    every = [t for ts in times.values() for t in ts]
    print("\n| kind | structures | mean ms | median ms | max ms |\n| --- | ---: | ---: | ---: | ---: |")
    for kind, ts in sorted(times.items()) + [("all", every)]:
        print(f"| {kind} | {len(ts)} | {1e3 * statistics.mean(ts):.2f} | {1e3 * statistics.median(ts):.2f} | "
              f"{1e3 * max(ts):.2f} |")
    print(f"detection summed over the stream: {sum(every):.2f} s")

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"))
    base = [sys.executable, "-m", "kups_relax.cli", str(source), "--potential", "emt", "--fmax", str(args.fmax),
            "--overwrite", "--trajectories", "none"] + ([] if args.cell == "none" else ["--cell", args.cell])
    walls = {}
    # -v: the engine's log line with the time spent finding symmetry
    for label, flags in (("without", []), ("with --fix-symmetry", ["--fix-symmetry", "-v"])):
        out = work / f"out-{label.split()[-1]}"
        for phase in ("warm-up", "timed"):
            log = work / f"{label.split()[-1]}-{phase}.log"
            walls[label] = run(base + flags + ["--out", str(out)], env, log)
            print(f"{label} {phase}: {walls[label]:.2f} s", flush=True)
    line = SYMMETRY_LINE.search((work / "--fix-symmetry-timed.log").read_text(errors="replace"))
    print("\n| run | wall s | symmetry s | symmetry share |\n| --- | ---: | ---: | ---: |")
    print(f"| without | {walls['without']:.2f} | | |")
    sym = walls["with --fix-symmetry"]
    print(f"| with --fix-symmetry | {sym:.2f} | {line[1] if line else '?'} | "
          f"{(line[2] + ' % of the run') if line else '?'}; {100 * sum(every) / sym:.1f} % of the wall time |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
