"""Optimizer-plus-loop overhead per step, as a fraction of one force evaluation (EMT and LJ, a few batch sizes).

    python benchmarks/bench_overhead.py [--emt 16 128] [--lj 30 300] [--steps 20] [--repeat 3]

For each batch (the first N structures of benchmarks/metal_structures.py with EMT, or of
lj_workload.py with Lennard-Jones), three jitted loops of ``--steps`` steps over the same
padded batch, float64, timed after a warm-up call (best of ``--repeat``):

* ``evaluate``: ``lax.fori_loop`` of ``kups_relax.evaluate.evaluate`` (energy + forces, no
  stress) alone; each iteration moves the atoms by 1e-9 Å/(eV/Å) along the forces so the
  compiler cannot hoist the evaluation out of the loop;
* ``evaluate + neighbors.update``: the same with the Verlet-skin check before every
  evaluation (those tiny moves never trigger a rebuild);
* ``run_chunk``: the engine's relaxation loop (``kups_relax.loop.run_chunk``) with ASE's
  LBFGS (``ase_lbfgs``, memory 100), and again with ASE's FIRE (``ase_fire``): optimizer transform, position update, neighbor update (including
  the rebuilds that real steps trigger), evaluation, convergence bookkeeping, per-step
  records. ``fmax`` is set to 1e-12 so that every system takes every step. Real steps
  move atoms by up to 0.2 Å, so this loop also pays the neighbor rebuilds they trigger;
* ``run_chunk`` with ``ase_lbfgs(maxstep=1e-9)``: the same loop and L-BFGS arithmetic with
  steps too small to trigger any rebuild, which separates the optimizer + loop cost from the
  rebuild cost (compare it with ``evaluate + neighbors.update``).

Overhead = run_chunk per step / evaluate per step - 1 (the issue's target: <= 10 %).
Reported per batch: atoms, pairs, milliseconds per step of each loop, microseconds per
atom-step, and the overhead split into neighbor-list check and optimizer + loop.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kups_relax  # noqa: F401  (float64)
from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from kups_relax.loop import Targets, initial_state, run_chunk
from kups_relax.transforms import ase_fire, ase_lbfgs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SKIN = 1.0  # Å, the engine's default


@functools.partial(jax.jit, static_argnames=("n_steps", "with_neighbors"))
def _evaluate_loop(potential, geometry, neighbors, n_steps: int, with_neighbors: bool):
    def body(_, carry):
        positions, neighbors, total = carry
        g = geometry.replace(positions=positions)
        if with_neighbors:
            neighbors = nl.update(neighbors, g)
        ev = evaluate(potential, g, neighbors, compute_stress=False)
        return positions + 1e-9 * ev.forces, neighbors, total + jnp.sum(ev.energy)

    return jax.lax.fori_loop(0, n_steps, body, (geometry.positions, neighbors, jnp.zeros(())))


def best_of(fn, repeat: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def measure(label: str, structures, potential, n_steps: int, repeat: int) -> dict:
    geometry = Batch.from_atoms(structures).geometry
    neighbors = nl.allocate(geometry, potential.cutoff, SKIN)
    S = geometry.n_systems
    targets = Targets(fmax=jnp.full(S, 1e-12, geometry.positions.dtype), max_steps=jnp.full(S, 10**6, jnp.int32))
    transform = ase_lbfgs()
    state0 = initial_state(geometry, potential, neighbors, targets, optimizer=transform)
    fire = ase_fire()
    fire0 = initial_state(geometry, potential, neighbors, targets, optimizer=fire)

    def chunk():
        state, _ = run_chunk(state0, geometry, potential, targets, optimizer=transform, n_steps=n_steps)
        return state

    tiny = ase_lbfgs(maxstep=1e-9)  # same loop, steps too small to trigger a neighbor rebuild
    tiny0 = initial_state(geometry, potential, neighbors, targets, optimizer=tiny)

    def chunk_tiny():
        state, _ = run_chunk(tiny0, geometry, potential, targets, optimizer=tiny, n_steps=n_steps)
        return state

    def chunk_fire():
        state, _ = run_chunk(fire0, geometry, potential, targets, optimizer=fire, n_steps=n_steps)
        return state

    state = jax.block_until_ready(chunk())
    if bool(state.neighbors.overflow):  # grow once so the timed chunk runs all its steps
        state0 = state0._replace(neighbors=nl.grow(state0.neighbors, geometry))
    t_eval = best_of(lambda: _evaluate_loop(potential, geometry, neighbors, n_steps, False), repeat)
    t_eval_nl = best_of(lambda: _evaluate_loop(potential, geometry, neighbors, n_steps, True), repeat)
    t_chunk = best_of(chunk, repeat)
    t_fire = best_of(chunk_fire, repeat)
    t_tiny = best_of(chunk_tiny, repeat)
    state = chunk()
    took = int(np.asarray(state.steps).max())
    if took != n_steps:
        print(f"WARNING {label}: run_chunk took {took} of {n_steps} steps (overflow or a stopped system)")
    atoms = sum(len(a) for a in structures)
    per = lambda t: 1e3 * t / n_steps  # noqa: E731  ms per step
    return dict(label=label, systems=len(structures), atoms=atoms, pairs=int(neighbors.n_pairs),
                eval_ms=per(t_eval), eval_nl_ms=per(t_eval_nl), chunk_ms=per(t_chunk), fire_ms=per(t_fire), tiny_ms=per(t_tiny),
                us_atom=1e6 * t_chunk / n_steps / atoms,
                overhead=t_chunk / t_eval - 1, nl_part=t_eval_nl / t_eval - 1, loop_part=(t_chunk - t_eval_nl) / t_eval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emt", type=int, nargs="*", default=[16, 128], help="EMT batch sizes (structures)")
    parser.add_argument("--lj", type=int, nargs="*", default=[30, 300], help="LJ batch sizes (structures)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed loop")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start, jax {jax.__version__} {jax.default_backend()}, float64, skin {SKIN} A")
    print("# command: python benchmarks/bench_overhead.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
          flush=True)
    rows = []
    if args.emt:
        from metal_structures import metal_structures
        from potentials import EMT

        potential = EMT()
        for n in args.emt:
            rows.append(measure(f"EMT, {n} metal structures", metal_structures(n), potential, args.steps, args.repeat))
            print(rows[-1], flush=True)
    if args.lj:
        from lj_workload import LJ_PARAMS, lj_workload
        from potentials import LennardJones

        potential = LennardJones(**LJ_PARAMS)
        for n in args.lj:
            rows.append(measure(f"LJ, {n} structures", [a for _, a in lj_workload(n)], potential, args.steps,
                                args.repeat))
            print(rows[-1], flush=True)
    print()
    print("| batch | atoms | pairs | evaluate ms/step | evaluate + neighbor check ms/step | run_chunk (LBFGS) ms/step |"
          " us/atom/step (run_chunk) | overhead vs evaluate | of which neighbor check | of which optimizer + loop |"
          " run_chunk (FIRE) ms/step | FIRE overhead vs evaluate | run_chunk (LBFGS, maxstep 1e-9 A: no rebuilds)"
          " ms/step | its overhead vs evaluate + neighbor check |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['label']} | {r['atoms']} | {r['pairs']} | {r['eval_ms']:.2f} | {r['eval_nl_ms']:.2f} | "
              f"{r['chunk_ms']:.2f} | {r['us_atom']:.1f} | {100 * r['overhead']:.0f} % | {100 * r['nl_part']:.0f} % | "
              f"{100 * r['loop_part']:.0f} % | {r['fire_ms']:.2f} | {100 * (r['fire_ms'] / r['eval_ms'] - 1):.0f} % | "
              f"{r['tiny_ms']:.2f} | {100 * (r['tiny_ms'] / r['eval_nl_ms'] - 1):.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
