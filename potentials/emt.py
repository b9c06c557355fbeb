"""Effective medium theory (EMT) with the semantics of ``ase.calculators.emt.EMT``.

Formulation of Jacobsen, Stoltze and Nørskov, Surf. Sci. 366, 394 (1996), with
ASE's parameters and conventions (ASE's ``parameters`` table, ``beta = 1.809``,
energies relative to the isolated-atom reference ``E0`` as in ASAP).

For an atom ``i`` of element ``a`` with neighbours ``j`` of elements ``b`` at
distance ``r`` (inside the neighbor-search radius ``rc_list``):

* smooth cutoff ``w(r) = 1 / (1 + exp(acut (r - rc)))``;
* neutral-sphere density ``sigma1_i = sum_j chi_ab w exp(-eta2_b (r - beta s0_b))``
  with ``chi_ab = n0_b / n0_a``;
* neutral-sphere radius ``s_i - s0_a = -log(sigma1_i / (12 gamma1_a)) / (beta eta2_a)``;
* cohesive energy ``E_c = E0_a (1 + lambda_a ds) exp(-lambda_a ds) + 6 V0_a exp(-kappa_a ds)``
  (the second term is ASAP's second term of the atomic-sphere correction);
* pair term ``E_AS = 1/2 sum_j 1/2 [-V0_a/(2 gamma2_a) chi_ab w exp(-kappa_b (r/beta - s0_b))
  - V0_b/(2 gamma2_b) w exp(-kappa_a (r/beta - s0_a)) / chi_ab]``;
* atomic energy ``E_i = E_c + E_AS - E0_a`` (an atom without neighbours has ``E_i = -E0_a``).

The cutoff depends on the structure: ``rc`` (midpoint of the logistic cutoff, the
mean of the 3rd and 4th FCC neighbour distances), ``acut`` (its slope, chosen so
``w = 1e-4`` at the 4th neighbour distance) and hence the reference quantities
``gamma1, gamma2`` all derive from the largest ``s0`` -- over the whole table
(ASE's default) or over the elements present in the structure (``asap_cutoff=True``,
where also ``rc_list = 1.045 rc`` instead of ``rc + 0.5 Å``). In a batch every
system has its own elements, so these are computed per system on the device.
Pairs beyond their system's ``rc_list`` contribute exactly zero (ASE drops them
from its neighbor list), so the host-side list radius :attr:`EMT.cutoff` only
needs to be an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import chemical_symbols
from ase.units import Bohr

from kups_relax.batch import Geometry
from kups_relax.evaluate import EnergyForces
from kups_relax.neighbors import NeighborList
from kups_relax.pairs import gather_neighbors, pair_forces, pair_geometry, pair_virial
from kups_relax.segments import segment_any, segment_max, segment_sum

#: ASE's EMT parameters (``ase.calculators.emt.parameters``; Jacobsen et al. 1996 for the
#: metals; H, C, N, O are ASE's "just for fun" values, not for serious use), in ASE's units:
#: ``E0`` eV, ``s0`` bohr, ``V0`` eV, ``eta2``, ``kappa``, ``lambda`` 1/bohr, ``n0`` 1/bohr³.
PARAMETERS: dict[str, tuple[float, float, float, float, float, float, float]] = {
    #      E0     s0    V0     eta2   kappa  lambda n0
    "Al": (-3.28, 3.00, 1.493, 1.240, 2.000, 1.169, 0.00700),
    "Cu": (-3.51, 2.67, 2.476, 1.652, 2.740, 1.906, 0.00910),
    "Ag": (-2.96, 3.01, 2.132, 1.652, 2.790, 1.892, 0.00547),
    "Au": (-3.80, 3.00, 2.321, 1.674, 2.873, 2.182, 0.00703),
    "Ni": (-4.44, 2.60, 3.673, 1.669, 2.757, 1.948, 0.01030),
    "Pd": (-3.90, 2.87, 2.773, 1.818, 3.107, 2.155, 0.00688),
    "Pt": (-5.85, 2.90, 4.067, 1.812, 3.145, 2.192, 0.00802),
    "H": (-3.21, 1.31, 0.132, 2.652, 2.790, 3.892, 0.00547),
    "C": (-3.50, 1.81, 0.332, 1.652, 2.790, 1.892, 0.01322),
    "N": (-5.10, 1.88, 0.132, 1.652, 2.790, 1.892, 0.01222),
    "O": (-4.60, 1.95, 0.332, 1.652, 2.790, 1.892, 0.00850),
}

#: ``(16 pi / 3)**(1/3) / sqrt(2)`` with ASE's historical rounding: FCC nearest-neighbour
#: distance over Wigner-Seitz radius.
BETA = 1.809

#: Value of the logistic cutoff at the 4th FCC neighbour distance.
_CUTOFF_EPS = 1e-4

#: Atomic numbers of the elements with EMT parameters.
EMT_NUMBERS: frozenset[int] = frozenset(chemical_symbols.index(s) for s in PARAMETERS)


def _table() -> dict[str, np.ndarray]:
    """Parameters in Å/eV units as ``(119,)`` arrays indexed by atomic number.

    Rows of elements without parameters hold copper's values (harmless numbers for
    padding atoms, whose results are masked); ``known`` marks the real rows.
    """
    n = len(chemical_symbols)
    names = ("E0", "s0", "V0", "eta2", "kappa", "lambda", "n0")
    scale = (1.0, Bohr, 1.0, 1.0 / Bohr, 1.0 / Bohr, 1.0 / Bohr, 1.0 / Bohr**3)
    out = {name: np.full(n, PARAMETERS["Cu"][k] * scale[k]) for k, name in enumerate(names)}
    known = np.zeros(n, dtype=bool)
    for symbol, values in PARAMETERS.items():
        z = chemical_symbols.index(symbol)
        known[z] = True
        for k, name in enumerate(names):
            out[name][z] = values[k] * scale[k]
    out["known"] = known
    return out


_TABLE = _table()

#: EMT's elements as a compact species index: ``_SPECIES[Z]`` (elements without parameters get
#: copper's index; ``known`` marks them), and each species' atomic number.
_SPECIES_Z = np.array(sorted(EMT_NUMBERS), dtype=np.int64)
_SPECIES = np.full(len(chemical_symbols), int(np.searchsorted(_SPECIES_Z, chemical_symbols.index("Cu"))), np.int32)
_SPECIES[_SPECIES_Z] = np.arange(len(_SPECIES_Z), dtype=np.int32)


def _max_s0(numbers: Iterable[int]) -> float:
    """Largest ``s0`` (Å) over ``numbers``."""
    return max(float(_TABLE["s0"][z]) for z in numbers)


def cutoff_parameters(max_s0, asap_cutoff: bool):
    """ASE's ``EMT._calc_cutoff`` from the largest Wigner-Seitz radius ``max_s0`` (Å).

    Works on Python floats and on arrays (one entry per system).

    Returns:
        ``(rc, rc_list, acut)``: midpoint of the logistic cutoff (Å), radius beyond
        which pairs are ignored (Å) and the slope of the cutoff (1/Å).
    """
    r1nn = BETA * max_s0
    rc = r1nn * 0.5 * (math.sqrt(3.0) + 2.0)
    r4nn = 2.0 * r1nn
    acut = math.log(1.0 / _CUTOFF_EPS - 1.0) / (r4nn - rc)
    rc_list = rc * 1.045 if asap_cutoff else rc + 0.5
    return rc, rc_list, acut


def _gammas(s0, eta2, kappa, rc, acut):
    """ASE's reference sums ``gamma1, gamma2`` of a perfect FCC crystal (1st-3rd shells).

    All arguments broadcast together (per atom here); lengths in Å.
    """
    gamma1 = gamma2 = 0.0
    for count, factor in ((12.0, 1.0), (6.0, 2.0), (24.0, 3.0)):
        r = BETA * s0 * math.sqrt(factor)
        x = count * (1.0 / (1.0 + jnp.exp(acut * (r - rc)))) / 12.0
        gamma1 = gamma1 + x * jnp.exp(-eta2 * (r - BETA * s0))
        gamma2 = gamma2 + x * jnp.exp(-kappa / BETA * (r - BETA * s0))
    return gamma1, gamma2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EMT:
    """ASE's EMT for a batch (``ase.calculators.emt.EMT``).

    Attributes:
        asap_cutoff: ASE's ``asap_cutoff``: take the cutoff from the largest atom present
            in each system (and ``rc_list = 1.045 rc``) instead of from the whole table.
        elements: atomic numbers this instance will see (static); they set
            :attr:`supported_numbers` and, with ``asap_cutoff``, the neighbor-list radius
            :attr:`cutoff`. Default: every element of :data:`PARAMETERS`. Use
            :meth:`for_numbers` to build one for known elements.
    """

    asap_cutoff: bool = dataclasses.field(default=False, metadata=dict(static=True))
    elements: tuple[int, ...] = dataclasses.field(
        default=tuple(sorted(EMT_NUMBERS)), metadata=dict(static=True))

    def __post_init__(self):
        elements = tuple(sorted(set(int(z) for z in self.elements)))
        missing = [z for z in elements if z not in EMT_NUMBERS]
        if missing or not elements:
            names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in missing)
            raise ValueError(f"EMT has no parameters for element(s) {names or '(none given)'}; "
                             f"supported: {', '.join(PARAMETERS)}")
        object.__setattr__(self, "elements", elements)

    @classmethod
    def for_numbers(cls, numbers: Iterable[int], asap_cutoff: bool = False) -> "EMT":
        """An EMT for structures made of the atomic numbers in ``numbers`` (e.g. ``atoms.numbers``).

        With ``asap_cutoff=True`` the neighbor-list radius shrinks to what these
        elements need; structures with other elements are rejected by ``relax``.
        """
        return cls(asap_cutoff=asap_cutoff, elements=tuple(np.unique(np.asarray(list(numbers), dtype=int))))

    @property
    def supported_numbers(self) -> frozenset[int]:
        return frozenset(self.elements)

    @property
    def cutoff(self) -> float:
        """Neighbor-list radius, Å: the largest ``rc_list`` any system can have."""
        numbers = self.elements if self.asap_cutoff else EMT_NUMBERS
        return float(cutoff_parameters(_max_s0(numbers), self.asap_cutoff)[1])

    def system_cutoffs(self, geometry: Geometry) -> jax.Array:
        """``(S,)`` every system's list radius ``rc_list``, Å (with ``asap_cutoff``, from the
        elements present; else ASE's constant): pairs beyond it contribute nothing."""
        return self._cutoffs(geometry)[2]

    def _cutoffs(self, geometry: Geometry):
        """``(rc, acut, rc_list)`` per system ``(S,)`` (asap) or as constants broadcast to ``(S,)``."""
        S = geometry.n_systems
        dtype = geometry.positions.dtype
        table_max = _max_s0(EMT_NUMBERS)
        if self.asap_cutoff:
            z = jnp.clip(geometry.numbers, 0, len(chemical_symbols) - 1)
            s0 = jnp.asarray(_TABLE["s0"], dtype)[z]
            known = jnp.asarray(_TABLE["known"])[z]
            present = segment_max(jnp.where(geometry.atom_mask & known, s0, -jnp.inf), geometry.system, S)
            max_s0 = jnp.where(jnp.isfinite(present), present, table_max)
            rc, rc_list, acut = cutoff_parameters(max_s0, True)
        else:
            rc, rc_list, acut = (jnp.full(S, x, dtype) for x in cutoff_parameters(table_max, False))
        return rc, acut, rc_list

    def _setup(self, geometry: Geometry):
        """Per-atom columns ``(A,)``, per-(system, species) tables and cutoffs shared by both passes."""
        S = geometry.n_systems
        dtype = geometry.positions.dtype
        tz = {name: jnp.asarray(values[_SPECIES_Z], dtype) for name, values in _TABLE.items() if name != "known"}
        z = jnp.clip(geometry.numbers, 0, len(chemical_symbols) - 1)
        species = jnp.asarray(_SPECIES)[z]
        known = jnp.asarray(_TABLE["known"])[z]
        atom_system = jnp.clip(geometry.system, 0, S - 1)
        rc_s, acut_s, rc_list_s = self._cutoffs(geometry)
        log_n0 = jnp.log(tz["n0"])
        # per-species constants: rho_ij = w exp(A1_b - eta2_b r) / n0_a, the pair term's densities
        # w exp(A2_b - kb_b r) / n0_a and w exp(A2_a - kb_a r - log n0_b)
        sp = dict(A1=log_n0 + tz["eta2"] * BETA * tz["s0"], eta2=tz["eta2"], A2=log_n0 + tz["kappa"] * tz["s0"],
                  kb=tz["kappa"] / BETA, log_n0=log_n0)
        # -V0 / (2 gamma2) per (system, species), flattened to (S * n_species,)
        _, gamma2 = _gammas(tz["s0"][None], tz["eta2"][None], tz["kappa"][None], rc_s[:, None], acut_s[:, None])
        v_table = (-0.5 * tz["V0"][None] / gamma2).reshape(-1)
        n_species = len(_SPECIES_Z)
        atom = {name: values[species] for name, values in tz.items()}
        atom.update({name: values[species] for name, values in sp.items()})
        atom["v"] = v_table[atom_system * n_species + species]
        atom["rc"], atom["acut"], atom["rc_list"] = rc_s[atom_system], acut_s[atom_system], rc_list_s[atom_system]
        atom["gamma1"], _ = _gammas(atom["s0"], atom["eta2"], atom["kappa"], atom["rc"], atom["acut"])
        return species, known, atom, sp, v_table, n_species, atom_system

    def _pair_terms(self, geometry: Geometry, neighbors: NeighborList, positions=None, cell=None):
        """Pass 1 over the neighbor matrix: pair geometry and the ``(K, A)`` terms of the energy."""
        species, known, atom, sp, v_table, n_species, atom_system = self._setup(geometry)
        pg = pair_geometry(neighbors, geometry.positions if positions is None else positions,
                           geometry.cell if cell is None else cell, geometry.system)
        (sj,) = gather_neighbors(neighbors, species)
        col = {name: values[None, :] for name, values in atom.items()}  # broadcast over neighbours
        inside = pg.valid & (pg.r2 < col["rc_list"] ** 2)
        r = jnp.sqrt(jnp.where(inside, pg.r2, 1.0))
        # w itself, not log(w): one transcendental fewer per pair
        w = jnp.where(inside, 1.0 / (1.0 + jnp.exp(jnp.minimum(col["acut"] * (r - col["rc"]), 700.0))), 0.0)
        j = {name: sp[name][sj] for name in ("A1", "eta2", "A2", "kb", "log_n0")}  # small tables: fused
        j["v"] = v_table[atom_system[None, :] * n_species + sj]
        e1b = w * jnp.exp(j["A1"] - j["eta2"] * r)
        e2b = w * jnp.exp(j["A2"] - j["kb"] * r)
        e2a = w * jnp.exp(col["A2"] - col["kb"] * r - j["log_n0"])
        return dict(pg=pg, inside=inside, r=r, w=w, j=j, col=col, e1b=e1b, e2b=e2b, e2a=e2a,
                    atom=atom, known=known)

    def _atom_energies(self, geometry: Geometry, t: dict):
        """Per-atom energies ``(A,)`` and ``F'(sigma) / n0`` of every atom (pass-2 input)."""
        atom = t["atom"]
        s1 = jnp.sum(t["e1b"], axis=0)
        s2b = jnp.sum(t["e2b"], axis=0)
        s2a = jnp.sum(t["j"]["v"] * t["e2a"], axis=0)
        has_neighbors = jnp.any(t["inside"], axis=0)
        inv_n0 = 1.0 / atom["n0"]
        e_as = 0.5 * (atom["v"] * inv_n0 * s2b + s2a)
        # cohesive energy; atoms without neighbours have ds -> inf, E_c -> 0 (ASE skips them)
        twelve_gamma1 = 12.0 * atom["gamma1"]
        sigma1 = jnp.where(has_neighbors, s1 * inv_n0, twelve_gamma1)
        ds = -jnp.log(sigma1 / twelve_gamma1) / (BETA * atom["eta2"])
        lambda_ds = atom["lambda"] * ds
        e_lambda = jnp.exp(-lambda_ds)
        e_kappa = jnp.exp(-atom["kappa"] * ds)
        e_c = atom["E0"] * (1.0 + lambda_ds) * e_lambda + 6.0 * atom["V0"] * e_kappa
        e_atom = jnp.where(has_neighbors, e_c, 0.0) + e_as - atom["E0"]
        e_atom = jnp.where(geometry.atom_mask, e_atom, 0.0)
        # dE_c/dsigma1 = dE_c/dds * dds/dsigma1
        de_dds = -atom["E0"] * atom["lambda"] * lambda_ds * e_lambda - 6.0 * atom["V0"] * atom["kappa"] * e_kappa
        f_prime = jnp.where(has_neighbors & geometry.atom_mask, de_dds / (-sigma1 * BETA * atom["eta2"]), 0.0)
        return e_atom, f_prime * inv_n0

    def _system_energies(self, geometry: Geometry, e_atom: jax.Array, known: jax.Array) -> jax.Array:
        S = geometry.n_systems
        energy = segment_sum(e_atom, geometry.system, S)
        unknown = segment_any(geometry.atom_mask & ~known, geometry.system, S)
        return jnp.where(unknown, jnp.nan, energy)

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system EMT energies, eV, ``(S,)``; ``nan`` for systems with an element EMT lacks."""
        t = self._pair_terms(geometry, neighbors)
        e_atom, _ = self._atom_energies(geometry, t)
        return self._system_energies(geometry, e_atom, t["known"])

    def energy_forces(self, geometry: Geometry, neighbors: NeighborList, compute_virial: bool = False) -> EnergyForces:
        """Energies ``(S,)``, forces ``(A, 3)`` and (optionally) virials ``(S, 3, 3)`` analytically.

        Two passes over the neighbor matrix: the densities and pair sums give every atom's
        energy and ``F'(sigma)``; the second pass gathers the neighbours' ``F'`` and reduces
        ``g = dE/dr`` (both directions of every pair, :mod:`kups_relax.pairs`) over each column.
        """
        t = self._pair_terms(geometry, neighbors)
        e_atom, fn = self._atom_energies(geometry, t)
        (fn_j,) = gather_neighbors(neighbors, fn)
        col, j, w, r = t["col"], t["j"], t["w"], t["r"]
        dlogw = -col["acut"] * (1.0 - w)
        e1a = w * jnp.exp(col["A1"] - col["eta2"] * r)
        g = (fn[None, :] * t["e1b"] * (dlogw - j["eta2"]) + fn_j * e1a * (dlogw - col["eta2"])
             + col["v"] / col["n0"] * t["e2b"] * (dlogw - j["kb"]) + j["v"] * t["e2a"] * (dlogw - col["kb"]))
        g_over_r = jnp.where(t["inside"], g / r, 0.0)
        forces = pair_forces(g_over_r, t["pg"])
        virial = pair_virial(g_over_r, t["pg"], geometry.system, geometry.n_systems) if compute_virial else None
        return EnergyForces(energy=self._system_energies(geometry, e_atom, t["known"]), forces=forces, virial=virial)
