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
from kups_relax.neighbors import NeighborList, pair_vectors
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

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system EMT energies, eV, ``(S,)``; ``nan`` for systems with an element EMT lacks."""
        S = geometry.n_systems
        A = geometry.n_atom_rows
        dtype = geometry.positions.dtype
        table = {name: jnp.asarray(values, dtype=dtype if values.dtype.kind == "f" else None)
                 for name, values in _TABLE.items()}
        z = jnp.clip(geometry.numbers, 0, len(chemical_symbols) - 1)
        p = {name: values[z] for name, values in table.items()}
        atom_mask = geometry.atom_mask
        atom_system = jnp.clip(geometry.system, 0, S - 1)

        # Per-pair parameters are looked up in small tables indexed by atomic number (and
        # system), which XLA fuses into the pair arithmetic instead of materialising
        # (E, k) gathers. rc, rc_list, acut: per system (asap) or constants (default).
        table_max = _max_s0(EMT_NUMBERS)
        if self.asap_cutoff:
            present = segment_max(jnp.where(atom_mask & p["known"], p["s0"], -jnp.inf), geometry.system, S)
            max_s0 = jnp.where(jnp.isfinite(present), present, table_max)
            rc_s, rc_list_s, acut_s = cutoff_parameters(max_s0, True)
            # -V0 / (2 gamma2) for every (system, atomic number), flattened to (S * 119,)
            _, gamma2_sz = _gammas(table["s0"][None], table["eta2"][None], table["kappa"][None],
                                   rc_s[:, None], acut_s[:, None])
            v_sz = (-0.5 * table["V0"][None] / gamma2_sz).reshape(-1)
            rc_a, acut_a = rc_s[atom_system], acut_s[atom_system]
        else:
            rc_c, rc_list_c, acut_c = cutoff_parameters(table_max, False)
            _, gamma2_z = _gammas(table["s0"], table["eta2"], table["kappa"], rc_c, acut_c)
            v_z = -0.5 * table["V0"] / gamma2_z
            rc_a, acut_a = rc_c, acut_c
        gamma1, _ = _gammas(p["s0"], p["eta2"], p["kappa"], rc_a, acut_a)

        i, j = neighbors.senders, neighbors.receivers
        zi, zj = z[i], z[j]
        if self.asap_cutoff:
            pair_system = atom_system[i]
            rc, rc_list, acut = rc_s[pair_system], rc_list_s[pair_system], acut_s[pair_system]
            v_i = v_sz[pair_system * len(chemical_symbols) + zi]
            v_j = v_sz[pair_system * len(chemical_symbols) + zj]
        else:
            rc, rc_list, acut = rc_c, rc_list_c, acut_c
            v_i, v_j = v_z[zi], v_z[zj]
        log_n0 = jnp.log(table["n0"])

        vec = pair_vectors(neighbors, geometry.positions, geometry.cell, geometry.system)
        d2 = jnp.sum(vec * vec, axis=-1)
        r = jnp.sqrt(jnp.where(neighbors.mask, d2, 1.0))  # padding pairs kept away from sqrt(0)
        inside = neighbors.mask & (r < rc_list)
        # w the logistic cutoff, chi = n0_j / n0_i (i = sender = "self"). w itself, not log(w):
        # one exp per pair instead of an exp and a log1p (transcendentals are most of the cost)
        w = 1.0 / (1.0 + jnp.exp(jnp.minimum(acut * (r - rc), 700.0)))
        log_chi = log_n0[zj] - log_n0[zi]
        dsigma1 = w * jnp.exp(log_chi - table["eta2"][zj] * (r - BETA * table["s0"][zj]))
        dsigma2_self = w * jnp.exp(log_chi - table["kappa"][zj] * (r / BETA - table["s0"][zj]))
        dsigma2_other = w * jnp.exp(-log_chi - table["kappa"][zi] * (r / BETA - table["s0"][zi]))
        pair_as = 0.5 * (v_i * dsigma2_self + v_j * dsigma2_other)

        # one scatter for the three per-atom sums
        per_pair = jnp.where(inside[:, None], jnp.stack([dsigma1, pair_as, jnp.ones_like(r)], axis=-1), 0.0)
        sigma1, e_as, n_neighbors = segment_sum(per_pair, i, A).T
        has_neighbors = n_neighbors > 0

        # cohesive energy; atoms without neighbours have ds -> inf, E_c -> 0 (ASE skips them)
        twelve_gamma1 = 12.0 * gamma1
        sigma1 = jnp.where(has_neighbors, sigma1, twelve_gamma1)
        ds = -jnp.log(sigma1 / twelve_gamma1) / (BETA * p["eta2"])
        lambda_ds = p["lambda"] * ds
        e_c = p["E0"] * (1.0 + lambda_ds) * jnp.exp(-lambda_ds) + 6.0 * p["V0"] * jnp.exp(-p["kappa"] * ds)
        e_atom = jnp.where(has_neighbors, e_c, 0.0) + e_as - p["E0"]
        e_atom = jnp.where(atom_mask, e_atom, 0.0)

        energy = segment_sum(e_atom, geometry.system, S)
        unknown = segment_any(atom_mask & ~p["known"], geometry.system, S)
        return jnp.where(unknown, jnp.nan, energy)
