"""What a user runs today: ``ase.optimize.LBFGS`` one structure at a time, relaxed structures written to one file.

    python benchmarks/ase_relax_loop.py IN.extxyz OUT.extxyz --calc emt|asap|lj [--fmax 0.05] [--steps 10000]

Reads every frame of ``IN``, relaxes each with ASE's LBFGS (default settings) and the
chosen calculator (``emt``: ``ase.calculators.emt.EMT``; ``asap``: ``asap3.EMT``; ``lj``:
``ase.calculators.lj.LennardJones`` with ``--lj sigma,epsilon,rc``), and writes every
relaxed structure (energy, forces, ``info["steps"]``, ``info["converged"]``) to ``OUT``.
Used by bench_emt_stream.py as a separate process, so its wall time is end to end.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import ase.io
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import LBFGS


def make_calculator(name: str, lj: str):
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT
    if name == "asap":
        from asap3 import EMT

        # asap3 warns about non-periodic cell heights of clusters in a box; harmless here
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="asap3")
        return EMT
    if name == "lj":
        from ase.calculators.lj import LennardJones

        sigma, epsilon, rc = (float(x) for x in lj.split(","))
        return lambda: LennardJones(sigma=sigma, epsilon=epsilon, rc=rc)
    raise SystemExit(f"unknown calculator {name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--calc", default="emt", choices=("emt", "asap", "lj"))
    parser.add_argument("--lj", default="3.4,0.0104,8.5", help="sigma,epsilon,rc for --calc lj")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10000)
    args = parser.parse_args(argv)
    make = make_calculator(args.calc, args.lj)
    out = []
    for atoms in ase.io.iread(args.input, index=":"):
        atoms.calc = make()
        opt = LBFGS(atoms, logfile=None)
        converged = opt.run(fmax=args.fmax, steps=args.steps)
        final = atoms.copy()
        final.calc = SinglePointCalculator(final, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        final.info.update(steps=int(opt.nsteps), converged=bool(converged))
        out.append(final)
    ase.io.write(args.output, out, format="extxyz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
