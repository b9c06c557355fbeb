"""An ASE ``Calculator`` for any potential of :mod:`potentials`.

``Calculator(potential)`` gives energy, free energy, forces and stress of one
``Atoms`` at a time with the engine's code (:func:`kups_relax.evaluate.evaluate`),
so a potential written once for the batched engine also drives ASE's molecular
dynamics, filters, NEB, vibrations and optimizers.

The structure is packed like a one-structure batch (atom capacity rounded up
to a bucket), so every structure of similar size reuses one compiled program.
The neighbor list (Verlet skin) is kept between calls: moving atoms by less than
half the skin reuses it; a changed cell rebuilds it; a changed composition,
size or periodicity allocates a new one.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from kups_relax import neighbors as nl
from kups_relax.batch import Batch, full_3x3_to_voigt
from kups_relax.engine import DEFAULT_SKIN
from kups_relax.evaluate import Evaluation, evaluate
from kups_relax.precision import x64

logger = logging.getLogger(__name__)


@jax.jit
def _evaluate(potential, geometry, neighbors: nl.NeighborList, rebuild: jax.Array):
    """Rebuild the neighbor list if ``rebuild`` (a new cell) or the skin is used up, then evaluate."""
    neighbors = jax.lax.cond(
        rebuild | nl.needs_rebuild(neighbors, geometry.positions),
        lambda: nl.rebuild(neighbors, geometry),
        lambda: neighbors,
    )
    return evaluate(potential, geometry, neighbors), neighbors


class Calculator(AseCalculator):
    """ASE calculator running a :mod:`potentials` potential (energy eV, forces eV/Å, stress eV/Å³).

    Args:
        potential: any potential implementing :class:`potentials.base.Potential`,
            e.g. ``potentials.LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5)``.
        skin: Verlet skin of the neighbor list, Å.
        dtype: ``"float64"`` (default) or ``"float32"``; results are returned as float64.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``).

    ``stress`` (Voigt order, ASE's sign convention) is available when the cell has
    three lattice vectors (as for ASE's EMT and LennardJones); ``free_energy`` equals
    ``energy``. Optimizers of :mod:`kups_relax.ase` recognise this calculator and run
    the whole relaxation in the engine's jitted loop.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    ignored_changes = {"initial_charges", "initial_magmoms"}

    def __init__(self, potential, *, skin: float = DEFAULT_SKIN, dtype: str = "float64", **kwargs):
        super().__init__(**kwargs)
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        self.potential = potential
        self.skin = float(skin)
        self.dtype = dtype
        self._neighbors: nl.NeighborList | None = None
        self._layout: tuple | None = None  # (numbers, pbc) the neighbor list was made for
        self._cell: np.ndarray | None = None  # cell at the last neighbor build

    def _get_name(self) -> str:
        return "kups_relax"

    def todict(self) -> dict:
        """The potential's name and plain parameters (written to trajectory files)."""
        out = {"potential": type(self.potential).__name__, "skin": self.skin, "dtype": self.dtype}
        if dataclasses.is_dataclass(self.potential):
            for field in dataclasses.fields(self.potential):
                value = getattr(self.potential, field.name)
                if isinstance(value, (bool, int, float, str)) or value is None:
                    out[field.name] = value
                elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
                    out[field.name] = list(value)
        return out

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        """Compute energy, free energy, forces and (3-D cells) stress of ``atoms`` in one pass.

        When nothing changed since the last call, results already present (for instance
        recorded by the engine's loop) are kept and only missing ones are added.
        """
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        has_stress = atoms.cell.rank == 3
        if "stress" in properties and not has_stress:
            raise PropertyNotImplementedError("stress needs a cell with three lattice vectors")
        energy, forces, stress = self.evaluate(atoms)
        results = {"energy": energy, "free_energy": energy, "forces": forces}
        if has_stress:
            results["stress"] = full_3x3_to_voigt(stress)
        if system_changes:
            self.results = results
        else:
            for key, value in results.items():
                self.results.setdefault(key, value)

    @x64
    def evaluate(self, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
        """Energy (eV), forces ``(N, 3)`` (eV/Å) and full stress ``(3, 3)`` (eV/Å³) of ``atoms``.

        Does not touch the ASE results cache. Constraints are ignored (ASE applies
        them to the forces itself).
        """
        self._check_elements(atoms)
        plain = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        geometry = Batch.from_atoms([plain], dtype=self.dtype).geometry
        layout = (atoms.numbers.tobytes(), tuple(bool(p) for p in atoms.pbc))
        cell = np.array(atoms.cell.array)
        if self._neighbors is None or layout != self._layout or self._neighbors.reference_positions.shape != geometry.positions.shape:
            self._neighbors = nl.allocate(geometry, self.potential.cutoff, self.skin)
            self._layout, self._cell = layout, cell
            rebuild = False
        else:
            rebuild = not np.array_equal(cell, self._cell)
        ev, neighbors = _evaluate(self.potential, geometry, self._neighbors, np.bool_(rebuild))
        if bool(neighbors.overflow):
            grown = nl.grow(neighbors, geometry)
            logger.debug("neighbor list overflow: %s -> %s", neighbors.capacities, grown.capacities)
            ev, neighbors = _evaluate(self.potential, geometry, grown, np.bool_(False))
        self._neighbors, self._cell = neighbors, cell
        return self._host(ev, len(atoms))

    @staticmethod
    def _host(ev: Evaluation, n: int) -> tuple[float, np.ndarray, np.ndarray]:
        energy = float(np.asarray(ev.energy)[0])
        forces = np.asarray(ev.forces, dtype=np.float64)[:n]
        stress = np.asarray(ev.stress, dtype=np.float64)[0]
        return energy, forces, stress

    def set_results(self, atoms: Atoms, energy: float, forces: np.ndarray, stress: np.ndarray | None = None) -> None:
        """Cache results computed elsewhere (the engine's loop) for ``atoms`` as they are now.

        ASE then reads them without recomputing; anything missing (stress) is computed
        on demand. ``stress`` is a full ``(3, 3)`` tensor or ASE's Voigt 6-vector, eV/Å³.
        """
        self.atoms = atoms.copy()
        energy = float(energy)
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": np.array(forces, dtype=np.float64)}
        if stress is not None and atoms.cell.rank == 3:
            stress = np.asarray(stress, dtype=np.float64)
            self.results["stress"] = stress.copy() if stress.shape == (6,) else full_3x3_to_voigt(stress)

    def _check_elements(self, atoms: Atoms) -> None:
        supported = self.potential.supported_numbers
        if supported is None:
            return
        missing = sorted(set(atoms.numbers.tolist()) - set(supported))
        if missing:
            names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in missing)
            raise ValueError(f"structure {atoms.get_chemical_formula()!r}: element(s) {names} not covered by "
                             f"{type(self.potential).__name__}")
