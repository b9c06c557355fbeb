"""Per-system preconditioned L-BFGS with an Armijo line search (ASE's ``PreconLBFGS``).

ASE's ``ase.optimize.precon.PreconLBFGS`` (Packwood et al., J. Chem. Phys. 144, 164109 (2016)):
the two-loop recursion of L-BFGS whose initial inverse Hessian is the inverse of a
preconditioner ``P`` (:mod:`kups_relax.precon`: ASE's ``Exp``) instead of ``I / alpha``, and a
backtracking line search on the energy that enforces only Armijo's sufficient decrease
(``ase.utils.linesearcharmijo.LineSearchArmijo``) instead of a fixed step clip.

In a batch every system is in its own phase. One loop iteration is one energy-and-forces
evaluation of every running system, at the trial point of its own line search:

* a system at an accepted point (its last trial was accepted, or it just started) stores its
  newest ``(s, y)`` pair, computes a direction ``p`` (two-loop + ``P^-1``) and the first step
  length ``a1`` (ASE's guess from the last energy drop, clipped to ``maxstep``, rounded to 1
  within 0.5 of it) and evaluates ``x + a1 p``;
* a system whose last trial failed Armijo's test evaluates its next, shorter one
  (``a1 = max(quadratic minimiser, a1 / 10)``).

A system that needs more evaluations for a step never holds the others: it simply spends
more iterations on that step. ``nsteps`` counts as ASE's (accepted steps, and steps whose
line search failed and reset the history); evaluations are counted per system by the loop.

What the ASE original does and this one does the same way: the history reset when the search
direction is not downhill or the step length falls below ``a_min`` (and, when that happens
right after a reset, ASE raises: the system stops with status ``unconverged`` and a reason);
tiny directions are scaled up to ``sqrt(N 1e-10)``; ``rho = 1 / y.s`` without safeguards
(``y.s == 0`` gives ``rho = 0``, where ASE divides by zero).

The history ring is shared by all systems and indexed by a clock that ticks every iteration;
a system that does not store a pair on a tick (it is backtracking, stopped, or it reset)
leaves a *null* entry that the two-loop skips. The ring holds
``2 * memory`` entries and each system uses its newest ``memory`` real pairs (ASE's memory); a
system that backtracked more than ``memory`` times within its last ``memory`` steps would keep
fewer.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import precon as pc
from ..segments import select_rows
from .base import SystemIndex, take_along


class PreconLBFGSState(NamedTuple):
    """State of :class:`PreconLBFGS` (``N`` rows, ``S`` systems, ``M`` ring entries).

    Attributes:
        clock: ``()`` direction ticks so far; the newest ring entry is at ``(clock - 1) % M``.
        real: ``(M, S)`` whether a ring entry holds a pair of that system (else a null entry).
        s_memory, y_memory: ``(M, N, 3)`` position and gradient differences.
        rho: ``(M, S)`` ``1 / (y.s)``.
        r0, g0: ``(N, 3)`` positions and gradient where each system's current step started.
        fresh: ``(S,)`` history just reset (ASE's ``_just_reset_hessian``): no pair to store.
        was_reset: ``(S,)`` ``fresh`` as it was when the current step started (ASE's
            ``previously_reset_hessian``: a failure now raises instead of resetting).
        direction: ``(N, 3)`` search direction ``p``, Å.
        a1: ``(S,)`` step length of the current trial (in multiples of ``p``).
        slope: ``(S,)`` ``g . p`` at the step's start, eV (negative).
        e_old: ``(S,)`` energy at the previous step's start, eV (ASE's ``e0``; ``nan``: none).
        searching: ``(S,)`` the last trial failed Armijo's test: evaluate the shorter ``a1`` next.
        mu: ``(S,)`` the preconditioner's energy scale, eV/Å² (1 where there is none).
    """

    clock: jax.Array
    real: jax.Array
    s_memory: jax.Array
    y_memory: jax.Array
    rho: jax.Array
    r0: jax.Array
    g0: jax.Array
    fresh: jax.Array
    was_reset: jax.Array
    direction: jax.Array
    a1: jax.Array
    slope: jax.Array
    e_old: jax.Array
    searching: jax.Array
    mu: jax.Array

    # a redo of a rejected step (neighbor-list overflow: same clock, positions and gradients, see
    # kups_relax.transforms.base) writes the same pair into the same ring entry and the same
    # resets: the engine may keep these fields from the rejected step instead of copying them back
    REWRITTEN_BY_REDO = ("s_memory", "y_memory", "rho", "real")


class Proposal(NamedTuple):
    """What :meth:`PreconLBFGS.propose` hands the loop.

    Attributes:
        step: ``(N, 3)`` the trial displacement ``a1 p`` (before constraints), Å.
        evaluate: ``(S,)`` systems that evaluate a trial point this iteration.
        reset: ``(S,)`` systems whose direction was not downhill: history reset, a step counted,
            nothing evaluated (ASE's ``ValueError`` branch).
        failed: ``(S,)`` the same right after a reset (ASE raises): the system stops.
    """

    step: jax.Array
    evaluate: jax.Array
    reset: jax.Array
    failed: jax.Array


class Verdict(NamedTuple):
    """What :meth:`PreconLBFGS.judge` decides about the trial points.

    Attributes:
        accept: ``(S,)`` the trial satisfies Armijo's condition: the system moves there.
        reset: ``(S,)`` the step length fell below ``a_min``: history reset, a step counted, no move.
        failed: ``(S,)`` the same right after a reset (ASE raises): the system stops.
    """

    accept: jax.Array
    reset: jax.Array
    failed: jax.Array


@dataclasses.dataclass(frozen=True)
class PreconLBFGS:
    """ASE's ``PreconLBFGS`` per system (names and defaults as ASE's; ``use_armijo=True``).

    Attributes:
        maxstep: the first trial of a line search moves no atom further than this, Å (0.04).
        memory: pairs of the L-BFGS history (100).
        alpha: ASE's argument (70), unused as in ASE: without a preconditioner ASE applies its
            ``IdentityPrecon`` (``P = I``), not ``alpha I``.
        precon: ``"Exp"``, ``"auto"`` (Exp for systems of >= 100 atoms, the identity below: ASE's
            default) or ``None`` (the identity).
        A, r_cut, r_NN, c_stab, force_stab: the Exp preconditioner's (:class:`kups_relax.precon.ExpSettings`).
        mu: the preconditioner's energy scale, eV/Å² (``None``: estimated per system as ASE does,
            with one extra evaluation at a sine-perturbed geometry).
        c1: Armijo's sufficient-decrease constant (0.23).
        a_min: smallest step length before the line search gives up (1e-10).
        solve_tol: relative residual of the conjugate-gradient solve of ``P z = q``.
        solve_max_iterations: at most this many conjugate-gradient iterations per solve.
    """

    maxstep: float = 0.04
    memory: int = 100
    alpha: float = 70.0
    precon: str | None = "auto"
    A: float = 3.0
    r_cut: float | None = None
    r_NN: float | None = None
    mu: float | None = None
    c_stab: float = 0.1
    force_stab: bool = False
    c1: float = 0.23
    a_min: float = 1e-10
    solve_tol: float = 1e-12
    solve_max_iterations: int = 1000

    #: the loop runs this optimizer with its line-search step (kups_relax.loop)
    line_search = True

    def __post_init__(self):
        if self.precon not in ("Exp", "auto", None):
            raise ValueError(f"precon must be 'Exp', 'auto' or None, got {self.precon!r}")
        if self.maxstep > 1.0:
            raise ValueError(f"You are using a much too large value for the maximum step size: {self.maxstep:.1f} "
                             "Angstrom (ASE's limit is 1.0)")
        if not 0.0 < self.c1 < 0.5:
            raise ValueError(f"c1 must be in (0, 0.5), got {self.c1}")

    @property
    def exp_settings(self) -> pc.ExpSettings:
        """The preconditioner's settings (for the host tables)."""
        return pc.ExpSettings(A=self.A, r_cut=self.r_cut, r_NN=self.r_NN, c_stab=self.c_stab,
                              force_stab=self.force_stab, precon=self.precon, maxstep=self.maxstep)

    @property
    def ring(self) -> int:
        return 2 * self.memory

    def init(self, params: jax.Array, index: SystemIndex) -> PreconLBFGSState:
        M, S = self.ring, index.n_systems
        dtype = params.dtype
        return PreconLBFGSState(
            clock=jnp.zeros((), jnp.int32), real=jnp.zeros((M, S), bool),
            s_memory=jnp.zeros((M,) + params.shape, dtype), y_memory=jnp.zeros((M,) + params.shape, dtype),
            rho=jnp.zeros((M, S), dtype), r0=jnp.zeros_like(params), g0=jnp.zeros_like(params),
            fresh=jnp.ones(S, bool), was_reset=jnp.ones(S, bool), direction=jnp.zeros_like(params),
            a1=jnp.ones(S, dtype), slope=jnp.zeros(S, dtype), e_old=jnp.full(S, jnp.nan, dtype),
            searching=jnp.zeros(S, bool), mu=jnp.full(S, 1.0 if self.mu is None else self.mu, dtype))

    def update(self, *args, **kwargs):
        raise TypeError("PreconLBFGS needs energies for its line search; the loop calls propose() and judge()")

    def reset(self, state: PreconLBFGSState, systems: jax.Array, index: SystemIndex) -> PreconLBFGSState:
        rows = index.row_mask(systems)
        fresh = self.init(state.r0, index)
        return PreconLBFGSState(*[
            old if name == "clock" else
            jnp.where(systems[None, :], new, old) if name in ("real", "rho") else
            jnp.where(rows[None, :, None], new, old) if name in ("s_memory", "y_memory") else
            select_rows(rows, new, old) if name in ("r0", "g0", "direction") else
            select_rows(systems, new, old)
            for name, old, new in zip(state._fields, state, fresh)])

    def take(self, state: PreconLBFGSState, rows: jax.Array, systems: jax.Array) -> PreconLBFGSState:
        return PreconLBFGSState(*[
            old if name == "clock" else
            take_along(old, systems, axis=1) if name in ("real", "rho") else
            take_along(old, rows, axis=1) if name in ("s_memory", "y_memory") else
            take_along(old, rows) if name in ("r0", "g0", "direction") else
            take_along(old, systems)
            for name, old in zip(state._fields, state)])

    def with_mu(self, state: PreconLBFGSState, mu: jax.Array, systems: jax.Array) -> PreconLBFGSState:
        """``state`` with the estimated ``mu (S,)`` for the systems in the mask."""
        return state._replace(mu=jnp.where(systems, mu, state.mu))

    # ------------------------------------------------------------------ one loop iteration

    def propose(self, grads: jax.Array, energy: jax.Array, state: PreconLBFGSState, params: jax.Array,
                active: jax.Array, index: SystemIndex, geometry) -> tuple[Proposal, PreconLBFGSState]:
        """The trial points of this iteration.

        ``grads (N, 3)``: gradients at ``params`` after constraints, eV/Å; ``energy (S,)`` eV.
        """
        need = active & ~state.searching
        # no lax.cond around it: a conditional copies the (M, N, 3) history in and out, which cost
        # more than computing directions nobody needs on the rare iteration where every system
        # backtracks (the clock then ticks with a null entry for everyone)
        state, reset, failed = self._new_directions(grads, energy, state, params, need, index, geometry)
        evaluate = active & ~reset & ~failed
        step = jnp.where(index.row_mask(evaluate)[:, None], index.broadcast(state.a1)[:, None] * state.direction, 0.0)
        return Proposal(step=step, evaluate=evaluate, reset=reset, failed=failed), state

    def _new_directions(self, grads, energy, state: PreconLBFGSState, params, need, index: SystemIndex, geometry):
        """ASE's ``PreconLBFGS.step`` up to the line search, for the systems in ``need (S,)``."""
        M, S = self.ring, index.n_systems
        row_need = index.row_mask(need)
        store = need & ~state.fresh
        slot = state.clock % M
        s0 = params - state.r0
        y0 = grads - state.g0
        ys = index.dot(y0, s0)
        rho0 = jnp.where(ys != 0, 1.0 / jnp.where(ys != 0, ys, 1.0), 0.0)
        row_store = index.row_mask(store)[:, None]
        s_memory = state.s_memory.at[slot].set(jnp.where(row_store, s0, state.s_memory[slot]))
        y_memory = state.y_memory.at[slot].set(jnp.where(row_store, y0, state.y_memory[slot]))
        rho = state.rho.at[slot].set(jnp.where(store, rho0, state.rho[slot]))
        # every system's entry at this tick is real only if it stored a pair now
        real = state.real.at[slot].set(store)

        # the newest `memory` real pairs of each system, by age (0 = newest)
        ages = jnp.arange(M)
        ring_of_age = (slot - ages) % M
        real_by_age = real[ring_of_age] & need[None, :]
        rank = jnp.cumsum(real_by_age, axis=0) - real_by_age
        use = real_by_age & (rank < self.memory)
        loopmax = jnp.max(jnp.where(use, ages[:, None] + 1, 0))
        row_system = jnp.clip(index.system, 0, S - 1)

        def first_loop(age, carry):
            q, a_table = carry
            ring = ring_of_age[age]
            a = jnp.where(use[age], rho[ring] * index.dot(s_memory[ring], q), 0.0)
            return q - a[row_system][:, None] * y_memory[ring], a_table.at[age].set(a)

        q = jnp.where(row_need[:, None], grads, 0.0)
        q, a_table = jax.lax.fori_loop(0, loopmax, first_loop, (q, jnp.zeros((M, S), q.dtype)))
        z = pc.solve(geometry, q, state.mu, need, self.solve_tol, self.solve_max_iterations)

        def second_loop(k, z):
            age = loopmax - 1 - k  # oldest first
            ring = ring_of_age[age]
            b = rho[ring] * index.dot(y_memory[ring], z)
            return z + s_memory[ring] * jnp.where(use[age], a_table[age] - b, 0.0)[row_system][:, None]

        p = -jax.lax.fori_loop(0, loopmax, second_loop, z)

        # ASE's line_search: tiny directions scaled up, the slope, the first step length
        n_atoms = pc.per_system_count(geometry)
        floor = jnp.sqrt(n_atoms * 1e-10)
        size = jnp.sqrt(index.dot(p, p))
        p = p * index.broadcast(jnp.where((size <= floor) & (size > 0), floor / jnp.where(size > 0, size, 1.0),
                                          1.0))[:, None]
        slope = index.dot(grads, p)
        downhill = (slope < 0) & jnp.isfinite(slope)
        guess = 2.0 * (energy - state.e_old) / jnp.where(slope != 0, slope, -1.0)
        a1 = jnp.where(jnp.isnan(state.e_old) | (guess > 2.0) | (guess < 1e-14) | (guess < self.a_min)
                       | ~jnp.isfinite(guess), 1.0, guess)
        # ASE: a1 *= maxstep / max_i |a1 p_i| when that is >= maxstep
        scaled = index.broadcast(a1)[:, None] * p
        longest = jnp.maximum(index.max(jnp.where(row_need, jnp.sqrt(jnp.sum(scaled * scaled, axis=1)), 0.0)), 0.0)
        too_long = longest >= self.maxstep
        a1 = jnp.where(too_long, a1 * (self.maxstep / jnp.where(too_long, longest, 1.0)), a1)
        a1 = jnp.where(jnp.abs(a1 - 1.0) <= 0.5, 1.0, a1)

        # not downhill (ASE's ValueError): reset the history, or give up right after a reset
        bad = need & ~downhill
        failed = bad & state.fresh
        reset = bad & ~state.fresh
        real = jnp.where(reset[None, :], False, real)
        new = state._replace(
            clock=state.clock + 1, real=real, s_memory=s_memory, y_memory=y_memory, rho=rho,
            r0=select_rows(row_need, params, state.r0), g0=select_rows(row_need, grads, state.g0),
            fresh=jnp.where(need, reset, state.fresh), was_reset=jnp.where(need, state.fresh, state.was_reset),
            direction=select_rows(row_need, p, state.direction), a1=jnp.where(need, a1, state.a1),
            slope=jnp.where(need, slope, state.slope))
        return new, reset, failed

    def judge(self, state: PreconLBFGSState, proposal: Proposal, energy_start: jax.Array,
              energy_trial: jax.Array, good: jax.Array) -> tuple[Verdict, PreconLBFGSState]:
        """Armijo's test on the trial energies ``(S,)`` eV (``good``: finite and within reach;
        systems whose trial is not good stop in the loop as diverged)."""
        tried = proposal.evaluate & good
        too_short = tried & (state.a1 < self.a_min)
        sufficient = energy_trial <= energy_start + self.c1 * state.a1 * state.slope
        accept = tried & ~too_short & sufficient
        shrink = tried & ~too_short & ~sufficient
        quadratic = -(state.slope * state.a1) / (2.0 * ((energy_trial - energy_start) / state.a1 - state.slope))
        a1 = jnp.where(shrink, jnp.maximum(quadratic, state.a1 / 10.0), state.a1)
        failed = too_short & state.was_reset
        reset = too_short & ~state.was_reset
        new = state._replace(
            a1=a1, searching=shrink,
            e_old=jnp.where(accept, energy_start, state.e_old),
            real=jnp.where(reset[None, :], False, state.real), fresh=state.fresh | reset)
        return Verdict(accept=accept, reset=reset, failed=failed), new
