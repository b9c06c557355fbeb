"""Per-system optimizer transforms (``init``/``update``/``reset``), composed with :func:`chain`."""

from .base import Chain, EmptyState, Scale, SystemIndex, Transform, chain
from .fire import Fire, FireState
from .lbfgs import ScaleByAseLbfgs, ScaleByAseLbfgsState
from .max_step import MaxStepSize
from .optax_adapter import OptaxState, OptaxTransform, optax_optimizer
from .optax_spec import is_optax_spec


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


__all__ = [
    "Chain", "EmptyState", "Fire", "FireState", "MaxStepSize", "OptaxState", "OptaxTransform",
    "Scale", "ScaleByAseLbfgs", "ScaleByAseLbfgsState", "SystemIndex", "Transform", "ase_fire", "ase_lbfgs", "chain",
    "is_optax_spec", "optax_optimizer",
]
