"""What a relaxation step costs besides the force evaluation, part by part (EMT and LJ batches).

    python benchmarks/bench_overhead.py [--emt 16 128] [--emt-mode default asap] [--lj 90]
                                        [--steps 20] [--repeat 3] [--dtype float64]

For each batch (the first N structures of benchmarks/metal_structures.py with EMT, or of
lj_workload.py with Lennard-Jones), jitted loops of ``--steps`` steps over the same batch
(packed as the engine packs it, neighbor list with the engine's default skin and per-system
cutoffs), timed after a warm-up call (best of ``--repeat``), compiled as the engine compiles:

* ``evaluate``: ``lax.fori_loop`` of ``kups_relax.evaluate.evaluate`` (energy + forces) alone;
  each iteration moves the atoms by 1e-9 Å/(eV/Å) along the forces so the compiler cannot
  hoist the evaluation out of the loop;
* ``evaluate + neighbors.update``: the same with the Verlet-skin check before every
  evaluation (those tiny moves never trigger a rebuild);
* ``run_chunk`` with a stateless step of 1e-9 Å/(eV/Å) along the forces: the loop's
  bookkeeping (constraints, status, records, selects) on top of the two above;
* ``run_chunk`` with ``ase_lbfgs(maxstep=1e-9)``: adds ASE's L-BFGS arithmetic (no rebuilds);
* ``run_chunk`` with ``ase_lbfgs()`` (and ``ase_fire()``): real 0.2 Å steps, which add the
  neighbor rebuilds they trigger. ``fmax`` is 1e-12, so every system takes every step.

Reported per batch, as fractions of one evaluation: the neighbor check, the rebuilds, the
optimizer and the bookkeeping; their sum is everything that is not evaluation (issue 13's
target on EMT 128: <= 25 %).
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

import jax
import jax.numpy as jnp
import numpy as np

import kups_relax
from kups_relax import neighbors as nl
from kups_relax.batch import Batch
from kups_relax.evaluate import evaluate
from kups_relax.loop import Targets, initial_state, run_chunk
from kups_relax.executables import cached_jit
from kups_relax.loop import system_cutoffs
from kups_relax.transforms import Scale, ase_fire, ase_lbfgs, chain

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
jax.config.update("jax_enable_x64", True)  # float64: this script calls the engine's modules directly
if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") != "0":
    kups_relax.enable_compilation_cache()  # as relax-batch does

SKIN = 0.5  # Å, the engine's default


@cached_jit(static_argnames=("n_steps", "with_neighbors"))
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
    cutoffs = jax.jit(system_cutoffs, static_argnums=2)(potential, geometry, float(potential.cutoff))
    neighbors = nl.allocate(geometry, potential.cutoff, SKIN, cutoffs=cutoffs)
    S = geometry.n_systems
    targets = Targets(fmax=jnp.full(S, 1e-12, geometry.positions.dtype), max_steps=jnp.full(S, 10**6, jnp.int32))

    def chunk_of(transform):
        state0 = initial_state(geometry, potential, neighbors, targets, optimizer=transform)

        def chunk():
            state, _ = run_chunk(state0, geometry, potential, targets, optimizer=transform, n_steps=n_steps)
            return state
        return chunk

    chunk = chunk_of(ase_lbfgs())
    state = jax.block_until_ready(chunk())
    if bool(state.neighbors.overflow):  # grow once so the timed chunk runs all its steps
        neighbors = nl.grow(state.neighbors, geometry)
        chunk = chunk_of(ase_lbfgs())
    chunk_fire = chunk_of(ase_fire())
    chunk_tiny = chunk_of(ase_lbfgs(maxstep=1e-9))  # same loop, steps too small to trigger a neighbor rebuild
    chunk_trivial = chunk_of(chain(Scale(-1e-9)))  # the loop with a stateless step along the forces
    t_eval = best_of(lambda: _evaluate_loop(potential, geometry, neighbors, n_steps, False), repeat)
    t_eval_nl = best_of(lambda: _evaluate_loop(potential, geometry, neighbors, n_steps, True), repeat)
    t_chunk = best_of(chunk, repeat)
    t_fire = best_of(chunk_fire, repeat)
    t_tiny = best_of(chunk_tiny, repeat)
    t_trivial = best_of(chunk_trivial, repeat)
    state = chunk()
    took = int(np.asarray(state.steps).max())
    if took != n_steps:
        print(f"WARNING {label}: run_chunk took {took} of {n_steps} steps (overflow or a stopped system)")
    atoms = sum(len(a) for a in structures)
    per = lambda t: 1e3 * t / n_steps  # noqa: E731  ms per step
    return dict(label=label, systems=len(structures), atoms=atoms, pairs=int(neighbors.n_pairs), width=neighbors.width,
                eval_ms=per(t_eval), eval_nl_ms=per(t_eval_nl), chunk_ms=per(t_chunk), fire_ms=per(t_fire),
                tiny_ms=per(t_tiny), trivial_ms=per(t_trivial), us_atom=1e6 * t_chunk / n_steps / atoms,
                eval_us_atom=1e6 * t_eval / n_steps / atoms,
                check=(t_eval_nl - t_eval) / t_eval, rebuilds=(t_chunk - t_tiny) / t_eval,
                optimizer=(t_tiny - t_trivial) / t_eval, bookkeeping=(t_trivial - t_eval_nl) / t_eval,
                overhead=t_chunk / t_eval - 1, fire_overhead=t_fire / t_eval - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emt", type=int, nargs="*", default=[16, 128], help="EMT batch sizes (structures)")
    parser.add_argument("--emt-mode", choices=["default", "asap"], nargs="*", default=["default", "asap"])
    parser.add_argument("--lj", type=int, nargs="*", default=[90], help="LJ batch sizes (structures)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed loop")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args(argv)
    if args.dtype == "float32":
        jax.config.update("jax_enable_x64", False)
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start, jax {jax.__version__} {jax.default_backend()}, {args.dtype}, skin {SKIN} A")
    print("# command: python benchmarks/bench_overhead.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
          flush=True)
    rows = []
    if args.emt:
        from metal_structures import metal_structures
        from potentials import EMT

        for mode in args.emt_mode:
            potential = EMT(asap_cutoff=mode == "asap")
            for n in args.emt:
                rows.append(measure(f"EMT ({mode}), {n} metal structures", metal_structures(n), potential, args.steps,
                                    args.repeat))
                print(rows[-1], flush=True)
    if args.lj:
        from lj_workload import LJ_PARAMS, lj_workload
        from potentials import LennardJones

        potential = LennardJones(**LJ_PARAMS)
        for n in args.lj:
            rows.append(measure(f"LJ, {n} structures", [a for _, a in lj_workload(n)], potential, args.steps,
                                args.repeat))
            print(rows[-1], flush=True)
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| batch | atoms | matrix width K | evaluate ms/step | µs/atom/eval | run_chunk L-BFGS ms/step | µs/atom/step |"
          " not evaluation, % of an evaluation | neighbor check | rebuilds | optimizer (L-BFGS) | loop bookkeeping |"
          " run_chunk FIRE ms/step | FIRE: not evaluation |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
        print(f"| {r['label']} | {r['atoms']} | {r['width']} | {r['eval_ms']:.2f} | {r['eval_us_atom']:.2f} | "
              f"{r['chunk_ms']:.2f} | {r['us_atom']:.2f} | {pct(r['overhead'])} | {pct(r['check'])} | "
              f"{pct(r['rebuilds'])} | {pct(r['optimizer'])} | {pct(r['bookkeeping'])} | {r['fire_ms']:.2f} | "
              f"{pct(r['fire_overhead'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
