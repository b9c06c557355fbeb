"""Reading LAMMPS/DYNAMO EAM tables (host only, numpy; no JAX here).

Three formats, read the way ``ase.calculators.eam.EAM`` reads them (the format
comes from the file suffix, as in ASE, unless ``form`` is given):

* ``funcfl`` (``.eam``, form ``"eam"``): one element. One comment line; then
  ``Z mass a lattice``; ``nrho drho nr dr cutoff``; the embedding energy
  ``F(rho)`` (``nrho`` values, eV); the effective charge ``Z(r)`` (``nr`` values,
  converted as ASE does to ``r phi(r) = Z(r)**2 * Hartree * Bohr``, eV·Å); the
  electron density ``rho(r)`` (``nr`` values).
* ``setfl`` (``.eam.alloy``, form ``"alloy"``): three comment lines; ``N el1 .. elN``;
  ``nrho drho nr dr cutoff``; per element: ``Z mass a lattice``, ``F(rho)``,
  ``rho(r)``; then ``r phi(r)`` (eV·Å) for the pairs ``(i, j), j <= i``.
* Finnis-Sinclair (``.eam.fs``, form ``"fs"``): as ``setfl`` but every element
  lists ``N`` density functions after its ``F(rho)``.

Grids are ``rho_k = k drho`` (``k < nrho``) and ``r_k = k dr`` (``k < nr``). Numbers are
read as one whitespace-separated stream after the header, so line breaks inside
the tables do not matter (as in ASE and LAMMPS).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from ase.units import Bohr, Hartree

#: File suffix -> form, as ASE decides it.
SUFFIX_FORMS = {".eam": "eam", ".alloy": "alloy", ".fs": "fs"}
FORMS = ("eam", "alloy", "fs")


@dataclasses.dataclass(frozen=True)
class EAMTables:
    """The tabulated functions of an EAM file (host arrays, float64).

    Attributes:
        form: ``"eam"`` (funcfl), ``"alloy"`` (setfl) or ``"fs"`` (Finnis-Sinclair).
        elements: ``N`` chemical symbols, in file order.
        numbers: their atomic numbers.
        nrho, drho: samples and spacing of the density grid (density in the file's units).
        nr, dr: samples and spacing of the distance grid, Å.
        cutoff: interaction cutoff, Å.
        embedding: ``(N, nrho)`` ``F_a(rho_k)``, eV.
        density: ``(N, N, nr)``; ``density[b, a]`` is the density an atom of species ``b``
            gives, at distance ``r_k``, to an atom of species ``a`` (independent of ``a``
            except for ``fs``; for ``fs`` it is element ``b``'s ``a``-th density block).
        rphi: ``(N, N, nr)`` symmetric ``r_k phi_ab(r_k)``, eV·Å.
        header: the comment lines.
        mass: ``(N,)`` atomic masses from the file, amu.
        lattice_constant: ``(N,)`` Å; lattice: ``N`` lattice names (file metadata only).
        source: the path read, if any.
    """

    form: str
    elements: tuple[str, ...]
    numbers: tuple[int, ...]
    nrho: int
    drho: float
    nr: int
    dr: float
    cutoff: float
    embedding: np.ndarray
    density: np.ndarray
    rphi: np.ndarray
    header: tuple[str, ...] = ()
    mass: np.ndarray | None = None
    lattice_constant: np.ndarray | None = None
    lattice: tuple[str, ...] = ()
    source: str | None = None


def form_from_suffix(path: str | os.PathLike) -> str:
    """``"eam"``, ``"alloy"`` or ``"fs"`` from the last suffix of ``path`` (ASE's rule)."""
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix == ".adp":
        raise ValueError(f"{os.fspath(path)!r}: ADP potentials (.adp) are not supported")
    if suffix not in SUFFIX_FORMS:
        raise ValueError(f"{os.fspath(path)!r}: cannot tell the EAM format from the suffix {suffix!r}; "
                         f"use .eam (funcfl), .eam.alloy (setfl) or .eam.fs (Finnis-Sinclair), or pass form=")
    return SUFFIX_FORMS[suffix]


def read_eam(path: str | os.PathLike, form: str | None = None) -> EAMTables:
    """Read an EAM file.

    Args:
        path: the file.
        form: ``"eam"``, ``"alloy"`` or ``"fs"``; default: from the suffix (see :data:`SUFFIX_FORMS`).

    Raises:
        ValueError: unknown format, a truncated or malformed file, or an element name
            that is not a chemical symbol; the message names the file.
    """
    path = os.fspath(path)
    form = form_from_suffix(path) if form is None else form
    if form not in FORMS:
        raise ValueError(f"{path!r}: unknown EAM form {form!r} (known: {', '.join(FORMS)})")
    with open(path) as fd:
        lines = fd.readlines()
    try:
        tables = _parse(lines, form)
    except (ValueError, IndexError) as err:
        raise ValueError(f"{path!r} is not a valid {form} EAM file: {err}") from None
    return dataclasses.replace(tables, source=path)


class _Stream:
    """Whitespace-separated tokens, consumed in order."""

    def __init__(self, lines: list[str]):
        self.tokens = " ".join(lines).split()
        self.at = 0

    def take(self, n: int, what: str) -> list[str]:
        if self.at + n > len(self.tokens):
            raise ValueError(f"file ends while reading {what} (needs {n} values, {len(self.tokens) - self.at} left)")
        out = self.tokens[self.at:self.at + n]
        self.at += n
        return out

    def floats(self, n: int, what: str) -> np.ndarray:
        return np.array(self.take(n, what), dtype=np.float64)

    def one(self, kind, what: str):
        return kind(self.take(1, what)[0])


def _grid(stream: _Stream) -> tuple[int, float, int, float, float]:
    nrho = stream.one(int, "nrho")
    drho = stream.one(float, "drho")
    nr = stream.one(int, "nr")
    dr = stream.one(float, "dr")
    cutoff = stream.one(float, "cutoff")
    if nrho < 4 or nr < 5 or drho <= 0 or dr <= 0 or cutoff <= 0:
        raise ValueError(f"bad grid: nrho={nrho} drho={drho} nr={nr} dr={dr} cutoff={cutoff} "
                         "(need nrho >= 4, nr >= 5 and positive spacings and cutoff)")
    return nrho, drho, nr, dr, cutoff


def _atomic_number(symbol: str) -> int:
    if symbol not in atomic_numbers or symbol == "X":
        raise ValueError(f"element name {symbol!r} is not a chemical symbol")
    return atomic_numbers[symbol]


def _parse(lines: list[str], form: str) -> EAMTables:
    if form == "eam":
        header, stream = tuple(lines[:1]), _Stream(lines[1:])
        z = stream.one(int, "atomic number")
        if not 0 < z < len(chemical_symbols):
            raise ValueError(f"atomic number {z} out of range")
        mass, a, lattice = stream.one(float, "mass"), stream.one(float, "lattice constant"), stream.one(str, "lattice")
        nrho, drho, nr, dr, cutoff = _grid(stream)
        embedding = stream.floats(nrho, "F(rho)")[None]
        charge = stream.floats(nr, "Z(r)")
        density = stream.floats(nr, "rho(r)")[None, None]
        rphi = (Bohr * Hartree * charge ** 2)[None, None]
        return EAMTables(form=form, elements=(chemical_symbols[z],), numbers=(z,), nrho=nrho, drho=drho, nr=nr,
                         dr=dr, cutoff=cutoff, embedding=embedding, density=density, rphi=rphi, header=header,
                         mass=np.array([mass]), lattice_constant=np.array([a]), lattice=(lattice,))

    header, stream = tuple(lines[:3]), _Stream(lines[3:])
    n = stream.one(int, "number of elements")
    if n < 1:
        raise ValueError(f"number of elements {n} < 1")
    elements = tuple(stream.take(n, "element names"))
    numbers = tuple(_atomic_number(e) for e in elements)
    if len(set(elements)) != n:
        raise ValueError(f"repeated element names {elements}")
    nrho, drho, nr, dr, cutoff = _grid(stream)
    embedding = np.zeros((n, nrho))
    density = np.zeros((n, n, nr))
    masses, constants, lattices = np.zeros(n), np.zeros(n), []
    for a, element in enumerate(elements):
        stream.one(int, f"{element} atomic number")  # ASE matches atoms by the symbol, not this number
        masses[a] = stream.one(float, f"{element} mass")
        constants[a] = stream.one(float, f"{element} lattice constant")
        lattices.append(stream.one(str, f"{element} lattice"))
        embedding[a] = stream.floats(nrho, f"{element} F(rho)")
        if form == "fs":
            density[a] = stream.floats(n * nr, f"{element} rho(r) blocks").reshape(n, nr)
        else:
            density[a] = stream.floats(nr, f"{element} rho(r)")[None]
    rphi = np.zeros((n, n, nr))
    for a in range(n):
        for b in range(a + 1):
            rphi[a, b] = rphi[b, a] = stream.floats(nr, f"r*phi({elements[a]}-{elements[b]})")
    return EAMTables(form=form, elements=elements, numbers=numbers, nrho=nrho, drho=drho, nr=nr, dr=dr,
                     cutoff=cutoff, embedding=embedding, density=density, rphi=rphi, header=header,
                     mass=masses, lattice_constant=constants, lattice=tuple(lattices))
