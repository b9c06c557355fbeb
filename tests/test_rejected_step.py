"""A step rejected for a neighbor-list overflow and redone gives the path a plain step gives.

The loop keeps the optimizer fields a state lists in ``REWRITTEN_BY_REDO`` from the rejected
step (instead of copying the old ones back, which for L-BFGS copied its whole history every
step); this checks the promise that makes that safe: redoing ``update`` on the kept fields
writes and returns exactly what the first ``update`` did, and the path after it is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kups_relax.transforms import SystemIndex, ase_fire, ase_lbfgs
from kups_relax.transforms.base import merge_rewritten, partition_rewritten


def _gradient(x):
    return jnp.sin(3.0 * x) + 0.3 * x


def _steps(transform, x, state, index, active, n):
    path = []
    for _ in range(n):
        d, state = transform.update(_gradient(x), state, x, active, index)
        x = x + d
        path.append(x)
    return x, state, path


def test_redo_after_a_rejected_step_is_the_plain_path():
    rng = np.random.default_rng(0)
    system = jnp.asarray(np.repeat(np.arange(3), [8, 16, 8]), jnp.int32)
    index = SystemIndex(system, 3, aligned=32)
    x0 = jnp.asarray(rng.normal(size=(32, 3)))
    active = jnp.array([True, False, True])
    for transform in (ase_lbfgs(memory=4), ase_fire()):
        state = transform.init(x0, index)
        x, state, _ = _steps(transform, x0, state, index, active, 6)  # the ring buffer has wrapped
        _, plain_state, plain_path = _steps(transform, x, state, index, active, 3)

        _, rejected = transform.update(_gradient(x), state, x, active, index)
        kept_rest, _ = partition_rewritten(state)
        _, rewritten = partition_rewritten(rejected)
        after_reject = merge_rewritten(kept_rest, rewritten)
        assert jax.tree_util.tree_structure(after_reject) == jax.tree_util.tree_structure(state)
        _, redo_state, redo_path = _steps(transform, x, after_reject, index, active, 3)
        for a, b in zip(plain_path, redo_path):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(plain_state), jax.tree_util.tree_leaves(redo_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_partition_names_the_lbfgs_history():
    index = SystemIndex(jnp.zeros(8, jnp.int32), 1, aligned=8)
    state = ase_lbfgs().init(jnp.zeros((8, 3)), index)
    rest, rewritten = partition_rewritten(state)
    lbfgs_rest, lbfgs_rewritten = rest.inner[0], rewritten.inner[0]
    assert lbfgs_rest.s_memory is None and lbfgs_rewritten.s_memory is not None
    assert lbfgs_rest.params is not None and lbfgs_rewritten.params is None
