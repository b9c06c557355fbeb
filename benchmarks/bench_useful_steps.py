"""What fraction of the atom-steps a stream executes is useful work (issue 13: >= 80 %).

    python benchmarks/bench_useful_steps.py [--n 64 2048] [--mode asap] [--fmax 0.05]

For each ``--n``, ``kups_relax.relax`` relaxes the first n structures of
benchmarks/metal_structures.py with EMT (as ``bench_emt_stream.py`` does, in process) and the
engine's closing log line is read: useful atom-steps (Σ over running systems of atoms x steps
taken) over executed atom-steps (Σ over the batch's device loop iterations of its atom rows,
padding and stopped slots included). Also printed: Σ atoms x steps of the results (which the
useful count must equal) and the batch shapes the stream ran (its debug log). The fraction depends on the step counts and
the slot plan only, not on the machine's speed.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metal_structures import metal_structures  # noqa: E402

USEFUL = re.compile(r"useful atom-steps: (\d+) of (\d+) executed")
SHAPES = re.compile(r"(?:new batch: |compacted \d+ running systems: \d+ -> )(\d+) atom rows")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--mode", choices=("default", "asap"), default="asap")
    parser.add_argument("--fmax", type=float, default=0.05)
    args = parser.parse_args(argv)
    from kups_relax import enable_compilation_cache, relax
    from potentials import get_potential

    if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
        enable_compilation_cache()  # as relax-batch does

    records = Records()
    engine_log = logging.getLogger("kups_relax.engine")
    engine_log.addHandler(records)
    engine_log.setLevel(logging.DEBUG)
    potential = get_potential("emt", asap_cutoff=args.mode == "asap")
    print(f"# command: python benchmarks/bench_useful_steps.py {' '.join(argv or sys.argv[1:])}")
    print("| structures | Σ atoms x steps | useful atom-steps | executed atom-steps | useful fraction |"
          " batches run (atom rows x how many) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for n in args.n:
        structures = metal_structures(n)
        records.messages.clear()
        results = relax(structures, potential, fmax=args.fmax)
        atom_steps = sum(len(a) * r.steps for a, r in zip(structures, results))
        useful, executed = map(int, USEFUL.findall("\n".join(records.messages))[-1])
        shapes = collections.Counter(int(m) for message in records.messages for m in SHAPES.findall(message))
        print(f"| {n} | {atom_steps} | {useful} | {executed} | {100 * useful / executed:.1f} % | "
              f"{', '.join(f'{k} x{v}' for k, v in sorted(shapes.items(), reverse=True))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
