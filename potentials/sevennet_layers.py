"""The building blocks of SevenNet (NequIP-style, SO(3)-equivariant), in e3nn's conventions.

Node features are kept as a dict ``l -> (A, 2l+1, mul)``: one block per angular momentum
``l`` (all of even parity; SevenNet-0 does not track parity), the ``2l+1`` components in
e3nn's real basis (``l=1`` is ``(x, y, z)``), ``mul`` channels each, channels last. This is
e3nn's ``mul_ir`` layout of simplified, sorted irreps such as ``128x0e+64x1e+32x2e(+32x3e)``, split by
``l`` and with the two inner axes swapped: with channels innermost every per-edge product
below is a vectorized loop over channels (32-128 wide) instead of over 1-5 components.

Edge quantities live on the neighbor matrix, neighbour-major: ``(W, A, ...)`` with entry
``[k, i]`` atom ``i``'s ``k``-th neighbour; a sum over neighbours is a sum over axis 0.

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

Features = dict  # l -> (A, 2l+1, mul)


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


def spherical_harmonics(vectors: jax.Array, lmax: int) -> jax.Array:
    """Real spherical harmonics ``(..., 3)`` -> ``(..., (lmax+1)**2)``: ``Y_0``, then ``Y_1``'s 3,
    ``Y_2``'s 5 and ``Y_3``'s 7 components (e3nn basis and formulas, component normalisation).

    On unit vectors these are the harmonics; on any other vector ``r`` they are e3nn's
    ``normalize=False`` values, the homogeneous polynomials ``|r|^l Y_l(r/|r|)``.
    """
    if lmax > 3:
        raise NotImplementedError(f"spherical harmonics are implemented up to l=3, asked for lmax={lmax}")
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    out = [jnp.ones_like(x)]
    if lmax >= 1:
        s3 = math.sqrt(3.0)
        out += [s3 * x, s3 * y, s3 * z]
    if lmax >= 2:
        s15, s5 = math.sqrt(15.0), math.sqrt(5.0)
        y2, x2z2 = y * y, x * x + z * z
        sh_2_0, sh_2_4 = s15 * x * z, 0.5 * s15 * (z * z - x * x)
        out += [sh_2_0, s15 * x * y, s5 * (y2 - 0.5 * x2z2), s15 * y * z, sh_2_4]
    if lmax >= 3:
        s42, s7, s168 = math.sqrt(42.0), math.sqrt(7.0), math.sqrt(168.0)
        out += [(s42 / 6) * (sh_2_0 * z + sh_2_4 * x), s7 * sh_2_0 * y, (s168 / 8) * (4.0 * y2 - x2z2) * x,
                (s7 / 2) * y * (2.0 * y2 - 3.0 * x2z2), (s168 / 8) * z * (4.0 * y2 - x2z2), s7 * sh_2_4 * y,
                (s42 / 6) * (sh_2_4 * z - sh_2_0 * x)]
    return jnp.stack(out, axis=-1)


def bessel_basis(r: jax.Array, coeffs: jax.Array, cutoff: float) -> jax.Array:
    """``(2/r_c) sin(k_n r) / r`` for distances ``r`` ``(...)`` Å and wave numbers ``coeffs`` ``(B,)``
    1/Å -> ``(..., B)``."""
    return (2.0 / cutoff) * jnp.sin(coeffs * r[..., None]) / r[..., None]


def polynomial_cutoff(r: jax.Array, r_cut: float, p: int) -> jax.Array:
    """Polynomial envelope of order ``p`` (Gasteiger et al., DimeNet, arXiv:2003.03123):
    ``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` with ``x = r / r_cut``; same shape as ``r``
    (meant for ``r < r_cut``; entries beyond are masked by the caller).

    Evaluated in the equal factored form ``(1-x)^3 sum_{k<p} C(k+2, 2) x^k`` (the envelope has a
    triple root at ``x = 1``): near the cutoff the expanded form cancels terms of size ~50 down
    to ~0, which in float32 leaves errors of ~1e-6 absolute; the factored form has none.
    """
    x = r / r_cut
    series = jnp.zeros_like(x) + (p + 1) * p / 2
    for k in range(p - 2, -1, -1):  # Horner
        series = series * x + (k + 2) * (k + 1) / 2
    u = 1.0 - x
    return u * u * u * series


def xplor_cutoff(r: jax.Array, r_on: float, r_cut: float) -> jax.Array:
    """XPLOR switching function: 1 below ``r_on``, smooth to 0 at ``r_cut`` (Å); same shape as ``r``."""
    r2, on2, cut2 = r * r, r_on * r_on, r_cut * r_cut
    switch = (cut2 - r2) ** 2 * (cut2 + 2.0 * r2 - 3.0 * on2) / (cut2 - on2) ** 3
    return jnp.where(r < r_on, 1.0, switch)


def radial_mlp(x: jax.Array, weights: Sequence[jax.Array], act_scale: float) -> jax.Array:
    """e3nn ``FullyConnectedNet`` with SiLU: ``(..., B)`` -> ``(..., weights[-1].shape[1])``."""
    shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    for k, w in enumerate(weights):
        x = x @ (w / math.sqrt(w.shape[0]))
        if k < len(weights) - 1:
            x = jax.nn.silu(x) * act_scale
    return x.reshape(shape + (x.shape[-1],))


# ---------------------------------------------------------------------------------------------
# node operations


def linear(x: Mapping[int, jax.Array], weights: Mapping[int, jax.Array], bias: jax.Array | None = None,
           bias_fan_in: int = 0) -> Features:
    """e3nn ``o3.Linear`` between blocks: ``out[l] = x[l] W[l] / sqrt(mul_in(l))``.

    ``weights[l]`` is ``(mul_in, mul_out)``; output ``l`` without input of that ``l`` are left out
    (they are zero). ``bias`` ``(mul_out(0),)`` is the contribution of ``bias_fan_in`` extra scalar
    inputs with fixed values (a multi-fidelity model's modality one-hot: the weights' row of the
    chosen modality), added to the scalars; the scalars' fan-in is then ``mul_in(0) + bias_fan_in``.
    """
    out = {}
    for l, w in weights.items():
        v = x[l]
        fan_in = w.shape[0] + (bias_fan_in if (l == 0 and bias is not None) else 0)
        out[l] = (v.reshape(-1, v.shape[-1]) @ (w / math.sqrt(fan_in))).reshape(v.shape[:-1] + (w.shape[1],))
        if l == 0 and bias is not None:
            out[l] = out[l] + bias / math.sqrt(fan_in)
    return out


def add(a: Mapping[int, jax.Array], b: Mapping[int, jax.Array]) -> Features:
    """Block-wise sum (a missing block is zero)."""
    return {l: a[l] + b[l] if (l in a and l in b) else (a[l] if l in a else b[l]) for l in sorted(set(a) | set(b))}


def gate(x: Mapping[int, jax.Array], n_scalars: int, act_scale: float) -> Features:
    """e3nn ``nn.Gate`` with SiLU for scalars and gates.

    ``x[0]`` holds ``n_scalars`` scalars then one gate per channel of ``x[1]``, ``x[2]``, ... (in
    that order); the output keeps ``act(scalars)`` and ``act(gate) * x[l]``.
    """
    scalars = x[0][..., :n_scalars]
    out = {0: jax.nn.silu(scalars) * act_scale}
    start = n_scalars
    for l in sorted(k for k in x if k > 0):
        mul = x[l].shape[-1]
        g = jax.nn.silu(x[0][..., start:start + mul]) * act_scale
        out[l] = x[l] * g
        start += mul
    if start != x[0].shape[-1]:
        raise ValueError(f"gate: {x[0].shape[-1]} scalars for {n_scalars} outputs and {start - n_scalars} gates")
    return out


def flatten(x: Mapping[int, jax.Array]) -> jax.Array:
    """Features as one ``(A, F)`` table, blocks in ``l`` order, each component's channels contiguous."""
    return jnp.concatenate([x[l].reshape(x[l].shape[0], -1) for l in sorted(x)], axis=-1)


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


def coupling(group: Sequence[Path], lmax_filter: int) -> np.ndarray:
    """``(J, I, O)`` Clebsch-Gordan couplings of one input ``l1``'s paths: harmonic ``j`` (all
    ``l2 <= lmax_filter``) times input component ``i`` to output ``o``, the paths' ``2 l3 + 1``
    outputs one after another in ``group``'s order, each scaled by ``sqrt(2 l3 + 1)`` (float64)."""
    l1 = group[0].l1
    out = np.zeros(((lmax_filter + 1) ** 2, 2 * l1 + 1, sum(2 * p.l3 + 1 for p in group)))
    start = 0
    for p in group:
        cg = wigner_3j(p.l1, p.l2, p.l3) * math.sqrt(2 * p.l3 + 1)  # (I, J, n_o)
        out[p.l2 ** 2:(p.l2 + 1) ** 2, :, start:start + 2 * p.l3 + 1] = cg.transpose(1, 0, 2)
        start += 2 * p.l3 + 1
    return out


def groups(paths: Sequence[Path]) -> dict[int, tuple[Path, ...]]:
    """The paths by input ``l1`` (each group's paths in ``paths``' order)."""
    out: dict[int, list[Path]] = {}
    for p in paths:
        out.setdefault(p.l1, []).append(p)
    return {l1: tuple(g) for l1, g in out.items()}


class Convolution(NamedTuple):
    """Static description of one interaction block's convolution (hashable).

    Attributes:
        paths: from :func:`convolution_paths`.
        layout: ``(l, mul, first column)`` of every block of the flat input features
            (:func:`flatten`'s layout).
        lmax_filter: largest ``l`` of the edge harmonics.
        act_scale: the radial network's SiLU normalisation.
        rows, cols: the neighbor-matrix tile visited at a time (:class:`potentials.neighbor_graph.Graph`).
    """

    paths: tuple[Path, ...]
    layout: tuple[tuple[int, int, int], ...]
    lmax_filter: int
    act_scale: float
    rows: int
    cols: int


def convolution(conv: Convolution, x: jax.Array, sh: jax.Array, basis: jax.Array, weights: Sequence[jax.Array],
                neighbors: jax.Array, reverse: jax.Array, tiles: jax.Array, n_tiles: jax.Array) -> Features:
    """SevenNet's convolution summed over each atom's neighbours, on the neighbor matrix.

    For every entry ``(k, a)`` (atom ``a``'s ``k``-th neighbour ``j``) and path ``(l1, l2 -> l3)``,
    the ``'uvu'`` tensor product of ``x[j]``'s ``l1`` block with the harmonics ``Y_l2`` of the
    edge, weighted per channel by the radial network of the edge, summed over ``k``. Only the
    first ``n_tiles`` tiles of the matrix are visited; the backward pass is written out
    (:func:`_convolution_bwd`) and transposes the neighbour gather with ``reverse``.

    Args:
        conv: the static :class:`Convolution`.
        x: ``(A, F)`` node features (:func:`flatten`).
        sh: ``(W, A, (lmax_filter+1)**2)`` edge harmonics (:func:`spherical_harmonics`).
        basis: ``(W, A, B)`` the radial network's input (zero for entries to leave out).
        weights: the radial network's weight matrices.
        neighbors, reverse, tiles, n_tiles: from :class:`potentials.neighbor_graph.Graph`.

    Returns:
        ``l3 -> (A, 2l3+1, sum of the paths' mul)``, the paths' blocks in ``conv.paths``' order.
    """
    outs = _convolution(conv, x, sh, basis, tuple(weights), neighbors, reverse, tiles, n_tiles)
    per_l3: dict[int, list[jax.Array]] = {}
    for p, out in zip(conv.paths, outs):
        per_l3.setdefault(p.l3, []).append(out)
    return {l3: jnp.concatenate(v, axis=-1) if len(v) > 1 else v[0] for l3, v in sorted(per_l3.items())}


def _tile(array: jax.Array, tile: jax.Array, conv: Convolution) -> jax.Array:
    return jax.lax.dynamic_slice(array, _start(tile, conv, array.ndim), (conv.rows, conv.cols) + array.shape[2:])


def _start(tile: jax.Array, conv: Convolution, ndim: int) -> tuple:
    return (tile[0] * conv.rows, tile[1] * conv.cols) + (jnp.zeros((), tile.dtype),) * (ndim - 2)


def _columns(array: jax.Array, tile: jax.Array, conv: Convolution) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(array, tile[1] * conv.cols, conv.cols, axis=0)


def _add_columns(array: jax.Array, values: jax.Array, tile: jax.Array, conv: Convolution) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(array, _columns(array, tile, conv) + values, tile[1] * conv.cols, axis=0)


def _components(conv: Convolution, xn: jax.Array, l1: int) -> list[jax.Array]:
    """The neighbours' ``l1`` block as ``2 l1 + 1`` arrays ``(R, C, mul)``."""
    mul, off = {l: (mul, off) for l, mul, off in conv.layout}[l1]
    return [xn[..., off + i * mul:off + (i + 1) * mul] for i in range(2 * l1 + 1)]


def _tile_forward(conv: Convolution, x, sh, basis, weights, neighbors):
    """One tile's sum over its rows of every path's messages: ``[(C, 2 l3 + 1, mul)]``."""
    xn = jax.lax.optimization_barrier(jnp.take(x, neighbors, axis=0, mode="clip"))  # (R, C, F)
    w = radial_mlp(basis, weights, conv.act_scale)  # (R, C, P)
    out = {}
    for l1, group in groups(conv.paths).items():
        xs = _components(conv, xn, l1)
        c = coupling(group, conv.lmax_filter)
        J, I, O = c.shape
        t = (sh.reshape(-1, J) @ jnp.asarray(c.reshape(J, I * O), sh.dtype)).reshape(sh.shape[:2] + (I, O))
        start = 0
        for p in group:
            n = 2 * p.l3 + 1
            wp = w[:, :, None, p.weight_offset:p.weight_offset + p.mul]
            tx = sum(t[:, :, i, start:start + n, None] * xs[i][:, :, None, :] for i in range(I))
            out[p] = jax.lax.optimization_barrier(jnp.sum(wp * tx, axis=0))
            start += n
    return [out[p] for p in conv.paths]


def _tile_backward(conv: Convolution, x, sh, basis, weights, neighbors, h):
    """Cotangents of one tile's neighbour features ``(R, C, F)``, harmonics ``(R, C, J)`` and
    radial inputs ``(R, C, B)``, given ``h[p][i][j] (C, mul)``: the cotangent ``g`` of path
    ``p``'s output contracted with its couplings, ``sum_o C[i, j, o] g[:, o]``.

    With ``q_pj = sum_i x_i h_p[i, j]`` (per entry and channel), the cotangents are
    ``dx_i = sum_p w_p sum_j Y_j h_p[i, j]``, ``dw_p = sum_j Y_j q_pj`` and
    ``dY_j = sum_p sum_u w_p q_pj``: no per-entry coupling tensor is formed."""
    xn = jax.lax.optimization_barrier(jnp.take(x, neighbors, axis=0, mode="clip"))
    w, mlp_vjp = jax.vjp(lambda b: radial_mlp(b, weights, conv.act_scale), basis)
    g_sh = [None] * sh.shape[-1]
    g_x, g_w = {}, {}
    for l1, group in groups(conv.paths).items():
        xs = _components(conv, xn, l1)
        ws = {p: w[..., p.weight_offset:p.weight_offset + p.mul] for p in group}
        ys = {p: [sh[..., p.l2 ** 2 + j, None] for j in range(2 * p.l2 + 1)] for p in group}
        for i in range(len(xs)):
            # d/dx_i = sum over paths of w_p * sum_j Y_j h_p[i, j]
            g_x[(l1, i)] = sum(ws[p] * sum(y * h[p][i][j][None] for j, y in enumerate(ys[p])) for p in group)
        partial = {}
        for p in group:
            q = [sum(xs[i] * h[p][i][j][None] for i in range(len(xs))) for j in range(len(ys[p]))]
            g_w[p] = sum(y * qj for y, qj in zip(ys[p], q))
            for j, qj in enumerate(q):
                # d/dY_j = sum over paths and channels of w_p * q_pj (one reduction per harmonic)
                key = p.l2 ** 2 + j
                partial[key] = ws[p] * qj if key not in partial else partial[key] + ws[p] * qj
        for key, v in partial.items():
            s = jnp.sum(v, axis=-1)
            g_sh[key] = s if g_sh[key] is None else g_sh[key] + s
    (g_basis,) = mlp_vjp(jnp.concatenate([g_w[p] for p in conv.paths], axis=-1))
    g_xn = jnp.concatenate([g_x[(l, i)] for l, mul, off in conv.layout for i in range(2 * l + 1)], axis=-1)
    zero = jnp.zeros(sh.shape[:2], sh.dtype)
    return g_xn, jnp.stack([zero if v is None else v for v in g_sh], axis=-1), g_basis


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _convolution(conv, x, sh, basis, weights, neighbors, reverse, tiles, n_tiles):
    def body(k, acc):
        tile = tiles[k]
        outs = _tile_forward(conv, x, _tile(sh, tile, conv), _tile(basis, tile, conv), weights,
                             _tile(neighbors, tile, conv))
        return tuple(_add_columns(a, o, tile, conv) for a, o in zip(acc, outs))

    A = x.shape[0]
    acc = tuple(jnp.zeros((A, 2 * p.l3 + 1, p.mul), x.dtype) for p in conv.paths)
    return jax.lax.fori_loop(0, n_tiles, body, acc)


def _convolution_fwd(conv, x, sh, basis, weights, neighbors, reverse, tiles, n_tiles):
    out = _convolution(conv, x, sh, basis, weights, neighbors, reverse, tiles, n_tiles)
    return out, (x, sh, basis, weights, neighbors, reverse, tiles, n_tiles)


def _convolution_bwd(conv, residuals, g):
    # the tiles are visited again: the neighbour features and radial weights are recomputed
    # (a gather and a matrix product) rather than kept, and the neighbour-feature cotangents
    # go to a (W, A, F) buffer, summed per column at the reverse entries afterwards
    x, sh, basis, weights, neighbors, reverse, tiles, n_tiles = residuals
    W, A = neighbors.shape
    h = {}
    for p, gp in zip(conv.paths, g):
        cg = wigner_3j(p.l1, p.l2, p.l3) * math.sqrt(2 * p.l3 + 1)  # (I, J, n)
        h[p] = [[sum(float(cg[i, j, o]) * gp[:, o] for o in range(cg.shape[2]) if cg[i, j, o] != 0.0)
                 for j in range(cg.shape[1])] for i in range(cg.shape[0])]
        h[p] = [[v if not isinstance(v, int) else jnp.zeros((A, p.mul), gp.dtype) for v in row] for row in h[p]]

    def body(k, buffers):
        tile = tiles[k]
        hp = {p: [[_columns(v, tile, conv) for v in row] for row in rows_] for p, rows_ in h.items()}
        values = _tile_backward(conv, x, _tile(sh, tile, conv), _tile(basis, tile, conv), weights,
                                _tile(neighbors, tile, conv), hp)
        return tuple(jax.lax.dynamic_update_slice(b, v, _start(tile, conv, 3)) for b, v in zip(buffers, values))

    # rows outside the visited tiles are never read (no reverse index points there)
    buffers = (jnp.zeros((W, A, x.shape[1]), x.dtype), jnp.zeros_like(sh), jnp.zeros_like(basis))
    g_xn, g_sh, g_basis = jax.lax.fori_loop(0, n_tiles, body, buffers)
    flat = g_xn.reshape(W * A, -1)

    def transpose(k, acc):
        tile = tiles[k]
        at_reverse = jnp.take(flat, _tile(reverse, tile, conv), axis=0, mode="fill", fill_value=0)
        return _add_columns(acc, jnp.sum(jax.lax.optimization_barrier(at_reverse), axis=0), tile, conv)

    g_x = jax.lax.fori_loop(0, n_tiles, transpose, jnp.zeros_like(x))
    return g_x, g_sh, g_basis, tuple(jnp.zeros_like(w) for w in weights), None, None, None, None


_convolution.defvjp(_convolution_fwd, _convolution_bwd)
