"""ASE interoperability: an optimizer drop-in, a calculator, and a batch form.

* :class:`LBFGS` -- ``ase.optimize.LBFGS`` with the engine computing the steps;
  with :class:`Calculator` attached, ``run()`` relaxes inside the jitted loop.
* :class:`FIRE` -- ``ase.optimize.FIRE`` with the engine computing the steps.
* :class:`PreconLBFGS` -- ``ase.optimize.precon.PreconLBFGS``; with :class:`Calculator`
  attached, ``run()`` relaxes inside the jitted loop.
* :class:`Calculator` -- any potential of :mod:`potentials` as an ASE calculator.
* :func:`relax_many` -- many ``Atoms`` with calculators attached, in one call.

>>> from ase.cluster import Icosahedron
>>> from kups_relax.ase import LBFGS, Calculator
>>> from potentials import LennardJones
>>> atoms = Icosahedron("Ar", 2)
>>> atoms.rattle(0.1, seed=1)
>>> atoms.calc = Calculator(LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5))
>>> bool(LBFGS(atoms, logfile=None).run(fmax=0.01))
True

(This package is named ``kups_relax.ase``; inside it, ``import ase`` still means ASE.)
"""

from __future__ import annotations

from .calculator import Calculator
from .fire import FIRE
from .many import relax_many
from .optimizer import LBFGS
from .precon import PreconLBFGS

__all__ = ["Calculator", "FIRE", "LBFGS", "PreconLBFGS", "relax_many"]
