"""Per-system optimizer transforms (``init``/``update``/``reset``), composed with :func:`chain`."""

from .base import Chain, EmptyState, Scale, SystemIndex, Transform, chain
from .fire import Fire, FireState
from .lbfgs import ScaleByAseLbfgs, ScaleByAseLbfgsState
from .max_step import MaxStepSize
from .optax_adapter import OptaxState, OptaxTransform, optax_optimizer
from .optax_spec import is_optax_spec
from .precon_lbfgs import PreconLBFGS, PreconLBFGSState


def ase_lbfgs(maxstep: float = 0.2, memory: int = 100, damping: float = 1.0, alpha: float = 70.0) -> Chain:
    """The transform chain equivalent to ``ase.optimize.LBFGS`` (same argument names and defaults)."""
    parts = [ScaleByAseLbfgs(memory_size=memory, alpha=alpha), MaxStepSize(max_step=maxstep)]
    if damping != 1.0:
        parts.append(Scale(damping))
    return chain(*parts)


def ase_fire(dt: float = 0.1, maxstep: float = 0.2, dtmax: float = 1.0, Nmin: int = 5, finc: float = 1.1,
             fdec: float = 0.5, astart: float = 0.1, fa: float = 0.99, a: float = 0.1) -> Fire:
    """The transform equivalent to ``ase.optimize.FIRE`` (same argument names and defaults;
    ``downhill_check`` is off, as ASE's default). Its step control (``maxstep`` on the norm of a
    system's whole displacement) is part of :class:`Fire`."""
    return Fire(dt=dt, maxstep=maxstep, dtmax=dtmax, Nmin=Nmin, finc=finc, fdec=fdec, astart=astart, fa=fa, a=a)


def precon_lbfgs(maxstep: float = 0.04, memory: int = 100, alpha: float = 70.0, precon: str | None = "auto",
                 A: float = 3.0, r_cut: float | None = None, r_NN: float | None = None, mu: float | None = None,
                 c_stab: float = 0.1, force_stab: bool = False, c1: float = 0.23, a_min: float = 1e-10,
                 solve_tol: float = 1e-12) -> PreconLBFGS:
    """The optimizer equivalent to ``ase.optimize.precon.PreconLBFGS`` with ASE's ``Exp``
    preconditioner and Armijo line search (same argument names and defaults: ``precon="auto"``
    is Exp for systems of >= 100 atoms and none below; pass ``precon="Exp"`` to force it).
    See :class:`~kups_relax.transforms.precon_lbfgs.PreconLBFGS`."""
    return PreconLBFGS(maxstep=maxstep, memory=memory, alpha=alpha, precon=precon, A=A, r_cut=r_cut, r_NN=r_NN,
                       mu=mu, c_stab=c_stab, force_stab=force_stab, c1=c1, a_min=a_min, solve_tol=solve_tol)


__all__ = [
    "Chain", "EmptyState", "Fire", "FireState", "MaxStepSize", "OptaxState", "OptaxTransform", "PreconLBFGS", "PreconLBFGSState",
    "Scale", "ScaleByAseLbfgs", "ScaleByAseLbfgsState", "SystemIndex", "Transform", "ase_fire", "ase_lbfgs", "chain", "precon_lbfgs",
    "is_optax_spec", "optax_optimizer",
]
