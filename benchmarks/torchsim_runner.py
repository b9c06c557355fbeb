"""Relax (or evaluate) a file of structures with torch-sim's batched optimizers (runs in torch-sim's own venv).

    /tmp/torchsim-venv/bin/python benchmarks/torchsim_runner.py IN.traj OUT.json \
        --model lj --sigma 3.4 --epsilon 0.0104 --rc 8.5 --dtype float64 \
        --optimizer lbfgs fire --check-every 5 1 --fmax 0.01 --max-steps 1000 [--repeat 2] [--threads N]
    /tmp/torchsim-venv/bin/python benchmarks/torchsim_runner.py IN.traj OUT.json \
        --model sevennet --dtype float32 --optimizer lbfgs fire --fmax 0.05 --threads 1
    ... --task evaluate --evaluate-repeats 3      # time one batched energy + forces (+ stress) call instead

IN is any file ``ase.io.read`` takes; the benchmarks write ASE trajectories (``.traj``), which
keep float64 positions exactly (extxyz rounds them to 1e-8 Å, which is enough to change a
long L-BFGS path at the 1e-7 eV/atom level). Called by bench_lj_alternatives.py and
bench_sevennet.py (see benchmarks/setup_torchsim_venv.sh: torch-sim-atomistic 0.6.2 needs
Python >= 3.12; the main environment is 3.11). They set ``WARP_CACHE_PATH`` to an empty folder
so that the first run compiles warp's neighbor-list kernels (warp keeps them on disk).

What it runs (torch-sim 0.6.2 API, read from site-packages/torch_sim):

* state: ``ts.io.atoms_to_state(atoms_list, device, dtype)``. A SimState has one ``pbc``
  vector for the whole batch (``SimState._global_attributes``; ``atoms_to_state`` raises on
  mixed periodicity), so structures are grouped by their ``pbc`` and each group is one
  ``ts.optimize`` call; the wall time of a run is the sum over the groups.
* models: ``torch_sim.models.lennard_jones.LennardJonesModel(sigma, epsilon, cutoff,
  dtype, compute_stress=False)`` (a ``PairPotentialModel``: half neighbor list, autograd
  forces, no energy shift at the cutoff; neighbor list ``torchsim_nl`` unless ``--neighbor-list``:
  alchemiops (warp) > vesin > pure-torch linked cell, the first installed, i.e. warp's
  ``alchemiops_nl_n2`` with 0.6.2's dependencies) or ``sevenn.torchsim.SevenNetModel``
  (re-exported as ``torch_sim.models.sevennet.SevenNetModel``) on
  ``sevenn.util.load_checkpoint(name).build_model()`` (the checkpoint ships in the sevenn wheel).
* optimizers: ``ts.optimize(state, model, optimizer=(init_fn, step_fn), convergence_fn=
  ts.generate_force_convergence_fn(fmax), autobatcher=InFlightAutoBatcher(...),
  max_steps=..., steps_between_swaps=K, init_kwargs=..., **step_kwargs)``:

  - ``lbfgs``: ``ts.optimizers.lbfgs_init`` / ``lbfgs_step`` in ASE's mode:
    ``alpha=70`` (fixed H0 = 1/alpha; torch-sim's default ``alpha=None`` updates H0 from
    the last (s, y) pair), ``step_size=1.0`` (ASE's damping), ``max_history=100`` (ASE's
    memory; torch-sim's default is 20), ``max_step=0.2`` (largest atom displacement, as ASE).
    ``--lbfgs-params torchsim`` runs torch-sim's own defaults instead. Otherwise ASE's
    algorithm, except that a history pair with ``|y.s| <= curvature_eps`` (1e-12) gets
    rho = 0 and ``1e-16`` (float32: ``1e-8``) is added to the denominators; on the LJ
    and SevenNet sets it took ASE's steps when checked every step.
  - ``fire``: ``ts.optimizers.fire_init`` / ``fire_step`` with ``fire_flavor="ase_fire"``
    (its default) and its defaults, which are ASE's numbers (dt 0.1, dt_max 1.0, n_min 5,
    f_inc 1.1, f_dec 0.5, alpha 0.1, f_alpha 0.99, max_step 0.2 on the norm of the whole
    step of a system). One difference from ``ase.optimize.FIRE``: once a system has had
    more than n_min uphill-free steps, torch-sim multiplies alpha by f_alpha *before* mixing
    the velocity, ASE after (ASE mixes with the previous alpha); with that one reordering
    an ASE FIRE reproduces torch-sim's path to 1e-14 Å. So FIRE step counts and minima
    differ slightly from ASE's on longer relaxations.

  ``ts.optimize`` checks convergence (largest per-atom force norm < fmax) every
  ``steps_between_swaps`` steps (default 5), so a structure takes a multiple of K steps
  (K = ``--check-every``; 1 = every step, as ASE, except that torch-sim always takes at
  least one step). The autobatcher here holds every structure of the group at once
  (``memory_scales_with="n_atoms"``, ``max_memory_scaler`` = atoms + 1: what
  ``autobatcher=False`` does), so a structure never waits for a slot; converged ones are
  removed from the batch at each check.

Steps per structure are counted by wrapping ``step_fn`` (one count per step call for every
structure in the batch at that call); for L-BFGS they equal the state's ``n_iter``.
Each configuration runs ``--repeat`` times in this process: the first includes torch's
warm-up (and any lazy initialisation), the second does not. Model construction is timed apart.

Writes JSON: versions, thread count, model load seconds, and per (optimizer, K) the wall
seconds of each run and, per structure (input order), steps, final energy (the model's), final
largest force, positions (final run).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from importlib.metadata import version

import ase.io
import numpy as np
import torch

warnings.filterwarnings("ignore")

import torch_sim as ts  # noqa: E402
from torch_sim.autobatching import InFlightAutoBatcher  # noqa: E402


NEIGHBOR_LISTS = {  # --neighbor-list NAME -> torch_sim.neighbors function ("default": the model's own choice)
    "default": None,
    "alchemiops_n2": "alchemiops_nl_n2",
    "alchemiops_cell_list": "alchemiops_nl_cell_list",
    "vesin": "vesin_nl",
    "vesin_ts": "vesin_nl_ts",
    "torch_linked_cell": "torch_nl_linked_cell",
    "torch_n2": "torch_nl_n2",
}


def neighbor_list_fn(name: str):
    from torch_sim import neighbors

    return neighbors.torchsim_nl if NEIGHBOR_LISTS[name] is None else getattr(neighbors, NEIGHBOR_LISTS[name])


def build_model(args, dtype):
    nl = neighbor_list_fn(args.neighbor_list)
    if args.model == "lj":
        from torch_sim.models.lennard_jones import LennardJonesModel

        return LennardJonesModel(sigma=args.sigma, epsilon=args.epsilon, cutoff=args.rc, dtype=dtype,
                                 device=torch.device("cpu"), compute_stress=args.stress, neighbor_list_fn=nl)
    import sevenn.util
    from torch_sim.models.sevennet import SevenNetModel

    net = sevenn.util.load_checkpoint(args.sevennet_model).build_model()
    return SevenNetModel(net, modal=args.sevennet_modal, device="cpu", dtype=dtype, neighbor_list_fn=nl)


def optimizer_setup(name: str, lbfgs_params: str):
    """(init_fn, step_fn, init_kwargs, step_kwargs) for ``ts.optimize``."""
    opt = ts.optimizers
    if name == "lbfgs":
        if lbfgs_params == "ase":
            return opt.lbfgs_init, opt.lbfgs_step, dict(alpha=70.0, step_size=1.0), dict(max_history=100, max_step=0.2)
        return opt.lbfgs_init, opt.lbfgs_step, {}, {}
    if name == "fire":
        return opt.fire_init, opt.fire_step, dict(fire_flavor="ase_fire"), dict(fire_flavor="ase_fire")
    raise SystemExit(f"unknown optimizer {name}")


def pbc_groups(frames) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(frames):
        groups.setdefault(tuple(bool(p) for p in a.pbc), []).append(i)
    return groups


def relax_once(frames, model, dtype, optimizer: str, check_every: int, args):
    init_fn, step_fn, init_kwargs, step_kwargs = optimizer_setup(optimizer, args.lbfgs_params)
    n = len(frames)
    steps = np.zeros(n, int)
    n_iter = np.full(n, -1, int)
    energy = np.zeros(n)
    fmax = np.zeros(n)
    positions: list = [None] * n
    convergence = ts.generate_force_convergence_fn(force_tol=args.fmax, include_cell_forces=False)
    for indices in pbc_groups(frames).values():
        group = [frames[i] for i in indices]
        counts = np.zeros(len(group), int)
        batcher = InFlightAutoBatcher(model, memory_scales_with="n_atoms",
                                      max_memory_scaler=sum(len(a) for a in group) + 1)

        def counting_step(state, model, _step=step_fn, _batcher=batcher, _counts=counts, **kw):
            _counts[_batcher.current_idx] += 1  # systems of the batch, in batch order
            return _step(state=state, model=model, **kw)

        state = ts.io.atoms_to_state(group, torch.device("cpu"), dtype)
        final = ts.optimize(state, model, optimizer=(init_fn, counting_step), convergence_fn=convergence,
                            autobatcher=batcher, max_steps=args.max_steps, steps_between_swaps=check_every,
                            init_kwargs=init_kwargs, **step_kwargs)
        forces = final.forces.detach().double().numpy()
        pos = final.positions.detach().double().numpy()
        sizes = np.array([len(a) for a in group])
        splits = np.cumsum(sizes)[:-1]
        for k, (i, p, f) in enumerate(zip(indices, np.split(pos, splits), np.split(forces, splits))):
            steps[i] = counts[k]
            positions[i] = p.tolist()
            fmax[i] = float(np.linalg.norm(f, axis=1).max())
            energy[i] = float(final.energy[k])
            if hasattr(final, "n_iter"):
                n_iter[i] = int(final.n_iter[k])
    return dict(steps=steps.tolist(), n_iter=n_iter.tolist(), energy=energy.tolist(), fmax=fmax.tolist(),
                positions=positions)


def evaluate(frames, model, dtype, repeats: int):
    """Time one batched call of the model on all frames (one pbc group only)."""
    if len(pbc_groups(frames)) > 1:
        raise SystemExit("--task evaluate needs structures of one periodicity")
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), dtype)
    t = time.perf_counter()
    out = model(state)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        model(state)
    again = (time.perf_counter() - t) / max(repeats, 1)
    sizes = np.array([len(a) for a in frames])
    forces = out["forces"].detach().double().numpy()
    return dict(wall_first=first, wall_per_call=again, energy=out["energy"].detach().double().numpy().tolist(),
                forces=[f.tolist() for f in np.split(forces, np.cumsum(sizes)[:-1])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--task", choices=["relax", "evaluate"], default="relax")
    parser.add_argument("--model", choices=["lj", "sevennet"], default="lj")
    parser.add_argument("--sigma", type=float, default=3.4)
    parser.add_argument("--epsilon", type=float, default=0.0104)
    parser.add_argument("--rc", type=float, default=8.5)
    parser.add_argument("--stress", action="store_true", help="LJ: compute the stress too")
    parser.add_argument("--sevennet-model", default="7net-0", help="sevenn's name of a pretrained model")
    parser.add_argument("--sevennet-modal", default=None, help="modality of a multi-fidelity model (7net-mf-0: PBE, R2SCAN)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--optimizer", nargs="+", choices=["lbfgs", "fire"], default=["lbfgs", "fire"])
    parser.add_argument("--check-every", nargs="+", type=int, default=[5],
                        help="ts.optimize's steps_between_swaps (convergence checked every K steps); several allowed")
    parser.add_argument("--lbfgs-params", choices=["ase", "torchsim"], default="ase",
                        help="ase: alpha 70, memory 100 (ASE's LBFGS); torchsim: torch-sim's defaults")
    parser.add_argument("--fmax", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration (the first warms up)")
    parser.add_argument("--evaluate-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--neighbor-list", choices=sorted(NEIGHBOR_LISTS), default="default",
                        help="default: torch-sim's torchsim_nl (alchemiops (warp) > vesin > pure torch, the first "
                             "installed; alchemiops_nl_n2 with 0.6.2's dependencies)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    frames = ase.io.read(args.input, index=":")
    t = time.perf_counter()
    model = build_model(args, dtype)
    load_s = time.perf_counter() - t
    out = dict(torch_sim_version=version("torch-sim-atomistic"), torch_version=torch.__version__,
               sevenn_version=_maybe_version("sevenn"), ase_version=version("ase"), threads=torch.get_num_threads(),
               model=args.model, dtype=args.dtype, model_load_s=load_s, lbfgs_params=args.lbfgs_params,
               neighbor_list=_neighbor_list_name(args.neighbor_list), runs=[])
    if args.task == "evaluate":
        out["evaluate"] = evaluate(frames, model, dtype, args.evaluate_repeats)
    else:
        for optimizer in args.optimizer:
            for k in args.check_every:
                walls, result = [], None
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    result = relax_once(frames, model, dtype, optimizer, k, args)
                    walls.append(time.perf_counter() - t)
                out["runs"].append(dict(optimizer=optimizer, check_every=k, wall_s=walls, **result))
    with open(args.output, "w") as f:
        json.dump(out, f)


def _maybe_version(name: str) -> str:
    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return ""


def _neighbor_list_name(name: str) -> str:
    from torch_sim import neighbors

    if NEIGHBOR_LISTS[name] is not None:
        return NEIGHBOR_LISTS[name]
    if neighbors.ALCHEMIOPS_AVAILABLE:
        return "alchemiops_nl_n2"
    if neighbors.VESIN_TORCHSCRIPT_AVAILABLE:
        return "vesin_nl_ts"
    if neighbors.VESIN_AVAILABLE:
        return "vesin_nl"
    return "torch_nl_linked_cell"


if __name__ == "__main__":
    main()
