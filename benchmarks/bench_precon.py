"""Preconditioned vs plain L-BFGS (issue 17): the engine and ASE, on large systems and on the metal stream.

    python benchmarks/bench_precon.py [--n 2048] [--large-only | --stream-only] [--fmax 0.01]
                                      [--skip-ase] [--one-at-a-time] [--ase-emt-max-atoms 1000]
                                      [--stream-precon auto]

(a) The large set (tests/precon_structures.py ``large_structures``: 500 to 3,980 EMT atoms;
    slabs, vacancy supercells, two misoriented blocks, strongly rattled supercells):

    * the engine, ``relax(all of them, EMT, optimizer=...)`` in ONE call (the engine plans its
      batches; the largest structures get batches of their own), plain ``"lbfgs"`` and
      ``precon_lbfgs(precon="Exp")``: a first call compiles (its wall time is reported as
      "first call"), the second is timed ("warm"). Per structure: steps and evaluations
      (``RelaxResult.n_evaluations``; ``steps + 1`` for plain L-BFGS).
    * ASE one structure at a time, with asap3's EMT (the fast ASE calculator):
      ``ase.optimize.precon.PreconLBFGS(precon=Exp())`` and ``ase.optimize.LBFGS``; steps,
      evaluations (counted at the calculator) and wall time. With ASE's own EMT (the engine's
      reference potential) for the structures up to ``--ase-emt-max-atoms``.
      asap3's EMT is not ASE's EMT (other cutoff), so its step counts are not comparable one to
      one with the engine's; ASE's EMT ones are.

(b) The metal stream (benchmarks/metal_structures.py, 13-256 atoms), ``relax_iter`` in this
    process, plain ``"lbfgs"`` vs ``precon_lbfgs(precon=--stream-precon)`` (default ``"auto"``,
    ASE's default: Exp from 100 atoms): each stream once untimed (compiles every program of the
    slot plan) and once timed; steps and evaluations summed, wall time.

Prints markdown tables. Targets of the issue: on systems of >= 500 atoms, >= 2x fewer force
evaluations than plain L-BFGS and >= 1.5x less wall time end to end; on the stream, not slower.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # ASE's small LAPACK calls vs JAX's threads

from metal_structures import metal_structures  # noqa: E402
from precon_structures import large_structures  # noqa: E402

MAX_STEPS = 2000


def _evaluations(result) -> int:
    return getattr(result, "n_evaluations", 0) or result.steps + 1


def engine_large(structures, fmax: float) -> dict:
    """Both engine optimizers on the large set, one relax() call each (first, then timed)."""
    from kups_relax import relax
    from kups_relax.transforms import precon_lbfgs
    from potentials import get_potential

    emt = get_potential("emt")
    atoms = [a for _, a in structures]
    names = [n for n, _ in structures]
    out = {}
    for label, optimizer in (("lbfgs", "lbfgs"), ("precon", precon_lbfgs(precon="Exp"))):
        t = time.perf_counter()
        relax(atoms, emt, fmax=fmax, max_steps=MAX_STEPS, optimizer=optimizer, names=names)
        first = time.perf_counter() - t
        t = time.perf_counter()
        results = relax(atoms, emt, fmax=fmax, max_steps=MAX_STEPS, optimizer=optimizer, names=names)
        warm = time.perf_counter() - t
        out[label] = dict(first=first, warm=warm, results=results)
        print(f"engine {label}: first call {first:.1f} s, warm {warm:.1f} s", flush=True)
    return out


def ase_large(structures, fmax: float, emt_max_atoms: int) -> dict:
    """ASE's PreconLBFGS and LBFGS one at a time, asap3's EMT (all) and ASE's EMT (small enough)."""
    from ase_precon import ase_lbfgs, ase_precon_lbfgs

    out = {}
    for calc in ("asap", "emt"):
        for name, atoms in structures:
            if calc == "emt" and len(atoms) > emt_max_atoms:
                continue
            p = ase_precon_lbfgs(atoms, calc, fmax=fmax, steps=MAX_STEPS)
            plain = ase_lbfgs(atoms, calc, fmax=fmax, steps=MAX_STEPS)
            out[calc, name] = (p, plain)
            print(f"ASE/{calc} {name}: precon {p.steps} steps {p.evaluations} evals {p.seconds:.1f} s; "
                  f"lbfgs {plain.steps} steps {plain.evaluations} evals {plain.seconds:.1f} s", flush=True)
    return out


def report_large(structures, engine, ase, fmax):
    print(f"\n### Large set (EMT, fmax {fmax}): steps / evaluations, plain L-BFGS vs PreconLBFGS(Exp)\n")
    head = "| structure | atoms | engine lbfgs | engine precon | evals ratio |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    for calc in ("emt", "asap"):
        head += f" ASE/{calc} LBFGS | ASE/{calc} Precon | s (LBFGS / Precon) |"
        rule += " ---: | ---: | ---: |"
    print(head + "\n" + rule)
    totals = dict(lb=0, pc=0)
    for k, (name, atoms) in enumerate(structures):
        row = f"| {name} | {len(atoms)} |"
        if engine:
            lb, pc = engine["lbfgs"]["results"][k], engine["precon"]["results"][k]
            n_lb, n_pc = _evaluations(lb), _evaluations(pc)
            totals["lb"] += n_lb
            totals["pc"] += n_pc
            flag = "" if lb.status == pc.status == "converged" else f" ({lb.status}/{pc.status})"
            row += f" {lb.steps} / {n_lb} | {pc.steps} / {n_pc} | {n_lb / n_pc:.2f}{flag} |"
        else:
            row += " | | |"
        for calc in ("emt", "asap"):
            if (calc, name) in ase:
                p, plain = ase[calc, name]
                row += (f" {plain.steps} / {plain.evaluations} | {p.steps} / {p.distinct_evaluations}"
                        f"{'' if p.converged and plain.converged else ' (unconverged)'} | "
                        f"{plain.seconds:.1f} / {p.seconds:.1f} |")
            else:
                row += " | | |"
        print(row)
    if engine:
        lb, pc = engine["lbfgs"], engine["precon"]
        print(f"\nEngine, all {len(structures)} in one relax() call: plain L-BFGS {totals['lb']} evaluations, "
              f"warm {lb['warm']:.1f} s (first call {lb['first']:.1f} s); PreconLBFGS {totals['pc']} evaluations, "
              f"warm {pc['warm']:.1f} s (first call {pc['first']:.1f} s). Evaluations "
              f"{totals['lb'] / max(totals['pc'], 1):.2f}x fewer, wall time {lb['warm'] / pc['warm']:.2f}x less "
              f"(targets: >= 2x, >= 1.5x).")
    for calc in ("emt", "asap"):
        rows = [v for (c, _), v in ase.items() if c == calc]
        if rows:
            n_lb = sum(plain.evaluations for _, plain in rows)
            n_pc = sum(p.distinct_evaluations for p, _ in rows)
            s_lb = sum(plain.seconds for _, plain in rows)
            s_pc = sum(p.seconds for p, _ in rows)
            print(f"ASE/{calc}, {len(rows)} structures one at a time: LBFGS {n_lb} evaluations {s_lb:.1f} s; "
                  f"PreconLBFGS {n_pc} distinct evaluations {s_pc:.1f} s ({n_lb / n_pc:.2f}x fewer evaluations, "
                  f"{s_lb / s_pc:.2f}x the wall time of LBFGS).")


def engine_one_at_a_time(structures, fmax: float, potential: str = "emt") -> None:
    """Each structure in a relax() call of its own (as a user relaxing one big structure would),
    both optimizers: a first call compiles, a second is timed; prints a table."""
    from kups_relax import relax
    from kups_relax.transforms import precon_lbfgs
    from potentials import get_potential

    emt = get_potential(potential)
    print("\n### Engine, one structure per relax() call (warm; %s, fmax %g)\n" % (potential, fmax))
    print("| structure | atoms | lbfgs steps / evals / s | precon steps / evals / s | evals ratio | wall ratio |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, atoms in structures:
        row = {}
        for label, optimizer in (("lbfgs", "lbfgs"), ("precon", precon_lbfgs(precon="Exp"))):
            relax([atoms], emt, fmax=fmax, max_steps=MAX_STEPS, optimizer=optimizer)
            t = time.perf_counter()
            result = relax([atoms], emt, fmax=fmax, max_steps=MAX_STEPS, optimizer=optimizer)[0]
            row[label] = (result.steps, _evaluations(result), time.perf_counter() - t)
        (sl, el, tl), (sp, ep, tp) = row["lbfgs"], row["precon"]
        print(f"| {name} | {len(atoms)} | {sl} / {el} / {tl:.2f} | {sp} / {ep} / {tp:.2f} | {el / ep:.2f} | "
              f"{tl / tp:.2f} |", flush=True)


def stream(n: int, fmax: float, precon: str) -> dict:
    from kups_relax import relax_iter
    from kups_relax.transforms import precon_lbfgs
    from potentials import get_potential

    emt = get_potential("emt")
    structures = metal_structures(n)
    out = {}
    for label, optimizer in (("lbfgs", "lbfgs"), (f"precon ({precon})", precon_lbfgs(precon=precon))):
        for phase in ("untimed", "timed"):
            t = time.perf_counter()
            results = [r for _, r in relax_iter(((a.info["name"], a) for a in structures), emt, fmax=fmax,
                                                 max_steps=MAX_STEPS, optimizer=optimizer)]
            wall = time.perf_counter() - t
            print(f"stream {label} {phase}: {wall:.1f} s", flush=True)
        out[label] = dict(wall=wall, steps=sum(r.steps for r in results),
                          evaluations=sum(_evaluations(r) for r in results),
                          converged=sum(r.status == "converged" for r in results), n=len(results))
    return out


def report_stream(n, fmax, rows):
    print(f"\n### Metal stream ({n} structures, 13-256 atoms, EMT, fmax {fmax}, relax_iter in process, warm)\n")
    print("| optimizer | wall s | steps | evaluations | converged |\n| --- | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {r['wall']:.1f} | {r['steps']} | {r['evaluations']} | {r['converged']}/{r['n']} |")
    (plain, a), (pre, b) = rows.items()
    print(f"\n{pre} / {plain}: wall time {b['wall'] / a['wall']:.2f}x, evaluations "
          f"{b['evaluations'] / a['evaluations']:.2f}x (target: wall time <= 1.00x).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="structures of the metal stream (default 2048)")
    parser.add_argument("--large-only", action="store_true")
    parser.add_argument("--stream-only", action="store_true")
    parser.add_argument("--fmax", type=float, default=0.01, help="large set's fmax, eV/Å (default 0.01)")
    parser.add_argument("--stream-fmax", type=float, default=0.05, help="stream's fmax, eV/Å (default 0.05)")
    parser.add_argument("--stream-precon", default="auto", choices=["auto", "Exp"])
    parser.add_argument("--skip-ase", action="store_true", help="large set: the engine only")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="large set: also each structure in a relax() call of its own (engine, warm)")
    parser.add_argument("--one-at-a-time-potential", default="emt",
                        help="the potential of --one-at-a-time (default emt; e.g. sevennet-0)")
    parser.add_argument("--only", default=None, help="comma-separated names of large structures to keep")
    parser.add_argument("--skip-engine", action="store_true", help="large set: ASE only")
    parser.add_argument("--ase-emt-max-atoms", type=int, default=1000,
                        help="ASE's own EMT only up to this many atoms (asap3's EMT on all)")
    parser.add_argument("--large-max-atoms", type=int, default=None, help="drop larger structures of the large set")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start; "
          "command: python benchmarks/bench_precon.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    if not args.stream_only:
        structures = [(n, a) for n, a in large_structures()
                      if (args.large_max_atoms is None or len(a) <= args.large_max_atoms)
                      and (args.only is None or n in args.only.split(","))]
        engine = None if args.skip_engine else engine_large(structures, args.fmax)
        ase = {} if args.skip_ase else ase_large(structures, args.fmax, args.ase_emt_max_atoms)
        report_large(structures, engine, ase, args.fmax)
        if args.one_at_a_time:
            engine_one_at_a_time(structures, args.fmax, args.one_at_a_time_potential)
    if not args.large_only:
        report_stream(args.n, args.stream_fmax, stream(args.n, args.stream_fmax, args.stream_precon))
    return 0


if __name__ == "__main__":
    sys.exit(main())
