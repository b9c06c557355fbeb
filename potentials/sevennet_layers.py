"""The building blocks of SevenNet (NequIP-style, SO(3)-equivariant), in e3nn's conventions.

Node features are kept as a dict ``l -> (N, mul, 2l+1)``: one block per angular momentum
``l`` (all of even parity; SevenNet-0 does not track parity), ``mul`` channels each, the
``2l+1`` components in e3nn's real basis (``l=1`` is ``(x, y, z)``). This is e3nn's
``mul_ir`` layout of simplified, sorted irreps such as ``128x0e+64x1e+32x2e``, split by ``l``.

Conventions reproduced from e3nn (the reference SevenNet is built on it):

* spherical harmonics: ``normalization='component'`` (every ``Y_l`` has squared norm
  ``2l+1`` on the unit sphere), of the normalised edge vector;
* ``o3.Linear``: every output channel is ``sum_u x_u W_uw / sqrt(fan_in)`` with
  ``fan_in`` the input channels of the same ``l`` ("element" path normalisation);
* ``o3.TensorProduct`` with ``'uvu'`` paths and ``irrep_normalization='component'``: path
  ``(l1, l2 -> l3)`` gives ``sqrt(2 l3 + 1) w_u sum_ij C_ijk x_ui y_j`` with ``C`` the
  real Wigner 3j symbol (unit Frobenius norm), one output block per path;
* ``nn.FullyConnectedNet``: ``x W / sqrt(fan_in)``, no biases, hidden activations scaled to
  unit second moment (the constant comes with the weights, as e3nn computed it);
* ``nn.Gate``: scalars (then gates) first in the ``l=0`` block; ``act(gate) * x`` for ``l>0``.

Nothing here knows about batches or systems; lengths in Å.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Features = dict  # l -> (N, mul, 2l+1)


def parse_irreps(irreps: str) -> tuple[tuple[int, int], ...]:
    """``"128x0e+64x1e+32x2e"`` -> ``((128, 0), (64, 1), (32, 2))`` (even parity only, sorted, simplified)."""
    out: list[tuple[int, int]] = []
    for term in irreps.replace(" ", "").split("+"):
        mul, _, ir = term.partition("x")
        if not ir:
            mul, ir = "1", term
        if not ir.endswith("e") or not ir[:-1].isdigit():
            raise ValueError(f"irreps {irreps!r}: only even-parity terms like '32x2e' are supported, got {term!r}")
        out.append((int(mul), int(ir[:-1])))
    ls = [l for _, l in out]
    if ls != sorted(set(ls)):
        raise ValueError(f"irreps {irreps!r} must be sorted by l with one term per l")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# edge features


def spherical_harmonics(unit: jax.Array, lmax: int) -> dict[int, jax.Array]:
    """Real spherical harmonics of unit vectors ``(E, 3)`` -> ``l -> (E, 2l+1)`` (e3nn basis, component norm)."""
    if lmax > 2:
        raise NotImplementedError(f"spherical harmonics are implemented up to l=2, asked for lmax={lmax}")
    x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
    out = {0: jnp.ones_like(x)[:, None]}
    if lmax >= 1:
        out[1] = math.sqrt(3.0) * unit
    if lmax >= 2:
        s15, s5 = math.sqrt(15.0), math.sqrt(5.0)
        out[2] = jnp.stack([
            s15 * x * z,
            s15 * x * y,
            s5 * (y * y - 0.5 * (x * x + z * z)),
            s15 * y * z,
            0.5 * s15 * (z * z - x * x),
        ], axis=-1)
    return out


def bessel_basis(r: jax.Array, coeffs: jax.Array, cutoff: float) -> jax.Array:
    """``(2/r_c) sin(k_n r) / r`` for distances ``r`` ``(E,)`` Å, wave numbers ``coeffs`` ``(B,)`` 1/Å -> ``(E, B)``."""
    return (2.0 / cutoff) * jnp.sin(coeffs[None, :] * r[:, None]) / r[:, None]


def xplor_cutoff(r: jax.Array, r_on: float, r_cut: float) -> jax.Array:
    """XPLOR switching function: 1 below ``r_on``, smooth to 0 at ``r_cut`` (Å); ``(E,)``."""
    r2, on2, cut2 = r * r, r_on * r_on, r_cut * r_cut
    switch = (cut2 - r2) ** 2 * (cut2 + 2.0 * r2 - 3.0 * on2) / (cut2 - on2) ** 3
    return jnp.where(r < r_on, 1.0, switch)


def radial_mlp(x: jax.Array, weights: Sequence[jax.Array], act_scale: float) -> jax.Array:
    """e3nn ``FullyConnectedNet`` with SiLU: ``(E, B)`` -> ``(E, weights[-1].shape[1])``."""
    for k, w in enumerate(weights):
        x = x @ (w / math.sqrt(w.shape[0]))
        if k < len(weights) - 1:
            x = jax.nn.silu(x) * act_scale
    return x


# ---------------------------------------------------------------------------------------------
# node operations


def linear(x: Mapping[int, jax.Array], weights: Mapping[int, jax.Array]) -> Features:
    """e3nn ``o3.Linear`` between blocks: ``out[l] = x[l] W[l] / sqrt(mul_in(l))``.

    ``weights[l]`` is ``(mul_in, mul_out)``; output ``l`` without input of that ``l`` are left out
    (they are zero).
    """
    out = {}
    for l, w in weights.items():
        out[l] = jnp.einsum("nui,uw->nwi", x[l], w) / math.sqrt(w.shape[0])
    return out


def add(a: Mapping[int, jax.Array], b: Mapping[int, jax.Array]) -> Features:
    """Block-wise sum (a missing block is zero)."""
    return {l: a[l] + b[l] if (l in a and l in b) else (a[l] if l in a else b[l]) for l in sorted(set(a) | set(b))}


def gate(x: Mapping[int, jax.Array], n_scalars: int, act_scale: float) -> Features:
    """e3nn ``nn.Gate`` with SiLU for scalars and gates.

    ``x[0]`` holds ``n_scalars`` scalars then one gate per channel of ``x[1]``, ``x[2]``, ... (in
    that order); the output keeps ``act(scalars)`` and ``act(gate) * x[l]``.
    """
    scalars = x[0][:, :n_scalars]
    out = {0: jax.nn.silu(scalars) * act_scale}
    start = n_scalars
    for l in sorted(k for k in x if k > 0):
        mul = x[l].shape[1]
        g = jax.nn.silu(x[0][:, start:start + mul]) * act_scale
        out[l] = x[l] * g
        start += mul
    if start != x[0].shape[1]:
        raise ValueError(f"gate: {x[0].shape[1]} scalars for {n_scalars} outputs and {start - n_scalars} gates")
    return out


# ---------------------------------------------------------------------------------------------
# the convolution's tensor product


class Path(NamedTuple):
    """One ``'uvu'`` path of the convolution: input block ``l1`` times filter ``l2`` -> ``l3``."""

    l1: int
    l2: int
    l3: int
    mul: int
    weight_offset: int  # first of its ``mul`` weights in the radial network's output


def convolution_paths(irreps_x: Sequence[tuple[int, int]], lmax_filter: int,
                      out_ls: Sequence[int]) -> tuple[Path, ...]:
    """The paths of SevenNet's ``IrrepsConvolution`` in e3nn's order (sorted by output ``l``, stably).

    The radial network's outputs are the paths' weights in this order, ``mul`` each, and the
    output blocks of one ``l3`` are the paths' outputs concatenated in this order.
    """
    paths = []
    for mul, l1 in irreps_x:
        for l2 in range(lmax_filter + 1):
            for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                if l3 in out_ls:
                    paths.append((l1, l2, l3, mul))
    paths.sort(key=lambda p: p[2])  # stable: e3nn sorts the output irreps by l
    out, offset = [], 0
    for l1, l2, l3, mul in paths:
        out.append(Path(l1, l2, l3, mul, offset))
        offset += mul
    return tuple(out)


@functools.lru_cache(maxsize=None)
def wigner_3j(l1: int, l2: int, l3: int) -> np.ndarray:
    """Real Wigner 3j symbol ``(2l1+1, 2l2+1, 2l3+1)`` in e3nn's basis (unit Frobenius norm), float64."""
    import e3nn_jax

    return np.asarray(e3nn_jax.clebsch_gordan(l1, l2, l3), dtype=np.float64)


def tensor_product(x: Mapping[int, jax.Array], sh: Mapping[int, jax.Array], weights: jax.Array,
                   paths: Sequence[Path]) -> Features:
    """Per-edge ``'uvu'`` tensor products of node features and edge harmonics.

    Args:
        x: ``l -> (E, mul, 2l+1)`` the neighbours' features, one row per edge.
        sh: ``l -> (E, 2l+1)`` spherical harmonics of the edges.
        weights: ``(E, W)`` the radial network's output (zero for edges to leave out).
        paths: from :func:`convolution_paths`.

    Returns:
        ``l3 -> (E, sum of the paths' mul, 2l3+1)``.
    """
    dtype = weights.dtype
    # one contraction per (l1, l2): T[e, i, k] = sum_j C[i, j, k] Y[e, j] over all l3 at once
    products: dict[tuple[int, int], dict[int, jax.Array]] = {}
    for l1, l2 in dict.fromkeys((p.l1, p.l2) for p in paths):
        l3s = sorted({p.l3 for p in paths if p.l1 == l1 and p.l2 == l2})
        cg = np.concatenate([wigner_3j(l1, l2, l3) * math.sqrt(2 * l3 + 1) for l3 in l3s], axis=-1)
        t = jnp.einsum("ijk,ej->eik", jnp.asarray(cg, dtype), sh[l2])  # (E, 2l1+1, K)
        # (E, mul, K); as a batched matmul its gradient is two batched matmuls, which XLA's CPU
        # backend runs faster than the broadcast-and-reduce alternative
        prod = jnp.einsum("eui,eik->euk", x[l1], t) if l1 > 0 else x[l1] * t
        split, start = {}, 0
        for l3 in l3s:
            split[l3] = prod[:, :, start:start + 2 * l3 + 1]
            start += 2 * l3 + 1
        products[(l1, l2)] = split
    out: dict[int, list[jax.Array]] = {}
    for p in paths:
        w = weights[:, p.weight_offset:p.weight_offset + p.mul, None]
        out.setdefault(p.l3, []).append(w * products[(p.l1, p.l2)][p.l3])
    return {l3: jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0] for l3, blocks in out.items()}
