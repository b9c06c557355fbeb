"""Cubic splines on uniform grids: coefficients on the host, evaluation in JAX.

ASE's tabulated potentials (``ase.calculators.eam.EAM``) interpolate with
``scipy.interpolate.InterpolatedUnivariateSpline(x, y, k=3)``: the C² cubic
through every sample with the *not-a-knot* end conditions (FITPACK puts no knot
at the second and the second-to-last sample), extrapolated beyond the ends with
the end pieces (``ext=0``), and differentiated analytically. That interpolant
is unique, so we build the same one with ``scipy.interpolate.CubicSpline(...,
bc_type="not-a-knot")`` (equal to FITPACK's to round-off, ~1e-15 relative) and
store it as one cubic per grid interval. :func:`evaluate` picks the interval
with one ``floor`` (the grid is uniform) and evaluates the cubic by Horner's
rule, so it is differentiable with ``jax.grad`` and its derivative is the
spline's own derivative, as ASE's ``spline(x, 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.interpolate import CubicSpline


def cubic_coefficients(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Not-a-knot cubic spline through ``(x, y)`` -> coefficients ``(len(x) - 1, 4)``.

    Row ``k`` holds ``(c0, c1, c2, c3)`` with ``s(t) = c0 + c1 u + c2 u**2 + c3 u**3``,
    ``u = t - x[k]``, valid on ``[x[k], x[k+1]]`` (and, for the first and last rows,
    beyond the ends of the grid).

    Args:
        x: ``(n,)`` increasing sample points, ``n >= 4`` (FITPACK needs ``n > k``).
        y: ``(..., n)`` samples; leading axes are independent functions on the same grid.

    Returns:
        ``(..., n - 1, 4)`` float64 coefficients.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] < 4:
        raise ValueError(f"a cubic spline needs at least 4 sample points, got {x.shape}")
    if y.shape[-1] != x.shape[0]:
        raise ValueError(f"{y.shape[-1]} samples for {x.shape[0]} grid points")
    spline = CubicSpline(x, y, axis=-1, bc_type="not-a-knot", extrapolate=True)
    # scipy: c[m, k, ...] multiplies u**(3 - m) on interval k; we want (..., k, power)
    c = spline.c[::-1]
    return np.ascontiguousarray(np.moveaxis(c, (0, 1), (-1, -2)))


def interval(t: jax.Array, dx: jax.Array | float, n_intervals: int, offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """The grid interval of every point and the offset into it, on the uniform grid ``x_k = (offset + k) dx``.

    Args:
        t: points; outside the grid the end intervals are chosen (they extrapolate).
        dx: grid spacing.
        n_intervals: intervals of the table (``len(x) - 1``).
        offset: index of the first grid point.

    Returns:
        ``(k, u)``: int32 interval indices (the shape of ``t``) and ``u = t - x_k``.
    """
    k = jnp.clip(jnp.floor(t / dx) - offset, 0, n_intervals - 1).astype(jnp.int32)
    return k, t - (k + offset) * dx


def polynomial(c: tuple[jax.Array, ...] | jax.Array, u: jax.Array) -> jax.Array:
    """``c0 + c1 u + c2 u**2 + ...`` by Horner's rule (``c``: a tuple of arrays, or ``(..., n)``)."""
    c = tuple(c) if isinstance(c, (tuple, list)) else tuple(c[..., m] for m in range(c.shape[-1]))
    value = c[-1]
    for cm in reversed(c[:-1]):
        value = cm + u * value
    return value


def derivative_coefficients(c):
    """``(..., n)`` polynomial coefficients -> ``(..., n - 1)`` of its derivative, ``m c_m``
    (numpy or JAX arrays)."""
    return c[..., 1:] * np.arange(1, c.shape[-1])


def evaluate(coefficients: jax.Array, which: tuple[jax.Array, ...], t: jax.Array,
             dx: jax.Array | float, offset: int = 0) -> jax.Array:
    """Values at ``t`` of splines tabulated on the uniform grid ``x_k = (offset + k) dx`` (differentiable).

    The grid is written the way LAMMPS tables are and ASE builds them
    (``np.arange(n) * dx``, or its tail ``[offset:]``), so the interval origin is the
    very breakpoint the coefficients were computed for.

    Args:
        coefficients: ``(F1, ..., Fm, n - 1, 4)`` from :func:`cubic_coefficients`: a table
            of ``F1 * ... * Fm`` functions on the same grid.
        which: ``m`` integer arrays (broadcasting with ``t``) choosing each point's function.
        t: points to evaluate at; outside the grid the end cubics extrapolate.
        dx: grid spacing.
        offset: index of the first grid point.

    Returns:
        ``s(t)``, the shape of ``t``.
    """
    return evaluate_with_derivative(coefficients, which, t, dx, offset)[0]


def evaluate_with_derivative(coefficients: jax.Array, which: tuple[jax.Array, ...], t: jax.Array,
                             dx: jax.Array | float, offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(s(t), s'(t))``: :func:`evaluate` and the spline's own derivative (ASE's ``spline(t, 1)``),
    from one lookup of the coefficients. Arguments as :func:`evaluate`."""
    k, u = interval(t, dx, coefficients.shape[-2], offset)
    c = coefficients[tuple(which) + (k,)]
    return polynomial(c, u), polynomial(derivative_coefficients(c), u)


def shift_origin(coefficients: np.ndarray, delta: float) -> np.ndarray:
    """The same cubics written around an origin moved by ``delta`` (host, numpy).

    Row ``(c0, c1, c2, c3)`` of ``s(t) = sum c_m (t - x)**m`` becomes the coefficients of
    ``sum d_m (t - (x + delta))**m``, the same polynomial (to round-off).
    """
    c0, c1, c2, c3 = np.moveaxis(np.asarray(coefficients, dtype=np.float64), -1, 0)
    h = delta
    d0 = c0 + h * (c1 + h * (c2 + h * c3))
    d1 = c1 + h * (2.0 * c2 + h * 3.0 * c3)
    d2 = c2 + 3.0 * h * c3
    return np.stack([d0, d1, d2, c3], axis=-1)
