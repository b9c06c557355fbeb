"""End to end: ``relax-batch --workers W`` (a local Dask cluster) on the metal stream, W = 1 and 2, warm caches.

    python benchmarks/bench_dask.py [--n 2048] [--task-size 128] [--workers 1 2] [--skip-local] [--skip-devices] [--keep DIR]

The structures (benchmarks/metal_structures.py, as bench_emt_stream.py: 13 to 256 atoms, EMT)
are written to one extxyz file first (not timed). Each configuration -- ``relax-batch`` in one
process (no Dask; ``--skip-local`` leaves it out) and ``relax-batch --workers W`` for every W --
runs twice with one compilation cache folder: a warm-up run that fills it (Dask workers get their
own XLA thread flags, so their programs are not the single process's), then the timed warm run.
Every timed run is a separate process clocked from its start to its exit (the last file written),
so the Dask runs include starting the cluster's worker processes.

Reported per run: the end-to-end wall time; for Dask runs, from the line ``relax-batch`` prints
(:meth:`kups_relax.distributed.CampaignReport.describe`), the campaign's wall time (first task
submitted to last row written), the seconds spent inside tasks summed over them, and the tasks;
from these

* scaling: end-to-end speed-up of W workers over 1 worker, and its efficiency (speed-up / W);
* Dask overhead: the workers' idle time ``W x campaign wall - busy``, where ``busy`` is the time
  a worker's relaxation stream held structures (:class:`kups_relax.distributed.WorkerStream`):
  scheduling, transfers, the client writing rows, starting, and waiting for the last task (the
  imbalance at the end counts here too); per task, and as a share of W x campaign wall.

``local-2-devices`` is ``relax-batch --devices 2`` in one process with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (two CPU devices sharing the cores).

The step counts of every run are compared with the first run's (summary.csv): the same structures
give the same steps whatever the sharding, except where a system's path is sensitive to the last
bit (programs of other batch shapes round differently).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metal_structures import write_stream_input  # noqa: E402

REPORT = re.compile(r"(\d+) systems in ([\d.]+) s on (\d+) Dask workers: (\d+) relaxed, (\d+) kept from complete "
                    r"outputs; (\d+) tasks; relaxing ([\d.]+) s of")


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in ``log``'s folder (stdout+stderr to ``log``); wall seconds. Raises on a crash."""
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent).returncode
    wall = time.perf_counter() - t
    if rc not in (0, 1) or "Traceback (most recent call last)" in log.read_text(errors="replace"):
        raise SystemExit(f"{shlex.join(cmd)} failed (exit status {rc}); see {log}")
    return wall


def steps(out: Path) -> dict[str, int]:
    with open(out / "summary.csv", newline="") as f:
        return {r["name"]: int(r["steps"] or -1) for r in csv.DictReader(f)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="number of structures (default 2048)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--task-size", type=int, default=128, help="structures per Dask task (default 128)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes (default 1 2)")
    parser.add_argument("--skip-local", action="store_true", help="leave out relax-batch without Dask")
    parser.add_argument("--skip-devices", action="store_true",
                        help="leave out relax-batch --devices 2 on two forced host devices")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)

    work, structures, source, load = write_stream_input(args.n, args.keep, prefix="bench_dask_")
    import dask
    import distributed

    import kups_relax

    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start; "
          f"{args.n} structures, {sum(map(len, structures))} atoms, fmax {args.fmax} eV/A, tasks of "
          f"{args.task_size}; dask {dask.__version__}, distributed {distributed.__version__}; work folder {work}")
    print(f"# kups_relax from {Path(kups_relax.__file__).parent}")
    print("# command: python benchmarks/bench_dask.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"))
    env.pop("KUPS_RELAX_COMPILATION_CACHE", None)
    base = [sys.executable, "-m", "kups_relax.cli", str(source), "--potential", "emt", "--fmax", str(args.fmax),
            "--overwrite"]
    two_devices = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    configs = ([] if args.skip_local else [("local", [], env)]) + \
        ([] if args.skip_devices else [("local-2-devices", ["--devices", "2"], two_devices)]) + [
        (f"dask-{w}", ["--workers", str(w), "--task-size", str(args.task_size)], env) for w in args.workers]
    results = {}
    for label, flags, config_env in configs:
        for phase in ("warm-up", "timed"):
            out = work / f"out-{label}"
            cmd = base + flags + ["--out", str(out)]
            log = work / f"{label}-{phase}.log"
            wall = timed(cmd, config_env, log)
            print(f"{label} {phase}: {wall:.2f} s   {shlex.join(cmd)}", flush=True)
        m = REPORT.search(log.read_text(errors="replace"))
        results[label] = dict(wall=wall, steps=steps(out),
                              campaign=None if m is None else dict(wall=float(m[2]), workers=int(m[3]),
                                                                   tasks=int(m[6]), busy=float(m[7])))

    first = next(iter(results.values()))["steps"]
    one = results.get(f"dask-{min(args.workers)}")
    local = results.get("local")
    print()
    print("| run | end-to-end wall s | vs in process | speed-up over the fewest workers | efficiency | "
          "campaign wall s | workers' streams busy s | tasks | idle per task, ms | idle share | "
          "same steps as the first run |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        c = r["campaign"]
        same = sum(r["steps"].get(k) == v for k, v in first.items())
        speed = eff = over = share = camp = busy = tasks = versus = ""
        if local is not None:
            versus = f"{local['wall'] / r['wall']:.2f}x"
        if c is not None:
            camp, busy, tasks = f"{c['wall']:.2f}", f"{c['busy']:.2f}", str(c["tasks"])
            idle = c["workers"] * c["wall"] - c["busy"]
            over = f"{1e3 * idle / max(c['tasks'], 1):.0f}"
            share = f"{100 * idle / (c['workers'] * c['wall']):.1f} %"
            if one is not None and one["campaign"] is not None:
                s = one["wall"] / r["wall"]
                speed = f"{s:.2f}x"
                eff = f"{100 * s * one['campaign']['workers'] / c['workers']:.0f} %"
        print(f"| {label} | {r['wall']:.2f} | {versus} | {speed} | {eff} | {camp} | {busy} | {tasks} | {over} | "
              f"{share} | {same}/{len(first)} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
