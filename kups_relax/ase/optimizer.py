"""``kups_relax.ase.LBFGS``: a drop-in for ``ase.optimize.LBFGS`` whose steps come from the engine.

It is an ``ase.optimize.Optimizer`` with the constructor, attributes, log lines,
trajectory files, observers and ``run``/``irun``/``converged``/``todict`` of ASE's
``LBFGS`` (ase 3.29); only the step is different code: the engine's per-system
transforms (:func:`kups_relax.ase.steps.lbfgs_transform`) compute it, so the path
is ASE's to round-off.

Two paths, one state:

* **host path** (any ASE calculator, filters, any constraint, and always for
  ``irun``/``step``): ASE's own ``Dynamics.irun``; each step asks the optimizable
  for its coordinates and gradient (``get_x``/``get_gradient``, so a cell filter's
  extra rows are just more rows of the system) and one jitted call computes the step.
* **fast path** (``run()`` on a plain ``Atoms`` whose calculator is
  :class:`kups_relax.ase.Calculator`, constraints the engine supports: ``FixAtoms``,
  ``FixCartesian``, ``FixedLine``, ``FixedPlane``, ``FixCom``):
  the whole relaxation runs in the engine's jitted loop
  (:class:`kups_relax.ase.fast.LoopRelaxation`). Afterwards every recorded step is
  replayed on the ``Atoms`` (positions, cached energy/forces), so log lines,
  trajectory frames and observers are those of the host path. The differences:
  they are written when the loop has finished (log times are those of writing),
  an observer that changes the atoms cannot steer the relaxation, and a restart
  file is written once, at the end of ``run``, not after every step.
  ``irun()`` and ``step()`` always take the host path (a generator hands control
  back after every step).

Both paths keep the optimizer state in the same layout, so ``run`` can be called
again (on either path) and continues exactly. Restart files use the layout of
``ase.optimize.LBFGS`` (``iteration, s, y, rho, r0, f0, e0, task``), plus the cell
filter's ``orig_cell`` when a cell filter is optimized (as ``ase.optimize.BFGS``
does), so that a restart continues exactly there too.
"""

from __future__ import annotations

import logging
import warnings
from typing import IO

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.optimize.optimize import DEFAULT_MAX_STEPS, Dynamics, OptimizableAtoms, Optimizer

from kups_relax.precision import x64

from .calculator import Calculator
from .fast import LoopRelaxation, fast_path_calculator
from .steps import HostSteps

logger = logging.getLogger(__name__)


class LBFGS(Optimizer):
    """Limited-memory BFGS with the arguments and defaults of ``ase.optimize.LBFGS``.

    Args:
        atoms: the ``Atoms`` (or filter, or any ASE optimizable) to relax.
        restart: restart file (JSON, ASE's LBFGS layout); read if it exists, written every step.
        logfile: file object or name; ``'-'`` for stdout, ``None`` for no log.
        trajectory: trajectory file name or open trajectory.
        maxstep: largest displacement of any row in one step, Å (default 0.2; at most 1.0).
        memory: number of past steps kept (default 100).
        damping: factor applied to every step (default 1.0).
        alpha: initial Hessian guess, eV/Å² (default 70).
        use_line_search: must be ``False`` (use ``ase.optimize.LBFGSLineSearch`` for a line search).
        **kwargs: passed to ``ase.optimize.Optimizer`` (``append_trajectory``, ``master``,
            ``comm``, ``loginterval``).
    """

    def __init__(
        self,
        atoms: Atoms,
        restart: str | None = None,
        logfile: IO | str | None = "-",
        trajectory: str | None = None,
        maxstep: float | None = None,
        memory: int = 100,
        damping: float = 1.0,
        alpha: float = 70.0,
        use_line_search: bool = False,
        **kwargs,
    ):
        if use_line_search:
            raise ValueError("kups_relax.ase.LBFGS has no line search; use ase.optimize.LBFGSLineSearch")
        # alpha is kept private: ase.optimize.LBFGS has no `alpha` attribute, and todict() would list it
        self.memory = int(memory)
        self._alpha = float(alpha)
        self._steps: HostSteps | None = None
        super().__init__(atoms, restart, logfile, trajectory, **kwargs)
        self.maxstep = self.defaults["maxstep"] if maxstep is None else maxstep
        if self.maxstep > 1.0:
            raise ValueError("You are using a much too large value for the maximum step size: "
                             "%.1f Angstrom" % self.maxstep)
        self.damping = damping
        self.use_line_search = False
        self.p = None
        self.function_calls = 0
        self.force_calls = 0

    # -- state ---------------------------------------------------------------------------

    def _new_steps(self) -> HostSteps:
        ndofs = self.optimizable.ndofs()
        if ndofs % 3:
            raise ValueError(f"{type(self.optimizable).__name__} has {ndofs} degrees of freedom, not rows of three")
        return HostSteps([ndofs // 3], memory=self.memory, alpha=self._alpha)

    def initialize(self):
        """Forget the history (ASE's ``LBFGS.initialize``)."""
        self._steps = self._new_steps()
        self.r0 = None
        self.f0 = None
        self.e0 = None
        self.task = "START"
        self.load_restart = False

    def read(self):
        """Continue from the restart file (ASE's LBFGS layout, plus a cell filter's ``orig_cell``)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = self.load()
        iteration, s, y, rho, r0, f0, e0, task = data[:8]
        restored_cell = len(data) > 8 and data[8] is not None and hasattr(self.atoms, "orig_cell")
        for w in caught:
            if not (restored_cell and "orig_cell" in str(w.message)):
                warnings.warn(w.message, w.category, stacklevel=2)
        self._steps = self._new_steps()
        self._steps.set_history(iteration, s, y, rho, r0, f0)
        if restored_cell:
            self.atoms.orig_cell = np.asarray(data[8], dtype=np.float64)
        self.r0 = None if r0 is None else np.asarray(r0)
        self.f0 = None if f0 is None else np.asarray(f0)
        self.e0, self.task = e0, task
        self.load_restart = True

    def _dump_restart(self):
        if self.restart is None:
            return
        h = self._steps.history()
        data = (h["iteration"], h["s"], h["y"], h["rho"], h["r0"], h["f0"], self.e0, self.task)
        orig_cell = getattr(self.atoms, "orig_cell", None)
        if orig_cell is not None:
            data += (np.asarray(orig_cell),)
        self.dump(data)

    def _replay_trajectory(self, traj):
        """Rebuild the history from the frames of an earlier relaxation (ASE's ``replay_trajectory``)."""
        positions = [traj[i].get_positions().ravel() for i in range(len(traj) - 1)]
        forces = [traj[i].get_forces().ravel() for i in range(len(traj) - 1)]
        s, y, rho = [], [], []
        for k in range(1, len(positions)):
            s0 = positions[k] - positions[k - 1]
            y0 = forces[k - 1] - forces[k]  # gradient difference
            s.append(s0)
            y.append(y0)
            rho.append(1.0 / np.dot(y0, s0))
        s, y, rho = s[-self.memory:], y[-self.memory:], rho[-self.memory:]
        self.r0 = positions[-1] if positions else None
        self.f0 = forces[-1] if forces else None
        self._steps = self._new_steps()
        self._steps.set_history(len(positions), s, y, rho, self.r0, self.f0)

    # -- host path -----------------------------------------------------------------------

    def step(self, forces=None):
        """Take one step: gradient and coordinates from the optimizable, the step from the engine."""
        gradient = self._get_gradient(forces)
        x = self.optimizable.get_x()
        (dr,) = self._steps.step([x], [gradient], [True], self.maxstep, self.damping)
        dr = dr.ravel()
        self.p = dr / self.damping if self.damping else dr
        self.force_calls += 1
        self.function_calls += 1
        self.optimizable.set_x(x + dr)
        self.r0 = x
        self.f0 = -gradient
        self._dump_restart()

    # -- fast path -----------------------------------------------------------------------

    def _fast_calculator(self) -> Calculator | None:
        if type(self.optimizable) is not OptimizableAtoms or type(self).step is not LBFGS.step:
            return None
        return fast_path_calculator(self.atoms)

    def run(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS) -> bool:
        """Run until every force is below ``fmax`` (eV/Å) or ``steps`` more steps were taken.

        Returns whether the forces are converged. On the fast path (see the module
        docstring) the steps run in the engine's jitted loop.
        """
        self.fmax = fmax
        calc = self._fast_calculator()
        if calc is None:
            return Dynamics.run(self, steps=steps)
        return self._run_in_loop(calc, steps)

    def _run_in_loop(self, calc: Calculator, steps: int) -> bool:
        atoms = self.atoms
        self.max_steps = self.nsteps + steps
        relaxation = LoopRelaxation(atoms, self._steps.transform(self.maxstep, self.damping), self.fmax,
                                    steps, opt_state=self._steps.state)
        calc.set_results(atoms, relaxation.energy, relaxation.forces)
        gradient = self.optimizable.get_gradient()
        if self.nsteps == 0:
            self.log(gradient)
            if self.trajectory is None or self._traj_is_empty():
                self._observe(calc)
        if self.gradient_converged(gradient) or self.nsteps >= self.max_steps:
            return self.gradient_converged(gradient)

        # ASE's Log keeps its target in _logfile (None: no log); unknown layouts get the log
        replay = bool(self.observers) or getattr(self.logfile, "_logfile", "-") is not None
        frames = relaxation.run(record=replay)
        if replay:
            for frame in frames:
                atoms.set_positions(frame.positions, apply_constraint=False)
                calc.set_results(atoms, frame.energy, frame.forces)
                self.nsteps += 1
                self.log(self.optimizable.get_gradient())
                self._observe(calc)
        else:
            self.nsteps += len(frames)
        final = relaxation.final
        atoms.set_positions(final.positions, apply_constraint=False)
        calc.set_results(atoms, final.energy, final.forces)
        self.force_calls += len(frames)
        self.function_calls += len(frames)
        self._steps.state = _as_float64(relaxation.opt_state)
        history = self._steps.history()
        self.r0, self.f0 = history["r0"], history["f0"]
        self._dump_restart()

        converged = self.gradient_converged(self.optimizable.get_gradient())
        if not converged and self.nsteps < self.max_steps and relaxation.status != "diverged":
            # the loop judged convergence in its own arithmetic; finish ASE's way on the host
            return Dynamics.run(self, steps=self.max_steps - self.nsteps)
        return converged

    def _observe(self, calc: Calculator):
        """Call the observers; the trajectory writer only stores results already computed, so add the stress."""
        if self.trajectory is not None and self.atoms.cell.rank == 3:
            calc.get_property("stress", self.atoms)
        self.call_observers()


@x64
def _as_float64(state):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
