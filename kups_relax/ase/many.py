"""Many ``Atoms`` with calculators attached, relaxed in one call (``ase.optimize.LBFGS`` semantics).

Structures whose calculator is :class:`kups_relax.ase.Calculator` (plain
``Atoms``, or ``Atoms`` in a fresh ``FrechetCellFilter``/``UnitCellFilter``, which
the engine relaxes with the filter's settings; supported constraints) go through the
engine's jitted loop together, one batch per potential. Every other one (any ASE
calculator, other filters, other constraints) is evaluated on the host, system by
system, while the L-BFGS steps of all of them are computed in one batched call per step. Each structure ends
where ``ase.optimize.LBFGS(atoms).run(fmax, steps)`` would leave it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np

from kups_relax.engine import DEFAULT_MAX_STEPS, relax
from kups_relax.filters import CellFilter, check_variable_cell

from .calculator import Calculator
from .fast import fast_path_calculator
from .steps import HostSteps, lbfgs_transform

logger = logging.getLogger(__name__)


def relax_many(
    structures: Sequence,
    fmax: float = 0.05,
    steps: int = DEFAULT_MAX_STEPS,
    *,
    maxstep: float | None = None,
    memory: int = 100,
    damping: float = 1.0,
    alpha: float = 70.0,
) -> list[bool]:
    """Relax every structure in place with ASE's LBFGS semantics; return which converged.

    Args:
        structures: ``Atoms`` with calculators attached (or ASE filters / optimizables
            wrapping them). Positions (and cells, through filters) are updated in place.
        fmax: convergence criterion, eV/Å (largest per-row force norm, as ASE).
        steps: step limit per structure (the engine's default, 10 000, where
            ASE's ``run`` defaults to 10**8: one structure that never converges
            must not hold the others forever).
        maxstep, memory, damping, alpha: as ``ase.optimize.LBFGS`` (Å, -, -, eV/Å²).

    Returns:
        One bool per structure, in input order: ``fmax`` reached within ``steps``.

    Errors from a calculator (or a missing calculator) surface as ASE raises them.
    """
    structures = list(structures)
    maxstep = 0.2 if maxstep is None else float(maxstep)
    if maxstep > 1.0:
        raise ValueError(f"maxstep {maxstep} Å is much too large (at most 1.0 Å)")
    converged = [False] * len(structures)

    batches: dict[tuple, list[int]] = {}
    host: list[int] = []
    engine_atoms, cell_filters = {}, {}
    for i, obj in enumerate(structures):
        atoms, cell_filter = _engine_view(obj)
        calc = None if atoms is None else fast_path_calculator(atoms)
        if calc is None:
            host.append(i)
        else:
            engine_atoms[i], cell_filters[i] = atoms, cell_filter
            batches.setdefault(_batch_key(calc), []).append(i)

    transform = lbfgs_transform(maxstep, memory, damping, alpha)
    for members in batches.values():
        calc: Calculator = engine_atoms[members[0]].calc
        logger.info("relaxing %d structures in the jitted loop (%s)", len(members), type(calc.potential).__name__)
        filters = [cell_filters[i] for i in members]
        results = relax([engine_atoms[i] for i in members], calc.potential, fmax=fmax, max_steps=steps,
                        optimizer=transform, names=[f"structure-{i}" for i in members],
                        dtype=calc.dtype, skin=calc.skin,
                        cell_filter=filters if any(f is not None for f in filters) else None)
        for i, result in zip(members, results):
            atoms = engine_atoms[i]
            if cell_filters[i] is not None:
                atoms.set_cell(result.atoms.cell.array, scale_atoms=False)
            atoms.set_positions(result.atoms.positions, apply_constraint=False)
            cached = result.atoms.calc.results
            atoms.calc.set_results(atoms, result.energy, cached["forces"], cached.get("stress"))
            converged[i] = bool(result.converged)

    if host:
        logger.info("relaxing %d structures with host-side calculators", len(host))
        for i, done in zip(host, _relax_on_host([structures[i] for i in host], fmax, steps, maxstep,
                                                 memory, damping, alpha)):
            converged[i] = done
    return converged


def _relax_on_host(objects, fmax, steps, maxstep, memory, damping, alpha) -> list[bool]:
    """ASE's ``Dynamics.irun`` for every object at once: forces per system, steps batched."""
    optimizables = [obj.__ase_optimizable__() for obj in objects]
    rows = []
    for opt in optimizables:
        ndofs = opt.ndofs()
        if ndofs % 3:
            raise ValueError(f"{type(opt).__name__} has {ndofs} degrees of freedom, not rows of three")
        rows.append(ndofs // 3)
    stepper = HostSteps(rows, memory=memory, alpha=alpha)
    gradients = [opt.get_gradient() for opt in optimizables]
    done = [bool(opt.converged(g, fmax)) for opt, g in zip(optimizables, gradients)]
    taken = [0] * len(optimizables)
    while True:
        active = [not d and t < steps for d, t in zip(done, taken)]
        if not any(active):
            return done
        positions = [opt.get_x() if a else None for opt, a in zip(optimizables, active)]
        updates = stepper.step(positions, [g if a else None for g, a in zip(gradients, active)], active,
                               maxstep, damping)
        for i, opt in enumerate(optimizables):
            if active[i]:
                opt.set_x(positions[i] + updates[i].ravel())
                taken[i] += 1
                gradients[i] = opt.get_gradient()
                done[i] = bool(opt.converged(gradients[i], fmax))


def _engine_view(obj) -> tuple:
    """``(atoms, cell filter or None)`` for the engine, or ``(None, None)`` when ``obj`` is something else.

    A plain ``Atoms`` is itself; a ``FrechetCellFilter``/``UnitCellFilter`` that has not moved
    yet (its original cell is the atoms' cell) gives its ``Atoms`` and its settings.
    """
    from ase import Atoms
    from ase.filters import FrechetCellFilter, UnitCellFilter

    if type(obj) is Atoms:
        return obj, None
    if type(obj) in (FrechetCellFilter, UnitCellFilter) and type(obj.atoms) is Atoms:
        try:
            cell_filter = CellFilter.from_ase(obj)
        except ValueError as err:
            logger.debug("host path: %s", err)
            return None, None
        if check_variable_cell(obj.atoms) is None and obj.atoms.pbc.any():
            return obj.atoms, cell_filter
    return None, None


def _batch_key(calc: Calculator) -> tuple:
    """Calculators with equal potentials (same structure and parameter values), dtype and skin share a batch."""
    leaves, treedef = jax.tree.flatten(calc.potential)
    values = tuple((str(np.asarray(v).dtype), np.shape(v), np.asarray(v).tobytes()) for v in leaves)
    return (treedef, values, calc.dtype, calc.skin)
