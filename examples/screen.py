"""Screen the example structures through the Python API, then read the trajectories back.

    python examples/screen.py [OUT_DIR]

Reads every file in examples/structures/ (each frame of a multi-frame file is one
system), relaxes them all in one batch with EMT and ASE's LBFGS settings, writes one
H5MD trajectory per system, reads them back as ASE Atoms, and ranks the systems by
energy per atom. The command-line equivalent is

    relax-batch examples/structures --potential emt --fmax 0.05 --out OUT_DIR
"""

import sys
from pathlib import Path

from kups_relax import relax
from kups_relax.io import read_structures, read_trajectory, write_result
from potentials import get_potential

HERE = Path(__file__).resolve().parent


def main(out: Path) -> None:
    inputs = read_structures([HERE / "structures"])
    for item in inputs:
        if not item.ok:
            print(f"skipping {item.source}: {item.reason}")
    inputs = [item for item in inputs if item.ok]

    potential = get_potential("emt")
    results = relax([item.atoms for item in inputs], potential, fmax=0.05, max_steps=500,
                    names=[item.name for item in inputs], trajectory=True)

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item, result in zip(inputs, results):
        if result.trajectory is None:  # invalid input: nothing to write
            print(f"{result.name}: {result.status} ({result.reason})")
            continue
        path = write_result(out / f"{result.name}.h5", result, potential=potential, optimizer="lbfgs",
                            metadata={"source": item.source, "fmax": 0.05})
        frames = read_trajectory(path)  # list of Atoms, frame 0 = the input
        first, last = frames[0], frames[-1]
        drop = first.get_potential_energy() - last.get_potential_energy()
        rows.append((last.get_potential_energy() / len(last), result.name, len(last), len(frames) - 1,
                     drop, result.status))

    print(f"{'name':<18} {'atoms':>5} {'steps':>5} {'E/atom (eV)':>12} {'relaxed by (eV)':>16}  status")
    for e_per_atom, name, n, steps, drop, status in sorted(rows):
        print(f"{name:<18} {n:>5} {steps:>5} {e_per_atom:>12.4f} {drop:>16.4f}  {status}")
    print(f"trajectories in {out}/ (open with kups_relax.io.read_trajectory or h5py)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("screen_out"))
