"""Potentials by name, for the CLI, configuration files and the API.

>>> get_potential("lj", sigma=3.4, epsilon=0.0104, rc=8.5)
>>> get_potential("morse", epsilon=0.5, r0=2.5, rho0=4.0)
>>> get_potential("lj", sigma={"Ar": 3.4, "Kr": 3.6}, epsilon={"Ar": 0.0104, "Kr": 0.014})
>>> get_potential("eam:/path/to/Cu_u3.eam")
>>> get_potential("emt", asap_cutoff=True)
>>> get_potential("sevennet-mf-0:R2SCAN")      # a SevenNet model and its modality

A name is ``<kind>`` or ``<kind>:<argument>`` (``eam:<path>``); keyword parameters
go to the potential's constructor. For ``lj`` and ``morse``, per-element mappings
(``sigma={"Ar": 3.4, "Kr": 3.6}``), ``pairs=`` or ``mixing=`` select the
per-species-pair constructor (``per_species``). Factories import their module only when
called, so a potential that needs optional code costs nothing until it is used.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

#: kind -> (factory(argument, **params), one-line description)
_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}


def register_potential(kind: str, factory: Callable[..., Any], description: str = "") -> None:
    """Make ``kind`` (or ``kind:<argument>``) a potential name.

    ``factory(argument, **params)`` gets the text after the first ``:`` (``None`` if
    there is none) and the keyword parameters, and returns a potential.
    """
    kind = kind.lower()
    if not kind or ":" in kind:
        raise ValueError(f"potential kind must be a non-empty name without ':', got {kind!r}")
    _REGISTRY[kind] = (factory, description)


def available_potentials() -> dict[str, str]:
    """Registered kinds and their descriptions."""
    return {kind: description for kind, (_, description) in sorted(_REGISTRY.items())}


def get_potential(name: str, **params) -> Any:
    """The potential called ``name`` (see :func:`available_potentials`), built with ``params``.

    Raises:
        ValueError: unknown name (the message lists the available ones), a missing or
            unexpected ``:<argument>``, or parameters the potential does not take.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"potential name must be a non-empty string, got {name!r}")
    kind, _, argument = name.strip().partition(":")
    kind = kind.lower()
    if kind not in _REGISTRY:
        listing = ", ".join(f"{k} ({d})" for k, d in available_potentials().items())
        raise ValueError(f"unknown potential {name!r}; available: {listing}")
    factory, _ = _REGISTRY[kind]
    return factory(argument or None, **params)


def _no_argument(kind: str, argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"potential {kind!r} takes no ':<argument>', got {kind}:{argument}")


def _with_params(kind: str, cls, params: dict):
    try:
        return cls(**params)
    except TypeError as err:
        raise ValueError(f"potential {kind!r}: {err}") from None


def _per_species(params: dict) -> bool:
    """Per-pair parameters were asked for: explicit ``pairs``, ``mixing`` or a per-element mapping."""
    return "pairs" in params or "mixing" in params or any(isinstance(v, Mapping) for v in params.values())


def _lennard_jones(argument: str | None, **params):
    _no_argument("lj", argument)
    from .lennard_jones import LennardJones

    return _with_params("lj", LennardJones.per_species if _per_species(params) else LennardJones, params)


def _morse(argument: str | None, **params):
    _no_argument("morse", argument)
    from .morse import MorsePotential

    return _with_params("morse", MorsePotential.per_species if _per_species(params) else MorsePotential, params)


def _eam(argument: str | None, **params):
    from .eam import EAM

    if argument is None:
        raise ValueError("potential 'eam' needs a file: 'eam:<path>' (.eam, .eam.alloy or .eam.fs)")
    try:
        return EAM.from_file(argument, **params)
    except TypeError as err:
        raise ValueError(f"potential 'eam': {err}") from None


def _emt(argument: str | None, **params):
    _no_argument("emt", argument)
    try:
        from .emt import EMT
    except ImportError as err:
        raise ValueError(f"potential 'emt' is not available in this installation: {err}") from None

    return _with_params("emt", EMT, params)


register_potential("lj", _lennard_jones, "Lennard-Jones, ASE's LennardJones parameters")
register_potential("morse", _morse, "Morse, ASE's MorsePotential parameters")
register_potential("eam", _eam, "embedded-atom method from a file: eam:<path> (.eam, .eam.alloy, .eam.fs)")
register_potential("emt", _emt, "effective-medium theory, ASE's EMT (asap_cutoff=True for ASAP's cutoff)")


def _sevennet(kind: str):
    """A shipped SevenNet model; ``:<argument>`` is the modality of a multi-fidelity one (an error for the others)."""
    def factory(argument: str | None, **params):
        if params:
            raise ValueError(f"potential {kind!r} takes no parameters, got {sorted(params)}")
        from .sevennet import pretrained

        return pretrained(kind, modality=argument)

    return factory


register_potential("sevennet-0", _sevennet("sevennet-0"),
                   "SevenNet-0 (11Jul2024) universal ML potential (89 elements, MPtrj; weights shipped)")
register_potential("sevennet-0-22may2024", _sevennet("sevennet-0-22may2024"),
                   "SevenNet-0's first release (22May2024; weights shipped)")
register_potential("sevennet-l3i5", _sevennet("sevennet-l3i5"),
                   "SevenNet-l3i5: SevenNet-0 with lmax 3: more accurate, heavier (weights shipped)")
register_potential("sevennet-mf-0", _sevennet("sevennet-mf-0"),
                   "SevenNet-MF-0 multi-fidelity: sevennet-mf-0:PBE or sevennet-mf-0:R2SCAN (weights shipped)")
