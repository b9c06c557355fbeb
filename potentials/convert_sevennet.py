"""Convert a SevenNet checkpoint (torch) into the framework-neutral file :mod:`potentials.sevennet` reads.

    python -m potentials.convert_sevennet                       # SevenNet-0 from the sevenn wheel
    python -m potentials.convert_sevennet --all                 # every model of PRETRAINED (the shipped files)
    python -m potentials.convert_sevennet sevennet-l3i5         # one of them by name
    python -m potentials.convert_sevennet CHECKPOINT.pth -o OUT.npz

Needs ``torch`` and ``sevenn`` (the loader does not). The output is an ``.npz`` of float32
arrays plus one ``config.json`` entry (UTF-8 bytes) holding the hyperparameters, the
atomic-number order of the species tables, and the constants e3nn computed at build time
(SiLU's second-moment scale). Every weight is stored in our own layout (one
``(mul_in, mul_out)`` matrix per angular momentum ``l``); the converter checks that the
checkpoint's architecture is the one :mod:`potentials.sevennet_layers` implements
(irreps, tensor-product paths and their order, normalisations) and refuses anything else.

What varies between the checkpoints the sevenn wheel ships (:data:`PRETRAINED`), and how it
is stored:

* ``lmax`` (2, or 3 for SevenNet-l3i5): the irreps and ``lmax_filter`` in the config;
* ``normalize_sph``: the edge harmonics are those of the unit vector (true), or of the edge
  vector itself, ``|r|^l Y_l`` (SevenNet-0 22May2024);
* the cutoff function: ``cutoff_function`` ``{"name": "xplor", "r_on": ...}`` or
  ``{"name": "poly_cut", "p": ...}`` (SevenNet-l3i5);
* multi-fidelity (SevenNet-MF-0): the modality's one-hot is appended to the input of some
  ``o3.Linear`` layers as ``n x 0e`` (a block e3nn does not merge with the other scalars, so the
  scalar outputs' fan-in is ``mul_in + n``). Their one-hot rows are stored as ``NAME.modal``
  ``(n, mul_out)`` beside ``NAME.l0``; the per-modality energy shift as ``shift`` ``(n, species)``;
  ``modalities`` lists the names in row order. The loader selects one row per run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .sevennet_layers import convolution_paths, parse_irreps

DATA = Path(__file__).parent / "data"
FORMAT = "kups-relax/sevennet/2"

CITATION = ("Y. Park, J. Kim, S. Hwang, S. Han, Scalable Parallel Algorithm for Graph Neural Network "
            "Interatomic Potentials in Molecular Dynamics Simulations, J. Chem. Theory Comput. 20, "
            "4857-4868 (2024), doi:10.1021/acs.jctc.4c00190")
CITATION_MF = ("J. Kim, J. Kim, J. Kim, J. Lee, Y. Park, Y. Kang, S. Han, Data-Efficient Multifidelity "
               "Training for High-Fidelity Machine Learning Interatomic Potentials, J. Am. Chem. Soc. 147, "
               "1042-1054 (2025), doi:10.1021/jacs.4c14455")


class Pretrained(NamedTuple):
    """A checkpoint of the sevenn wheel and the file it converts to."""

    checkpoint: str  # relative to the sevenn package
    output: str  # file name in potentials/data
    model: str  # label in the config (logs, trajectory metadata)
    citation: str


#: Every checkpoint the sevenn 0.13 wheel ships, by our potential name.
PRETRAINED: dict[str, Pretrained] = {
    "sevennet-0": Pretrained("pretrained_potentials/SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
                             "sevennet_0.npz", "SevenNet-0 (11Jul2024)", CITATION),
    "sevennet-0-22may2024": Pretrained("pretrained_potentials/SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
                                       "sevennet_0_22may2024.npz", "SevenNet-0 (22May2024)", CITATION),
    "sevennet-l3i5": Pretrained("pretrained_potentials/SevenNet_l3i5/checkpoint_l3i5.pth",
                                "sevennet_l3i5.npz", "SevenNet-l3i5", CITATION),
    "sevennet-mf-0": Pretrained("pretrained_potentials/SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
                                "sevennet_mf_0.npz", "SevenNet-MF-0", CITATION_MF + "; " + CITATION),
}
SEVENNET_0 = PRETRAINED["sevennet-0"].checkpoint
DEFAULT_OUTPUT = DATA / PRETRAINED["sevennet-0"].output


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"unsupported SevenNet checkpoint: {what}")


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _linear_blocks(module, name: str, n_modalities: int = 0) -> dict[str, np.ndarray]:
    """An e3nn ``o3.Linear`` (simplified irreps, no biases) -> ``{"name.l{l}": (mul_in, mul_out)}``.

    With ``n_modalities`` the last input block is the modality one-hot ``n x 0e`` (sevenn's
    ``IrrepsLinear.set_num_modalities``): its weights become ``"name.modal"`` ``(n, mul_out)``
    and the scalar outputs' normalisation ``1/sqrt(mul_in + n)`` is checked.
    """
    _require(module.bias.numel() == 0, f"{name} has biases")
    flat = _numpy(module.weight)
    modal_block = len(module.irreps_in) - 1 if n_modalities else -1
    if n_modalities:
        _require(str(module.irreps_in[modal_block]) == f"{n_modalities}x0e", f"{name}: modality input")
    out, offset, seen = {}, 0, set()
    for ins in module.instructions:
        mul_in, mul_out = ins.path_shape
        ir_in, ir_out = module.irreps_in[ins.i_in].ir, module.irreps_out[ins.i_out].ir
        _require(ir_in == ir_out and ir_in.p == 1, f"{name}: path {ir_in} -> {ir_out}")
        weights = flat[offset:offset + mul_in * mul_out].reshape(mul_in, mul_out)
        offset += mul_in * mul_out
        if ins.i_in == modal_block:
            fan_in = module.irreps_in[0].mul + n_modalities
            _require(ir_in.l == 0 and math.isclose(ins.path_weight, 1 / math.sqrt(fan_in), rel_tol=1e-12),
                     f"{name}: modality normalisation")
            out[f"{name}.modal"] = weights
            continue
        _require(ir_in.l not in seen, f"{name}: irreps not simplified")
        fan_in = mul_in + (n_modalities if (n_modalities and ir_in.l == 0) else 0)
        _require(math.isclose(ins.path_weight, 1 / math.sqrt(fan_in), rel_tol=1e-12), f"{name}: normalisation")
        seen.add(ir_in.l)
        out[f"{name}.l{ir_in.l}"] = weights
    _require(offset == flat.size, f"{name}: {flat.size} weights, {offset} used")
    _require(not n_modalities or f"{name}.modal" in out, f"{name}: no modality input")
    return out


def _activation_scale(act, name: str) -> float:
    """The SiLU of an e3nn module and its normalize2mom constant."""
    import torch

    f = getattr(act, "f", None)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    _require(f is not None and torch.allclose(f(x), torch.nn.functional.silu(x)), f"{name}: activation is not SiLU")
    _require(not act._is_id, f"{name}: identity-normalised activation")
    return float(act.cst)


def convert(checkpoint: str | os.PathLike, model_name: str | None = None,
            citation: str = CITATION) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a SevenNet checkpoint -> ``(config, arrays)`` (see the module docstring).

    ``model_name`` labels the model in the config (default: the checkpoint's file name).
    """
    from sevenn.checkpoint import SevenNetCheckpoint

    cp = SevenNetCheckpoint(str(checkpoint))
    cfg = cp.config
    model = cp.build_model()
    modules = model._modules

    _require(cfg["interaction_type"] == "nequip", f"interaction_type {cfg['interaction_type']!r}")
    _require(cfg["self_connection_type"] == "linear", f"self_connection_type {cfg['self_connection_type']!r}")
    _require(not cfg["is_parity"], "is_parity=True")
    _require(not cfg["use_bias_in_linear"], "biases in linear layers")
    _require(not cfg["readout_as_fcn"], "readout_as_fcn")
    _require(cfg["radial_basis"]["radial_basis_name"] == "bessel", "radial basis")
    cutoff_name = cfg["cutoff_function"]["cutoff_function_name"]
    _require(cutoff_name in ("XPLOR", "poly_cut"), f"cutoff function {cutoff_name!r}")
    modalities: list[str] = []
    modal_layers: dict[str, bool] = {}
    if cfg.get("use_modality", False):
        modal_map = {str(k): int(v) for k, v in cfg["_modal_map"].items()}
        modalities = [m for m, _ in sorted(modal_map.items(), key=lambda kv: kv[1])]
        _require(sorted(modal_map.values()) == list(range(len(modalities))) == list(range(model_modalities(model))),
                 "modality map")
        _require(not cfg["use_modal_node_embedding"], "modal node embedding")
        _require(not cfg.get("use_modal_wise_scale", False), "modality-wise scale")
        modal_layers = dict(linear_1=cfg["use_modal_self_inter_intro"], linear_2=cfg["use_modal_self_inter_outro"],
                            readout=cfg["use_modal_output_block"])
    n_modal = len(modalities)
    _require(cfg["act_radial"] == "silu" and cfg["act_scalar"]["e"] == "silu" and cfg["act_gate"]["e"] == "silu",
             "activations other than SiLU")
    n_layers = cfg["num_convolution_layer"]
    lmax_filter = cfg["lmax"] if cfg["lmax_edge"] < 0 else cfg["lmax_edge"]
    sph = modules["edge_embedding"].spherical
    _require(sph.normalization == "component", "spherical harmonics normalisation")
    _require(bool(sph.sph.normalize) == bool(cfg["_normalize_sph"]), "spherical harmonics of unit vectors or not")
    _require([ir.l for _, ir in sph.irreps_out] == list(range(lmax_filter + 1)), "filter irreps")

    type_map = {int(z): int(i) for z, i in cfg["_type_map"].items()}
    numbers = [z for z, _ in sorted(type_map.items(), key=lambda kv: kv[1])]
    _require(sorted(type_map.values()) == list(range(len(numbers))), "type map")

    arrays: dict[str, np.ndarray] = {}
    scales = []
    embedding = modules["onehot_to_feature_x"].linear
    arrays.update(_linear_blocks(embedding, "embedding"))
    arrays["bessel_coeffs"] = _numpy(modules["edge_embedding"].basis_function.coeffs)
    cut = modules["edge_embedding"].cutoff_function
    if cutoff_name == "XPLOR":
        _require(math.isclose(float(cut.r_cut), float(cfg["cutoff"])), "XPLOR cutoff")
        cutoff_function = dict(name="xplor", r_on=float(cut.r_on))
    else:
        p = float(cut.p)
        _require(p == int(p) and math.isclose(float(cut.cutoff_length), float(cfg["cutoff"]))
                 and (cut.coeff_p0, cut.coeff_p1, cut.coeff_p2) == ((p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2),
                 "polynomial cutoff")
        cutoff_function = dict(name="poly_cut", p=int(p))

    irreps = [str(embedding.irreps_out)]
    denominators = []
    for t in range(n_layers):
        conv = modules[f"{t}_convolution"]
        tp, mlp = conv.convolution, conv.weight_nn
        x_irreps = parse_irreps(str(tp.irreps_in1))
        _require(str(tp.irreps_in1) == irreps[-1], f"layer {t}: input irreps")
        out_ls = sorted({ir.l for _, ir in tp.irreps_out})
        paths = convolution_paths(x_irreps, lmax_filter, out_ls)
        _require(len(paths) == len(tp.instructions), f"layer {t}: {len(tp.instructions)} paths, expected {len(paths)}")
        for path, ins in zip(paths, tp.instructions):
            got = (tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l,
                   tp.irreps_out[ins.i_out].mul)
            _require(got == (path.l1, path.l2, path.l3, path.mul) and ins.connection_mode == "uvu",
                     f"layer {t}: path order {got} != {path[:4]}")
            _require(math.isclose(ins.path_weight, math.sqrt(2 * path.l3 + 1), rel_tol=1e-12),
                     f"layer {t}: path normalisation")
        _require(mlp.hs[-1] == sum(p.mul for p in paths), f"layer {t}: radial network output")
        for k in range(len(mlp.hs) - 1):
            layer = getattr(mlp, f"layer{k}")
            _require(layer.var_in == 1 and layer.var_out == 1, f"layer {t}: radial network variances")
            arrays[f"layer{t}.radial.{k}"] = _numpy(layer.weight)
            if layer.act is not None:
                scales.append(_activation_scale(layer.act, f"layer {t} radial"))
        denominators.append(float(conv.denominator.detach().cpu().item()))

        arrays.update(_linear_blocks(modules[f"{t}_self_connection_intro"].linear, f"layer{t}.self_connection"))
        arrays.update(_linear_blocks(modules[f"{t}_self_interaction_1"].linear, f"layer{t}.linear_1",
                                     n_modal if modal_layers.get("linear_1") else 0))
        arrays.update(_linear_blocks(modules[f"{t}_self_interaction_2"].linear, f"layer{t}.linear_2",
                                     n_modal if modal_layers.get("linear_2") else 0))
        gate = modules[f"{t}_equivariant_gate"].gate
        scalars, gates, gated = gate.irreps_scalars, gate.irreps_gates, gate.irreps_gated
        _require(all(ir.l == 0 for _, ir in scalars) and len(scalars) == 1, f"layer {t}: gate scalars")
        _require(gates.num_irreps == gated.num_irreps, f"layer {t}: gates")
        scales.append(_activation_scale(gate.act_scalars.acts[0], f"layer {t} gate scalars"))
        if len(gates):
            scales.append(_activation_scale(gate.act_gates.acts[0], f"layer {t} gates"))
        irreps.append(str(gate.irreps_out.simplify()))

    arrays.update(_linear_blocks(modules["reduce_input_to_hidden"].linear, "readout.0",
                                 n_modal if modal_layers.get("readout") else 0))
    arrays.update(_linear_blocks(modules["reduce_hidden_to_energy"].linear, "readout.1"))
    rescale = modules["rescale_atomic_energy"]
    arrays["shift"] = _numpy(rescale.shift)
    arrays["scale"] = _numpy(rescale.scale)
    modal_shift = bool(n_modal and cfg["use_modal_wise_shift"])
    _require(arrays["shift"].shape == ((n_modal, len(numbers)) if modal_shift else (len(numbers),)),
             "per-species shift")
    _require(arrays["scale"].shape == (len(numbers),), "per-species scale")
    _require(max(scales) - min(scales) < 1e-15, "different activation scales")

    with open(checkpoint, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    config = dict(
        format=FORMAT,
        model=model_name or Path(checkpoint).name,
        source=os.path.basename(str(checkpoint)), source_sha256=digest,
        sevenn_version=str(cfg.get("version", "")),
        cutoff=float(cfg["cutoff"]), num_basis=int(cfg["radial_basis"]["bessel_basis_num"]),
        cutoff_function=cutoff_function,
        lmax_filter=int(lmax_filter), normalize_sph=bool(cfg["_normalize_sph"]), irreps=irreps, radial_hidden=list(cfg["weight_nn_hidden_neurons"]),
        act_scale=scales[0], denominators=denominators, numbers=numbers,
        modalities=modalities, modal_shift=modal_shift,
        license="MIT (c) 2024 Yutack Park; see SEVENNET_LICENSE", citation=citation,
    )
    return config, arrays


def save(path: str | os.PathLike, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and ``config`` (as ``config.json``) to a compressed ``.npz``."""
    buffer = io.BytesIO()
    payload = dict(arrays)
    payload["config.json"] = np.frombuffer(json.dumps(config, indent=1).encode(), dtype=np.uint8)
    np.savez_compressed(buffer, **payload)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(buffer.getvalue())


def model_modalities(model) -> int:
    """How many modalities sevenn's model was built with (0 without)."""
    onehot = model._modules.get("one_hot_modality")
    return int(onehot.num_classes) if onehot is not None else 0


def default_checkpoint(name: str = "sevennet-0") -> str:
    """Path of a :data:`PRETRAINED` checkpoint in the installed sevenn wheel."""
    import sevenn

    return os.path.join(os.path.dirname(sevenn.__file__), PRETRAINED[name].checkpoint)


def convert_pretrained(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """:func:`convert` of the :data:`PRETRAINED` checkpoint ``name``, labelled and cited as shipped."""
    entry = PRETRAINED[name]
    return convert(default_checkpoint(name), model_name=entry.model, citation=entry.citation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m potentials.convert_sevennet", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="sevennet-0",
                        help=f"a name of {', '.join(PRETRAINED)} (from the sevenn wheel) or a .pth checkpoint "
                             "(default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="convert every pretrained model into potentials/data")
    parser.add_argument("-o", "--output", help="output .npz (default: potentials/data/<name>.npz for a pretrained "
                                               "model, required for a checkpoint file)")
    args = parser.parse_args(argv)
    if args.all:
        jobs = [(name, DATA / entry.output) for name, entry in PRETRAINED.items()]
    elif args.checkpoint in PRETRAINED:
        jobs = [(args.checkpoint, Path(args.output) if args.output else DATA / PRETRAINED[args.checkpoint].output)]
    elif args.output:
        jobs = [(args.checkpoint, Path(args.output))]
    else:
        parser.error(f"{args.checkpoint!r} is not one of {', '.join(PRETRAINED)}: give --output for a checkpoint file")
    for source, output in jobs:
        config, arrays = convert_pretrained(source) if source in PRETRAINED else convert(source)
        save(output, config, arrays)
        n = sum(a.size for a in arrays.values())
        print(f"wrote {output}: {config['model']}, {n} parameters, {len(config['numbers'])} elements, "
              f"cutoff {config['cutoff']} A, modalities {config['modalities'] or 'none'}")


if __name__ == "__main__":
    main()
