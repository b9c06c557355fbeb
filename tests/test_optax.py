"""Optax optimizers by name, per system (issue 7, deliverable 4).

The reference for every path is a plain optax loop on the host: ``optax.adam(...)`` (built
directly with optax, not through our names) applied to one structure's positions with ASE's own
EMT forces and ASE's max-step rule. Our batched runs -- several structures in two slots, so
newcomers start while others are mid-run -- must follow it step for step: a global step count
(bias correction, schedules) or any reduction across systems would break that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron
from ase.optimize import LBFGS as AseLBFGS

from kups_relax import relax
from kups_relax.engine import resolve_optimizer
from kups_relax.transforms import MaxStepSize, OptaxTransform, SystemIndex, optax_optimizer
from kups_relax.transforms.optax_spec import BUILDING_BLOCKS, OPTIMIZERS, canonical_spec
from potentials import EMT

EMT_POTENTIAL = EMT()

#: The optimizer of every relaxation here (one set of compiled programs): adam's bias correction
#: counts steps, so a newcomer in a refilled slot must count from its own first step.
ADAM = "optax:adam(learning_rate=0.01)"
#: Shared by every relax call, so the compiled programs are shared too (two 8-row slots).
RELAX_KW = dict(optimizer=ADAM, trajectory=True, atoms_per_batch=16, chunk_steps=8)


def small_metals() -> list[tuple[str, Atoms]]:
    """Five structures of 4-8 atoms (one 8-row slot size): bulk, alloy, clusters; periodic and not."""
    out = []
    a = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    a.rattle(0.1, seed=1)
    out.append(("cu-bulk-8", a))
    a = bulk("Ni", "fcc", a=3.52, cubic=True)
    a.set_chemical_symbols(["Ni", "Pd", "Ni", "Pd"])
    a.rattle(0.1, seed=2)
    out.append(("nipd-4", a))
    a = Icosahedron("Au", 2)[:7]
    a.rattle(0.05, seed=3)
    out.append(("au-cluster-7", a))
    a = bulk("Al", "fcc", a=4.05, cubic=True) * (2, 1, 1)
    a.rattle(0.1, seed=4)
    out.append(("al-bulk-8", a))
    a = Atoms("Pt5", positions=[[0, 0, 0], [2.7, 0, 0], [0, 2.7, 0], [1.35, 1.35, 2.0], [2.7, 2.7, 0.3]])
    a.rattle(0.05, seed=5)
    out.append(("pt-cluster-5", a))
    return out


def host_optax_path(atoms: Atoms, n_steps: int) -> np.ndarray:
    """Positions ``(n_steps + 1, N, 3)`` of a plain optax loop with ASE's EMT and ASE's max-step rule."""
    tx, maxstep = optax.adam(0.01), 0.2
    atoms = atoms.copy()
    atoms.calc = AseEMT()
    params = jnp.asarray(atoms.positions)
    state = tx.init(params)
    path = [atoms.positions.copy()]
    for _ in range(n_steps):
        grads = -jnp.asarray(atoms.get_forces())
        updates, state = tx.update(grads, state, params)
        step = np.asarray(updates)
        longest = np.sqrt((step ** 2).sum(axis=1)).max()
        if longest >= maxstep:  # ase.optimize.Optimizer.determine_step
            step = step * (maxstep / longest)
        atoms.positions = atoms.positions + step
        params = jnp.asarray(atoms.positions)
        path.append(atoms.positions.copy())
    return np.asarray(path)


@pytest.fixture(scope="module")
def named():
    return small_metals()


#: Steps per structure: different, so slots free up at different times and newcomers start mid-run.
STEPS = [14, 6, 11, 9, 7]


@pytest.fixture(scope="module")
def staggered(named):
    """All five in one call with two 8-row slots: three structures join while others are mid-run."""
    return relax([a for _, a in named], EMT_POTENTIAL, fmax=1e-9, max_steps=STEPS, names=[n for n, _ in named],
                 **RELAX_KW)


def test_staggered_batch_follows_plain_optax(named, staggered):
    """Every system's path equals plain optax on that system alone (its own step count)."""
    for (name, atoms), steps, res in zip(named, STEPS, staggered):
        assert res.status == "unconverged" and res.steps == steps, (name, res.status, res.steps)
        ours = np.asarray([frame.positions for frame in res.trajectory])
        ref = host_optax_path(atoms, steps)
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9, err_msg=name)


def test_adam_converges_like_ase_lbfgs(named):
    """``optimizer="optax:adam(learning_rate=0.01)"`` reaches fmax; energies match ASE's LBFGS minimum."""
    results = relax([a for _, a in named], EMT_POTENTIAL, fmax=0.05, max_steps=2000, names=[n for n, _ in named],
                    **RELAX_KW)
    for (name, atoms), res in zip(named, results):
        assert res.status == "converged" and res.fmax < 0.05, (name, res.status, res.reason)
        ref = atoms.copy()
        ref.calc = AseEMT()
        AseLBFGS(ref, logfile=None).run(fmax=0.05, steps=1000)
        assert abs(res.energy - ref.get_potential_energy()) < 2e-3, (name, res.energy, ref.get_potential_energy())
        # ASE's EMT at our final geometry agrees with our reported energy and fmax
        check = res.atoms.copy()
        check.calc = AseEMT()
        assert abs(check.get_potential_energy() - res.energy) < 1e-9, name
        assert np.sqrt((check.get_forces() ** 2).sum(axis=1)).max() < 0.05, name


# --- the transform itself (no potential) ------------------------------------------------------

def _rows_and_index():
    rng = np.random.default_rng(0)
    system = jnp.asarray([0, 0, 1, 1, 1, 2, 3, 3])  # system 2 has one row; 3 = padding (S = 3)
    params = jnp.asarray(rng.normal(size=(8, 3)))
    return rng, params, SystemIndex(system, 3)


def test_inactive_state_is_untouched_and_reset_restarts():
    transform = OptaxTransform("optax:adam(learning_rate=0.1)")
    rng, params, index = _rows_and_index()
    state = transform.init(params, index)
    update = jax.jit(transform.update)
    for _ in range(3):
        _, state = update(jnp.asarray(rng.normal(size=(8, 3))), state, params, jnp.asarray([True, True, True]), index)
    before = state
    step, state = update(jnp.asarray(rng.normal(size=(8, 3))), state, params, jnp.asarray([True, False, True]), index)
    rows1 = np.asarray(index.system) == 1
    for new, old in zip(jax.tree.leaves(state.inner), jax.tree.leaves(before.inner)):
        np.testing.assert_array_equal(np.asarray(new)[rows1], np.asarray(old)[rows1])
    assert np.all(np.asarray(step)[rows1] == 0.0)
    counts = np.asarray(state.inner[0].count)
    assert counts.tolist() == [4, 4, 3, 3, 3, 4, 0, 0]  # per system (padding never steps)
    reset = transform.reset(state, jnp.asarray([False, True, False]), index)
    fresh = transform.init(params, index)
    for new, old, init in zip(jax.tree.leaves(reset.inner), jax.tree.leaves(state.inner), jax.tree.leaves(fresh.inner)):
        np.testing.assert_array_equal(np.asarray(new)[rows1], np.asarray(init)[rows1])
        np.testing.assert_array_equal(np.asarray(new)[~rows1], np.asarray(old)[~rows1])


def _per_row_equals_whole(tx, n_steps: int = 3) -> bool:
    """Whether ``tx`` applied row by row (vmap) equals ``tx`` applied to the whole array, and whether
    its initial state does not depend on parameter values (what :meth:`OptaxTransform.reset` relies on)."""
    rng = np.random.default_rng(1)
    params = jnp.asarray(rng.normal(size=(5, 3)))
    whole, rows = tx.init(params), jax.vmap(tx.init)(params)
    zero_rows = jax.vmap(tx.init)(jnp.zeros_like(params))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rows), jax.tree.leaves(zero_rows)))
    for _ in range(n_steps):
        grads = jnp.asarray(rng.normal(size=(5, 3)) * np.array([[0.01], [0.1], [1.0], [10.0], [100.0]]))
        u_whole, whole = tx.update(grads, whole, params)
        u_rows, rows = jax.vmap(tx.update)(grads, rows, params)
        same &= bool(np.allclose(u_whole, u_rows, rtol=1e-12, atol=1e-15))
        params = params + u_whole
    return same


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_allowlisted_optimizers_are_elementwise(name):
    assert _per_row_equals_whole(OptaxTransform(f"optax:{name}").optax), name


def test_allowlisted_building_blocks_are_elementwise():
    bad = [name for name in BUILDING_BLOCKS
           if not _per_row_equals_whole(OptaxTransform(f"optax:chain({name}({_example_args(name)}), scale(-0.1))").optax)]
    assert not bad


def _example_args(name: str) -> str:
    return {"clip": "0.5", "ema": "0.9", "scale": "2.0", "scale_by_learning_rate": "0.1", "add_decayed_weights": "0.1",
            "trace": "0.9", "scale_by_rprop": "0.1",
            "scale_by_schedule": "exponential_decay(init_value=1.0, transition_steps=1, decay_rate=0.5)"}.get(name, "")


def test_the_elementwise_check_catches_cross_row_transforms():
    """The check above is not vacuous: global-norm clipping and normalisation fail it."""
    assert not _per_row_equals_whole(optax.clip_by_global_norm(1.0))
    assert not _per_row_equals_whole(optax.normalize_by_update_norm())


# --- names, hyper-parameters, refusals --------------------------------------------------------

def test_names_and_defaults():
    chained = resolve_optimizer("optax:adam")
    assert chained.transforms == (OptaxTransform("optax:adam(learning_rate=0.01)"), MaxStepSize(0.2))
    assert resolve_optimizer("optax:adam(learning_rate=0.01)") == chained  # one compiled program for both
    assert resolve_optimizer("optax:adam(0.01, maxstep=0.1)").transforms[1] == MaxStepSize(0.1)
    assert optax_optimizer("optax:adam(maxstep=0.1)", maxstep=0.05).transforms[1] == MaxStepSize(0.05)
    assert canonical_spec("optax:lion") == "optax:lion(learning_rate=0.01, weight_decay=0.0)"
    assert canonical_spec("optax:sgd(0.1, 0.9, True)") == "optax:sgd(learning_rate=0.1, momentum=0.9, nesterov=True)"


def test_mapping_form_equals_string_form():
    mapping = {"name": "optax:adam", "b1": 0.8, "maxstep": 0.03,
               "learning_rate": {"schedule": "exponential_decay", "init_value": 0.02, "transition_steps": 5,
                                 "decay_rate": 0.7}}
    assert resolve_optimizer(mapping) == resolve_optimizer(
        "optax:adam(learning_rate=exponential_decay(init_value=0.02, transition_steps=5, decay_rate=0.7), "
        "b1=0.8, maxstep=0.03)")
    chain_map = {"name": "optax:chain", "transforms": [{"name": "clip", "max_delta": 1.0}, "adam(learning_rate=0.01)"]}
    assert resolve_optimizer(chain_map) == resolve_optimizer("optax:chain(clip(1.0), adam(0.01))")


def test_schedules_count_the_systems_own_steps():
    """A schedule sees step 0 at a system's first step: sgd with a halving rate; system 1 starts late."""
    transform = OptaxTransform("optax:sgd(learning_rate=exponential_decay(init_value=1.0, transition_steps=1, "
                               "decay_rate=0.5))")
    index = SystemIndex(jnp.asarray([0, 1]), 2)
    state = transform.init(jnp.zeros((2, 3)), index)
    g = jnp.ones((2, 3))
    step, state = transform.update(g, state, None, jnp.asarray([True, False]), index)
    step, state = transform.update(g, state, None, jnp.asarray([True, True]), index)
    np.testing.assert_allclose(np.asarray(step), [[-0.5] * 3, [-1.0] * 3])  # system 1 starts at rate 1.0


def test_max_step_clips_each_system_like_ase():
    """``optax:sgd`` + maxstep: each system's whole step scaled so its longest atom move is maxstep."""
    transform = optax_optimizer("optax:sgd(learning_rate=1.0)", maxstep=0.3)
    rng, params, index = _rows_and_index()
    grads = jnp.asarray(rng.normal(size=(8, 3)) * 0.2)
    state = transform.init(params, index)
    step, _ = transform.update(grads, state, params, jnp.asarray([True, True, True]), index)
    system = np.asarray(index.system)
    for s in range(3):
        ref = -np.asarray(grads)[system == s]
        longest = np.sqrt((ref ** 2).sum(axis=1)).max()
        if longest >= 0.3:  # ase.optimize.Optimizer.determine_step
            ref = ref * 0.3 / longest
        np.testing.assert_allclose(np.asarray(step)[system == s], ref, rtol=0, atol=1e-15)
    assert np.all(np.asarray(step)[system == 3] == 0.0)


@pytest.mark.parametrize("spec, message", [
    ("optax:clip_by_global_norm(1.0)", "clip_by_global_norm cannot run per system.*norm of all parameters"),
    ("optax:lamb", "lamb cannot run per system"),
    ("optax:adafactor", "adafactor cannot run per system"),
    ("optax:lbfgs", "lbfgs cannot run per system"),
    ("optax:chain(clip_by_global_norm(max_norm=1.0), adam(learning_rate=0.01))", "clip_by_global_norm cannot run"),
    ({"name": "optax:chain", "transforms": ["scale_by_trust_ratio()", "sgd(0.1)"]}, "scale_by_trust_ratio cannot"),
    ("optax:adamm", r"unknown optax optimizer 'adamm' \(did you mean adam.*available: .*adabelief.*sgd"),
    ("optax:scale_by_adam", "building block.*optax:chain"),
    ("optax:adam(lr=0.1)", "unexpected keyword argument 'lr'.*learning_rate, b1, b2"),
    ("optax:adam(b1=exponential_decay(0.1, 10, 0.5))", "b1 takes a value"),
    ("optax:adam(learning_rate=decay(0.1))", "not a known schedule.*exponential_decay"),
    ("optax:adam(learning_rate=exponential_decay(init=0.1))", "schedule exponential_decay.*init_value"),
    ("optax:adam(learning_rate=x)", "neither a literal"),
    ("optax:adam(maxstep=0)", "maxstep must be a number > 0"),
    ("optax:adamw(mask={'a': 1})", "mask is not supported"),
])
def test_bad_specs_are_refused_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_optimizer(spec)


def test_unknown_plain_name_lists_optax_names():
    with pytest.raises(ValueError, match="'lbfgs', 'fire', 'precon_lbfgs', or 'optax:<name>'.*adam"):
        resolve_optimizer("adam")


def test_bare_optax_transform_is_refused():
    with pytest.raises(ValueError, match="name it instead"):
        resolve_optimizer(optax.adam(0.01))


def test_config_example_and_cli_maxstep():
    """configs/optax_adam.yaml (mapping form with a schedule) and ``--maxstep`` reach the optax chain."""
    from pathlib import Path

    from kups_relax.cli import UsageError, load_config, make_optimizer

    config = load_config(Path(__file__).parent.parent / "configs" / "optax_adam.yaml")
    expected = ("optax:adam(learning_rate=exponential_decay(init_value=0.02, transition_steps=100, decay_rate=0.5, "
                "end_value=0.002), b1=0.9, b2=0.999)")
    assert config["optimizer"] == expected
    relax_gets, transform = make_optimizer(config["optimizer"], config["maxstep"])
    assert relax_gets == transform == optax_optimizer(expected, maxstep=0.2)
    _, transform = make_optimizer("optax:sgd(learning_rate=0.1, momentum=0.9)", 0.05)
    assert transform.transforms[1] == MaxStepSize(0.05)
    with pytest.raises(UsageError, match="clip_by_global_norm cannot run per system"):
        make_optimizer("optax:chain(clip_by_global_norm(1.0), sgd(0.1))", None)
