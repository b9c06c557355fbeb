"""Per-system optimizer transforms (``init``/``update``/``reset``), composed with :func:`chain`."""

from .base import Chain, EmptyState, Scale, SystemIndex, Transform, chain
from .lbfgs import ScaleByAseLbfgs, ScaleByAseLbfgsState
from .max_step import MaxStepSize, MaxStepSizeState


def ase_lbfgs(maxstep: float = 0.2, memory: int = 100, damping: float = 1.0, alpha: float = 70.0) -> Chain:
    """The transform chain equivalent to ``ase.optimize.LBFGS`` (same argument names and defaults)."""
    parts = [ScaleByAseLbfgs(memory_size=memory, alpha=alpha), MaxStepSize(max_step=maxstep)]
    if damping != 1.0:
        parts.append(Scale(damping))
    return chain(*parts)


__all__ = [
    "Chain", "EmptyState", "MaxStepSize", "MaxStepSizeState", "Scale", "ScaleByAseLbfgs",
    "ScaleByAseLbfgsState", "SystemIndex", "Transform", "ase_lbfgs", "chain",
]
