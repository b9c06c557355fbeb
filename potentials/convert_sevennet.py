"""Convert a SevenNet checkpoint (torch) into the framework-neutral file :mod:`potentials.sevennet` reads.

    python -m potentials.convert_sevennet                       # SevenNet-0 from the sevenn wheel
    python -m potentials.convert_sevennet CHECKPOINT.pth -o OUT.npz

Needs ``torch`` and ``sevenn`` (the loader does not). The output is an ``.npz`` of float32
arrays plus one ``config.json`` entry (UTF-8 bytes) holding the hyperparameters, the
atomic-number order of the species tables, and the constants e3nn computed at build time
(SiLU's second-moment scale). Every weight is stored in our own layout (one
``(mul_in, mul_out)`` matrix per angular momentum ``l``); the converter checks that the
checkpoint's architecture is the one :mod:`potentials.sevennet_layers` implements
(irreps, tensor-product paths and their order, normalisations) and refuses anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from .sevennet_layers import convolution_paths, parse_irreps

#: The checkpoint of SevenNet-0 (11 July 2024) inside the sevenn wheel.
SEVENNET_0 = "pretrained_potentials/SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth"
DEFAULT_OUTPUT = Path(__file__).parent / "data" / "sevennet_0.npz"
FORMAT = "kups-relax/sevennet/1"

CITATION = ("Y. Park, J. Kim, S. Hwang, S. Han, Scalable Parallel Algorithm for Graph Neural Network "
            "Interatomic Potentials in Molecular Dynamics Simulations, J. Chem. Theory Comput. 20, "
            "4857-4868 (2024), doi:10.1021/acs.jctc.4c00190")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"unsupported SevenNet checkpoint: {what}")


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _linear_blocks(module, name: str) -> dict[str, np.ndarray]:
    """An e3nn ``o3.Linear`` (simplified irreps, no biases) -> ``{"name.l{l}": (mul_in, mul_out)}``."""
    _require(module.bias.numel() == 0, f"{name} has biases")
    flat = _numpy(module.weight)
    out, offset, seen = {}, 0, set()
    for ins in module.instructions:
        mul_in, mul_out = ins.path_shape
        ir_in, ir_out = module.irreps_in[ins.i_in].ir, module.irreps_out[ins.i_out].ir
        _require(ir_in == ir_out and ir_in.p == 1, f"{name}: path {ir_in} -> {ir_out}")
        _require(ir_in.l not in seen, f"{name}: irreps not simplified")
        _require(math.isclose(ins.path_weight, 1 / math.sqrt(mul_in), rel_tol=1e-12), f"{name}: normalisation")
        seen.add(ir_in.l)
        out[f"{name}.l{ir_in.l}"] = flat[offset:offset + mul_in * mul_out].reshape(mul_in, mul_out)
        offset += mul_in * mul_out
    _require(offset == flat.size, f"{name}: {flat.size} weights, {offset} used")
    return out


def _activation_scale(act, name: str) -> float:
    """The SiLU of an e3nn module and its normalize2mom constant."""
    import torch

    f = getattr(act, "f", None)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    _require(f is not None and torch.allclose(f(x), torch.nn.functional.silu(x)), f"{name}: activation is not SiLU")
    _require(not act._is_id, f"{name}: identity-normalised activation")
    return float(act.cst)


def convert(checkpoint: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a SevenNet checkpoint -> ``(config, arrays)`` (see the module docstring)."""
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
    _require(not cfg.get("use_modality", False), "multi-fidelity (modal) model")
    _require(cfg["radial_basis"]["radial_basis_name"] == "bessel", "radial basis")
    _require(cfg["cutoff_function"]["cutoff_function_name"] == "XPLOR", "cutoff function")
    _require(cfg["_normalize_sph"], "unnormalised spherical harmonics")
    _require(cfg["act_radial"] == "silu" and cfg["act_scalar"]["e"] == "silu" and cfg["act_gate"]["e"] == "silu",
             "activations other than SiLU")
    n_layers = cfg["num_convolution_layer"]
    lmax_filter = cfg["lmax"] if cfg["lmax_edge"] < 0 else cfg["lmax_edge"]
    sph = modules["edge_embedding"].spherical
    _require(sph.normalization == "component", "spherical harmonics normalisation")
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
        arrays.update(_linear_blocks(modules[f"{t}_self_interaction_1"].linear, f"layer{t}.linear_1"))
        arrays.update(_linear_blocks(modules[f"{t}_self_interaction_2"].linear, f"layer{t}.linear_2"))
        gate = modules[f"{t}_equivariant_gate"].gate
        scalars, gates, gated = gate.irreps_scalars, gate.irreps_gates, gate.irreps_gated
        _require(all(ir.l == 0 for _, ir in scalars) and len(scalars) == 1, f"layer {t}: gate scalars")
        _require(gates.num_irreps == gated.num_irreps, f"layer {t}: gates")
        scales.append(_activation_scale(gate.act_scalars.acts[0], f"layer {t} gate scalars"))
        if len(gates):
            scales.append(_activation_scale(gate.act_gates.acts[0], f"layer {t} gates"))
        irreps.append(str(gate.irreps_out.simplify()))

    arrays.update(_linear_blocks(modules["reduce_input_to_hidden"].linear, "readout.0"))
    arrays.update(_linear_blocks(modules["reduce_hidden_to_energy"].linear, "readout.1"))
    rescale = modules["rescale_atomic_energy"]
    arrays["shift"] = _numpy(rescale.shift)
    arrays["scale"] = _numpy(rescale.scale)
    _require(arrays["shift"].shape == (len(numbers),), "per-species shift")
    _require(max(scales) - min(scales) < 1e-15, "different activation scales")

    with open(checkpoint, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    config = dict(
        format=FORMAT,
        model="SevenNet-0 (11Jul2024)" if str(checkpoint).endswith(SEVENNET_0) else Path(checkpoint).name,
        source=os.path.basename(str(checkpoint)), source_sha256=digest,
        sevenn_version=str(cfg.get("version", "")),
        cutoff=float(cfg["cutoff"]), cutoff_on=float(cut.r_on), num_basis=int(cfg["radial_basis"]["bessel_basis_num"]),
        lmax_filter=int(lmax_filter), irreps=irreps, radial_hidden=list(cfg["weight_nn_hidden_neurons"]),
        act_scale=scales[0], denominators=denominators, numbers=numbers,
        license="MIT (c) 2024 Yutack Park; see SEVENNET_LICENSE", citation=CITATION,
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


def default_checkpoint() -> str:
    """Path of SevenNet-0's checkpoint in the installed sevenn wheel."""
    import sevenn

    return os.path.join(os.path.dirname(sevenn.__file__), SEVENNET_0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m potentials.convert_sevennet", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="SevenNet .pth checkpoint (default: SevenNet-0 from sevenn)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="output .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    config, arrays = convert(args.checkpoint or default_checkpoint())
    save(args.output, config, arrays)
    n = sum(a.size for a in arrays.values())
    print(f"wrote {args.output}: {n} parameters, {len(config['numbers'])} elements, cutoff {config['cutoff']} A")


if __name__ == "__main__":
    main()
