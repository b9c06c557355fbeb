"""Relax a file of structures with kups' batched relaxation and Lennard-Jones (runs in kups' own Python >= 3.12 venv).

    /tmp/kups-venv/bin/python benchmarks/kups_lj_runner.py IN.extxyz OUT.json \
        --optimizer lbfgs|fire --sigma 3.4 --epsilon 0.0104 --rc 8.5 --fmax 0.01 --max-steps 1000

Called by bench_lj_alternatives.py (see benchmarks/setup_kups_venv.sh). It does what kups'
own ``kups_relax`` application does (kups.application.simulations.relax.run): particle and
system tables from ASE atoms, ``Table.union`` into one batch, the LJ potential from
``LjPotentialConfig``, ``UniversalNeighborlistParameters.estimate``, an optimizer chain from
``make_optimizer``, ``make_relax_propagator`` and ``run_relax`` (jitted step, HDF5 log of
every step, stop when the largest force of the whole batch is below ``force_tolerance``).
The only difference from the application: the atoms come from one extxyz file instead of
one file per structure. The relaxation runs twice in one process: the first includes
compilation; the second traces again (the app builds its jitted step afresh each run) and
finds the programs in the persistent compilation cache (``--cache-dir``).

Optimizers (kups' per-system transforms with ASE's defaults):

* ``lbfgs``: ``scale_by_ase_lbfgs(memory_size=100, alpha=70)``, ``scale(-1)``,
  ``max_step_size(0.2)`` (ASE's LBFGS: per-system two-loop recursion, step capped so that
  no atom moves more than 0.2 Å);
* ``fire``: ``scale(-1)``, ``scale_by_fire()`` (its defaults), ``max_step_size(0.2)``.

Writes JSON: wall seconds of both runs, batch iterations, and per structure the final
positions, cell vectors and pbc (kups works in a rotated, lower-triangular cell frame, so
the caller rebuilds each structure from these to evaluate it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ase.io  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kups.application.potential.filter import POSITIONS_ONLY  # noqa: E402
from kups.application.relaxation.data import RelaxRunConfig, RelaxState, relax_state_from_ase  # noqa: E402
from kups.application.relaxation.simulation import make_relax_propagator, run_relax  # noqa: E402
from kups.application.simulations.potentials import LjPotentialConfig  # noqa: E402
from kups.core.data import Table  # noqa: E402
from kups.core.lens import identity_lens  # noqa: E402
from kups.core.neighborlist import UniversalNeighborlistParameters  # noqa: E402
from kups.relaxation.config import make_optimizer  # noqa: E402

OPTIMIZERS = {
    "lbfgs": [{"transform": "scale_by_ase_lbfgs", "memory_size": 100, "alpha": 70.0},
              {"transform": "scale", "step_size": -1.0},
              {"transform": "max_step_size", "max_step_size": 0.2}],
    "fire": [{"transform": "scale", "step_size": -1.0},
             "scale_by_fire",
             {"transform": "max_step_size", "max_step_size": 0.2}],
}


def relax_once(frames, args, out_file: str):
    """One relaxation of every frame, as kups' ``relax`` application runs it; the final state."""
    config = RelaxRunConfig(out_file=out_file, max_steps=args.max_steps, seed=0, force_tolerance=args.fmax,
                            optimizer=OPTIMIZERS[args.optimizer], optimize_cell=False)
    potential_config = LjPotentialConfig(cutoff=args.rc, parameters={"Ar": (args.sigma, args.epsilon)},
                                         mixing_rule="lorentz_berthelot")
    state_lens = identity_lens(RelaxState)
    optimizer = make_optimizer(config.optimizer)
    potential, cutoff = potential_config.build(state_lens, POSITIONS_ONLY)
    propagator, opt_init = make_relax_propagator(state_lens, potential, optimizer, POSITIONS_ONLY)
    parts = [relax_state_from_ase(a) for a in frames]
    particles, systems = Table.union([p for p, _ in parts], [s for _, s in parts])
    neighborlist_params = UniversalNeighborlistParameters.estimate(particles.data.system.counts, systems, cutoff)
    state = RelaxState(particles=particles, systems=systems, neighborlist_params=neighborlist_params,
                       opt_state=opt_init(particles, systems), step=jnp.array([0]))
    return run_relax(jax.random.key(0), propagator, state, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--optimizer", default="lbfgs", choices=sorted(OPTIMIZERS))
    parser.add_argument("--sigma", type=float, default=3.4)
    parser.add_argument("--epsilon", type=float, default=0.0104)
    parser.add_argument("--rc", type=float, default=8.5)
    parser.add_argument("--fmax", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2, help="runs in this process (the first compiles)")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache (kups' relax app enables one); "
                                            "an empty folder makes the first run compile everything")
    args = parser.parse_args()
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.getLogger().setLevel(logging.WARNING)
    frames = ase.io.read(args.input, index=":")
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            t = time.perf_counter()
            state = relax_once(frames, args, os.path.join(tmp, f"relax-{r}.h5"))
            jax.block_until_ready(state)
            walls.append(time.perf_counter() - t)
    positions = np.asarray(state.particles.data.positions)
    system = np.asarray(state.particles.data.system.indices)
    vectors = np.asarray(state.systems.data.cell.vectors)
    gradients = np.asarray(state.particles.data.position_gradients)
    out = dict(wall_s=walls, iterations=int(np.asarray(state.step).ravel()[0]), kups_version=_version(),
               jax_version=jax.__version__, systems=[])
    for s, atoms in enumerate(frames):
        rows = system == s
        out["systems"].append(dict(positions=positions[rows].tolist(), cell=vectors[s].tolist(),
                                   pbc=[bool(p) for p in atoms.pbc],
                                   fmax=float(np.max(np.linalg.norm(gradients[rows], axis=1)))))
    with open(args.output, "w") as f:
        json.dump(out, f)


def _version() -> str:
    from importlib.metadata import version

    return version("kups")


if __name__ == "__main__":
    main()
