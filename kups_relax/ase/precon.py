"""``kups_relax.ase.PreconLBFGS``: a drop-in for ``ase.optimize.precon.PreconLBFGS``.

The constructor, attributes, log lines, trajectory files, observers and ``run``/``irun`` are
ASE's (ase 3.29; this class is a subclass). When ``run()`` is called on a plain ``Atoms``
whose calculator is :class:`kups_relax.ase.Calculator` (constraints the engine supports, no
filter, ``use_armijo=True``, the ``Exp`` preconditioner or none, a fresh optimizer), the whole
relaxation runs in the engine's jitted loop with
:class:`~kups_relax.transforms.precon_lbfgs.PreconLBFGS` (the same path as ASE's to
round-off: same steps, same force evaluations but the one ASE repeats), and every step is
then replayed on the ``Atoms`` for the log, trajectory and observers, as
:class:`kups_relax.ase.LBFGS` does. Anything else (another calculator, a filter,
``variable_cell=True``, a Wolfe line search, rigid units, ``irun``/``step``) runs ASE's own code.
"""

from __future__ import annotations

import logging

from ase import Atoms
from ase.optimize.optimize import DEFAULT_MAX_STEPS
from ase.optimize.precon import Exp
from ase.optimize.precon.lbfgs import PreconLBFGS as _AsePreconLBFGS

from kups_relax.transforms import PreconLBFGS as PreconLBFGSTransform

from .calculator import Calculator
from .fast import LoopRelaxation, fast_path_calculator

logger = logging.getLogger(__name__)

__all__ = ["PreconLBFGS"]


class PreconLBFGS(_AsePreconLBFGS):
    """ASE's ``PreconLBFGS`` (same arguments and defaults: ``maxstep`` 0.04 Å, ``memory`` 100,
    ``alpha`` 70 eV/Å², ``precon='auto'``, ``use_armijo=True``, ``c1`` 0.23, ``a_min`` 1e-10)
    whose ``run`` relaxes inside the engine's jitted loop when the calculator is ours (see the
    module docstring)."""

    def __init__(self, atoms: Atoms, *args, precon="auto", **kwargs):
        self._precon_argument = precon
        super().__init__(atoms, *args, precon=precon, **kwargs)

    def _transform(self) -> PreconLBFGSTransform | None:
        """The engine's equivalent of this optimizer's settings, or ``None`` if it has none."""
        if not self.use_armijo or self.rigid_units is not None or self.Hinv is not None:
            return None
        precon = self._precon_argument
        if precon is None or precon == "ID":
            kind, exp = None, Exp()
        elif isinstance(precon, str) and precon in ("auto", "Exp"):
            kind, exp = precon, Exp()
        elif type(precon) is Exp and precon.P is None and precon.dim == 3 and not precon.estimate_mu_eigmode \
                and precon.apply_positions and not precon.reinitialize:
            kind, exp = "Exp", precon
        else:
            return None
        return PreconLBFGSTransform(maxstep=float(self.maxstep), memory=int(self.memory), alpha=1.0 / self.H0,
                                    precon=kind, A=float(exp.A), r_cut=exp.r_cut, r_NN=exp.r_NN, mu=exp.mu,
                                    c_stab=float(exp.c_stab), force_stab=bool(exp.force_stab), c1=float(self.c1),
                                    a_min=float(self.a_min))

    def _fast_calculator(self) -> Calculator | None:
        if self._actual_atoms is not self.atoms or self.nsteps != 0 or self.iteration != 0:
            return None
        if type(self).step is not PreconLBFGS.step:
            return None
        return fast_path_calculator(self.atoms)

    def run(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS, smax=None) -> bool:
        """Run until every force is below ``fmax`` (eV/Å) or ``steps`` steps were taken; returns
        whether the forces are converged. On the fast path the steps run in the jitted loop."""
        calc = self._fast_calculator()
        transform = self._transform() if calc is not None else None
        if transform is None:
            return super().run(fmax=fmax, steps=steps, smax=smax)
        self.fmax = fmax
        self.smax = fmax if smax is None else smax
        return self._run_in_loop(calc, transform, steps)

    def _run_in_loop(self, calc: Calculator, transform: PreconLBFGSTransform, steps: int) -> bool:
        atoms = self.atoms
        self.max_steps = steps
        relaxation = LoopRelaxation(atoms, transform, self.fmax, steps)
        calc.set_results(atoms, relaxation.energy, relaxation.forces)
        gradient = self.optimizable.get_gradient()
        self.log(gradient)
        self.call_observers()
        if self.gradient_converged(gradient) or steps <= 0:
            return self.gradient_converged(gradient)
        replay = bool(self.observers) or getattr(self.logfile, "_logfile", "-") is not None
        frames = relaxation.run(record=replay)
        for frame in frames:
            self.nsteps += 1
            if replay:
                atoms.set_positions(frame.positions, apply_constraint=False)
                calc.set_results(atoms, frame.energy, frame.forces)
                self.e1 = frame.energy
                self.log(self.optimizable.get_gradient())
                self.call_observers()
        final = relaxation.final
        atoms.set_positions(final.positions, apply_constraint=False)
        calc.set_results(atoms, final.energy, final.forces)
        self.e1 = final.energy
        self.n_evaluations = int(relaxation.state.evaluations[0])
        if relaxation.status != "converged" and relaxation.status != "unconverged":
            logger.warning("PreconLBFGS in the loop stopped: %s", relaxation.status)
        return self.gradient_converged(self.optimizable.get_gradient())
