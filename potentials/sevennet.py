"""SevenNet-0 (a NequIP-style equivariant graph network) as a potential of the jitted loop.

SevenNet (Park, Kim, Hwang, Han, J. Chem. Theory Comput. 20, 4857 (2024)) is a universal
interatomic potential for 89 elements trained on Materials Project relaxations (MPtrj, PBE/PBE+U).
This is the same network as the ``sevenn`` package's, evaluated on the batch's neighbour
list with JAX; its weights are read from ``potentials/data/sevennet_0.npz`` (converted
from sevenn's checkpoint by :mod:`potentials.convert_sevennet`, MIT licence, see
``potentials/data/SEVENNET_LICENSE``). No torch is needed.

Architecture (every piece in :mod:`potentials.sevennet_layers`, e3nn's conventions):

* edges ``i -> j`` within 5 Å: 8 Bessel functions of ``r`` times the XPLOR switch (4.5-5 Å),
  spherical harmonics ``l <= 2`` of ``r_j - r_i``;
* atoms: a learned 128-channel embedding of the element;
* 5 interaction blocks: self-connection (linear) + linear -> convolution (radial network
  8-64-64-paths weights a ``'uvu'`` tensor product of the neighbour's features with the
  harmonics, summed over neighbours, divided by ``sqrt(avg. neighbours)``) -> linear ->
  gate; features ``128x0e -> 128x0e+64x1e+32x2e (x4) -> 128x0e``;
* readout 128 -> 64 -> 1, then ``E_i = scale[Z_i] * e_i + shift[Z_i]`` (eV) and a sum per system.

Forces and stress come from :func:`kups_relax.evaluate.evaluate` by autodiff, as for every
potential. The dtype of the positions decides the precision (float32 or float64; the
weights are float32 values either way, as in the reference); runs default to float32
(:attr:`SevenNet.default_dtype`), as sevenn runs.

How it runs on the neighbor matrix (:mod:`potentials.neighbor_graph`): per evaluation, the
entries of the ``(K, A)`` matrix within 5 Å are moved to the front of their columns and the
atoms are put in order of decreasing neighbour count; every convolution then visits only
the tiles of the matrix that hold such entries (:func:`potentials.sevennet_layers.convolution`),
so the Verlet skin, the width the densest structure of a batch needs and the padding rows
cost (almost) nothing. Sums over neighbours are sums over the matrix rows; the backward pass
of the convolution is written out, and the transpose of the neighbour gather reads the
cotangents at each entry's reverse entry instead of scattering them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kups_relax.batch import Geometry
from kups_relax.neighbors import NeighborList
from kups_relax.precision import x64
from kups_relax.segments import segment_sum

from . import sevennet_layers as layers
from .convert_sevennet import PRETRAINED
from .neighbor_graph import edge_vectors, graph, permute

DATA = Path(__file__).parent / "data"
#: SevenNet-0's converted weights, shipped with the package.
SEVENNET_0_FILE = DATA / "sevennet_0.npz"
#: Every shipped model: potential name -> converted file (the converter's table names them).
PRETRAINED_FILES: dict[str, Path] = {name: DATA / entry.output for name, entry in PRETRAINED.items()}
FORMAT = "kups-relax/sevennet/2"
#: Every registry name of the family -> the same model in sevenn's ``SevenNetCalculator``: its
#: model name and modality (what the parity tests and benchmarks compare against).
SEVENN_MODELS: dict[str, tuple[str, str | None]] = {
    "sevennet-0": ("7net-0", None),
    "sevennet-0-22may2024": ("7net-0_22may2024", None),
    "sevennet-l3i5": ("7net-l3i5", None),
    "sevennet-mf-0:PBE": ("7net-mf-0", "PBE"),
    "sevennet-mf-0:R2SCAN": ("7net-mf-0", "R2SCAN"),
}


@dataclasses.dataclass(frozen=True)
class SevenNetConfig:
    """Static hyperparameters of a SevenNet model (hashable, part of the compiled program).

    Attributes:
        cutoff: interaction cutoff, Å.
        cutoff_function: ``("xplor", r_on)`` (the XPLOR switch from ``r_on`` Å to the cutoff) or
            ``("poly_cut", p)`` (the polynomial envelope of order ``p``).
        lmax_filter: largest ``l`` of the edge harmonics.
        irreps: node irreps before/after every interaction block (``n_layers + 1`` of them).
        act_scale: SiLU's second-moment normalisation constant (e3nn's ``normalize2mom``).
        denominators: per block, what the summed messages are divided by.
        numbers: atomic numbers of the species, in the order of the species tables.
        normalize_sph: the edge harmonics are of the unit edge vector (else of the vector itself).
        n_modalities: a multi-fidelity model's number of modalities (0: none): the fan-in its
            modality one-hot adds to the linear layers that take it.
    """

    cutoff: float
    cutoff_function: tuple[str, float]
    lmax_filter: int
    irreps: tuple[tuple[tuple[int, int], ...], ...]
    act_scale: float
    denominators: tuple[float, ...]
    numbers: tuple[int, ...]
    normalize_sph: bool = True
    n_modalities: int = 0

    @property
    def n_layers(self) -> int:
        return len(self.irreps) - 1

    def paths(self, t: int) -> tuple[layers.Path, ...]:
        """The tensor-product paths of block ``t`` (its output keeps the ``l`` of ``irreps[t+1]``)."""
        return layers.convolution_paths(self.irreps[t], self.lmax_filter, [l for _, l in self.irreps[t + 1]])


@jax.tree_util.register_pytree_node_class
class Weights:
    """The float32 weight arrays of a model by name (a pytree; a short ``repr`` for metadata and logs)."""

    def __init__(self, arrays: dict[str, jax.Array]):
        self.arrays = dict(arrays)

    def tree_flatten(self):
        names = tuple(sorted(self.arrays))
        return tuple(self.arrays[k] for k in names), names

    @classmethod
    def tree_unflatten(cls, names, leaves):
        return cls(dict(zip(names, leaves)))

    def __repr__(self) -> str:
        try:
            n = sum(int(np.prod(a.shape)) for a in self.arrays.values())
        except Exception:  # traced or abstract leaves
            n = "?"
        return f"Weights({len(self.arrays)} arrays, {n} parameters)"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SevenNet:
    """A SevenNet model (a pytree: ``params`` and ``species_index`` are leaves).

    Build with :meth:`load` (any converted file), :func:`pretrained` (a shipped model by name) or
    :func:`sevennet_0`. A multi-fidelity model (SevenNet-MF-0) is loaded for one modality
    (``"PBE"`` or ``"R2SCAN"``): its one-hot rows and energy shifts for that modality are in
    ``params``.

    Attributes:
        params: :class:`Weights`, array name -> float32 weights (names as in the converted file).
        species_index: ``(119,)`` int32 row of every atomic number in the species tables, -1 if unsupported.
        config: the static :class:`SevenNetConfig`.
        name: a label for logs and trajectory metadata.
    """

    params: Weights
    species_index: jax.Array
    config: SevenNetConfig = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(default="sevennet", metadata=dict(static=True))

    @classmethod
    @x64
    def load(cls, path: str | Path, name: str | None = None, modality: str | None = None) -> "SevenNet":
        """Read a file written by :mod:`potentials.convert_sevennet` (numpy only, no torch).

        Args:
            path: the ``.npz`` file.
            name: label for logs and metadata (default: the file's model name, with the modality).
            modality: for a multi-fidelity model, which one (case-insensitive; required);
                must be ``None`` for any other model.

        Raises:
            ValueError: not a converted file, or a missing, unknown or unexpected ``modality``
                (the message lists the model's modalities).
        """
        path = Path(path)
        with np.load(path) as data:
            meta = json.loads(bytes(data["config.json"]).decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a converted SevenNet file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            arrays = {k: np.asarray(data[k]) for k in data.files if k != "config.json"}
        modalities = list(meta.get("modalities", []))
        label = name or meta.get("model", path.stem)
        if modalities:
            by_name = {m.lower(): k for k, m in enumerate(modalities)}
            if modality is None or str(modality).lower() not in by_name:
                what = "needs a modality" if modality is None else f"has no modality {modality!r}"
                raise ValueError(f"{label} {what}; available: {', '.join(modalities)}")
            row = by_name[str(modality).lower()]
            arrays = {(k[:-len(".modal")] + ".bias" if k.endswith(".modal") else k): (v[row] if k.endswith(".modal") else v)
                      for k, v in arrays.items()}
            if meta.get("modal_shift"):
                arrays["shift"] = arrays["shift"][row]
            label = name or f"{label}:{modalities[row]}"
        elif modality is not None:
            raise ValueError(f"{label} is not a multi-fidelity model: it takes no modality (got {modality!r})")
        cut = meta["cutoff_function"]
        config = SevenNetConfig(
            cutoff=float(meta["cutoff"]),
            cutoff_function=("xplor", float(cut["r_on"])) if cut["name"] == "xplor" else ("poly_cut", int(cut["p"])),
            lmax_filter=int(meta["lmax_filter"]),
            irreps=tuple(layers.parse_irreps(s) for s in meta["irreps"]), act_scale=float(meta["act_scale"]),
            denominators=tuple(float(d) for d in meta["denominators"]), numbers=tuple(int(z) for z in meta["numbers"]),
            normalize_sph=bool(meta["normalize_sph"]), n_modalities=len(modalities),
        )
        index = np.full(119, -1, dtype=np.int32)
        index[list(config.numbers)] = np.arange(len(config.numbers), dtype=np.int32)
        params = {k: jnp.asarray(v) for k, v in arrays.items()}
        return cls(params=Weights(params), species_index=jnp.asarray(index), config=config, name=label)

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def default_dtype(self) -> str:
        """float32, the precision sevenn ships and runs the model in (``dtype=`` overrides)."""
        return "float32"

    @property
    def supported_numbers(self) -> frozenset[int]:
        return frozenset(self.config.numbers)

    def energy(self, geometry: Geometry, neighbors: NeighborList) -> jax.Array:
        """Per-system energies ``(S,)`` in eV (jit-compatible)."""
        cfg, dtype = self.config, geometry.positions.dtype
        p = {k: v.astype(dtype) for k, v in self.params.arrays.items()}
        S = geometry.n_systems

        g = graph(neighbors, geometry.positions, geometry.cell, geometry.system, cfg.cutoff)
        # the model runs on the atoms in the graph's column order (decreasing neighbour count)
        positions = permute(geometry.positions, g.order, g.rank)
        system = jnp.take(geometry.system, g.order)
        vec = edge_vectors(g, positions, geometry.cell, system)  # (W, A, 3), i -> j
        safe = jnp.where(g.inside[..., None], vec, jnp.asarray([0.0, 0.0, 0.5 * cfg.cutoff], dtype))
        r = jnp.sqrt(jnp.sum(safe * safe, axis=-1))
        sh = layers.spherical_harmonics(safe / r[..., None] if cfg.normalize_sph else safe, cfg.lmax_filter)
        kind, parameter = cfg.cutoff_function
        envelope = (layers.xplor_cutoff(r, parameter, cfg.cutoff) if kind == "xplor"
                    else layers.polynomial_cutoff(r, cfg.cutoff, int(parameter)))
        radial = layers.bessel_basis(r, p["bessel_coeffs"], cfg.cutoff) * envelope[..., None]
        radial = jnp.where(g.inside[..., None], radial, 0.0)
        edges = (sh, radial, g)

        species = jnp.clip(jnp.take(self.species_index, jnp.take(geometry.numbers, g.order), mode="clip"), 0, None)
        embedding = p["embedding.l0"]
        x = {0: (embedding[species] / math.sqrt(embedding.shape[0]))[:, None, :]}
        t = 0
        while t < cfg.n_layers:
            # blocks with the same irreps in and out share one traced body (lax.scan): less to compile
            run = 1
            while t + run < cfg.n_layers and cfg.irreps[t] == cfg.irreps[t + run + 1] == cfg.irreps[t + run]:
                run += 1
            if run == 1:
                x = self._interaction(t, x, self._layer_params(p, t), edges)
            else:
                stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[self._layer_params(p, k)
                                                                            for k in range(t, t + run)])

                def body(x, layer_params, t=t):
                    return self._interaction(t, x, layer_params, edges), None

                x, _ = jax.lax.scan(body, x, stacked)
            t += run
        hidden = layers.linear({0: x[0][:, 0, :]}, {0: p["readout.0.l0"]}, p.get("readout.0.bias"),
                               cfg.n_modalities)[0]
        atomic = (hidden @ p["readout.1.l0"])[:, 0] / math.sqrt(p["readout.1.l0"].shape[0])
        atomic = atomic * p["scale"][species] + p["shift"][species]
        return segment_sum(permute(atomic, g.rank, g.order), geometry.system, S)

    def _layer_params(self, p: dict, t: int) -> dict:
        """Block ``t``'s weights: ``{"self_connection"|"linear_1"|"linear_2": {l: W}, "radial": [W, ...],
        "denominator": (), "bias": {"linear_1"|"linear_2": (mul_out(0),)}}`` (biases: a multi-fidelity
        model's modality row, where the layer takes it)."""
        def blocks(name):
            prefix = f"layer{t}.{name}.l"
            return {int(k[len(prefix):]): v for k, v in p.items() if k.startswith(prefix)}

        n_radial = sum(1 for key in p if key.startswith(f"layer{t}.radial."))
        biases = {name: p[f"layer{t}.{name}.bias"] for name in ("linear_1", "linear_2") if f"layer{t}.{name}.bias" in p}
        return dict(self_connection=blocks("self_connection"), linear_1=blocks("linear_1"),
                    linear_2=blocks("linear_2"), radial=[p[f"layer{t}.radial.{k}"] for k in range(n_radial)],
                    denominator=jnp.asarray(self.config.denominators[t], p["shift"].dtype), bias=biases)

    def _interaction(self, t: int, x: dict, w: dict, edges) -> dict:
        """Interaction block ``t``: features ``l -> (A, 2l+1, mul)`` -> the next block's."""
        cfg = self.config
        sh, radial, g = edges
        out_ls = [l for _, l in cfg.irreps[t + 1]]
        self_connection = layers.linear(x, w["self_connection"])
        x = layers.linear(x, w["linear_1"], w["bias"].get("linear_1"), cfg.n_modalities)
        layout, off = [], 0
        for l in sorted(x):
            layout.append((l, x[l].shape[-1], off))
            off += x[l].shape[-1] * (2 * l + 1)
        conv = layers.Convolution(paths=cfg.paths(t), layout=tuple(layout), lmax_filter=cfg.lmax_filter,
                                  act_scale=cfg.act_scale, rows=g.rows, cols=g.cols)
        x = layers.convolution(conv, layers.flatten(x), sh, radial, w["radial"], g.neighbors, g.reverse, g.tiles,
                               g.n_tiles)
        x = {l: v / w["denominator"] for l, v in x.items()}
        x = layers.add(layers.linear(x, w["linear_2"], w["bias"].get("linear_2"), cfg.n_modalities), self_connection)
        n_scalars = cfg.irreps[t + 1][0][0]
        return layers.gate({l: x[l] for l in sorted(x) if l == 0 or l in out_ls}, n_scalars, cfg.act_scale)


def sevennet_0() -> SevenNet:
    """SevenNet-0 (11 July 2024) with the weights shipped in ``potentials/data``."""
    return SevenNet.load(SEVENNET_0_FILE, name="SevenNet-0")


def pretrained(name: str, modality: str | None = None) -> SevenNet:
    """A shipped SevenNet model by potential name (a key of :data:`PRETRAINED_FILES`).

    ``sevennet-mf-0`` needs ``modality`` (``"PBE"`` or ``"R2SCAN"``, case-insensitive); the
    others take none. Raises ``ValueError`` for an unknown name or modality, listing the options.
    """
    key = name.lower()
    if key not in PRETRAINED_FILES:
        raise ValueError(f"unknown SevenNet model {name!r}; available: {', '.join(PRETRAINED_FILES)}")
    if key == "sevennet-0" and modality is None:
        return sevennet_0()
    return SevenNet.load(PRETRAINED_FILES[key], modality=modality)
