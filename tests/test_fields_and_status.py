"""Host-side bookkeeping, unit by unit: the geometry field table, slot reset, batch keys and status rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.constraints import FixAtoms

from kups_relax.batch import (GEOMETRY_FIELDS, Geometry, clear_slot, device_geometry, empty_arrays, pack_structure)
from kups_relax.layout import shares_batch, slot_size
from kups_relax.loop import Status, Targets, _status_after_step
from kups_relax.scheduler import BatchKey


def test_field_table_is_geometry():
    assert [f.name for f in GEOMETRY_FIELDS] == [f.name for f in dataclasses.fields(Geometry)]


def test_clear_slot_restores_an_empty_slot():
    A, S = 32, 3
    first = np.array([0, 8, 24], np.int32)
    host = empty_arrays(A, S, first_atom=first)
    empty = {k: v.copy() for k, v in host.items()}
    water = molecule("H2O", vacuum=4.0)
    water.set_constraint(FixAtoms(indices=[0]))
    copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)  # 16 atoms
    pack_structure(host, 0, 0, water, "water")
    pack_structure(host, 1, 8, copper, "copper")
    assert host["n_atoms"].tolist() == [3, 16, 0]
    assert host["system"][:3].tolist() == [0, 0, 0] and host["system"][3] == S
    assert np.all(host["system"][8:24] == 1)
    np.testing.assert_array_equal(host["projection"][0], 0.0)  # FixAtoms
    np.testing.assert_array_equal(host["cell"][1], copper.cell.array)
    assert host["pbc"][1].all() and not host["pbc"][0].any()
    clear_slot(host, 1, slice(8, 24))
    clear_slot(host, 0, slice(0, 8))
    for name, value in empty.items():
        np.testing.assert_array_equal(host[name], value, err_msg=name)
    assert host["first_atom"].tolist() == first.tolist()  # a slot keeps its rows


@pytest.mark.parametrize("point_ops, pairs, dense", [(0, 0, 0), (48, 16, 8)])
def test_device_geometry_types_follow_the_table(point_ops, pairs, dense):
    """Shapes and types as the table says; ``"ops"`` is the symmetry tables' width (48 with
    FixSymmetry, else 0), ``"pairs"`` and ``"dense"`` the preconditioner's (0 without one)."""
    host = empty_arrays(8, 1, first_atom=np.zeros(1, np.int32), point_ops=point_ops, precon_pairs=pairs,
                        precon_dense=dense)
    pack_structure(host, 0, 0, Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]]), "dimer")
    with jax.enable_x64(True):
        for dtype, float_type in (("float32", jnp.float32), ("float64", jnp.float64)):
            g = device_geometry(host, dtype)
            for field in GEOMETRY_FIELDS:
                value = getattr(g, field.name)
                shape = tuple({"ops": point_ops, "pairs": pairs, "dense": dense}.get(d, d) for d in field.shape)
                assert value.shape == (8 if field.per_atom else 1,) + shape, field.name
                if field.dtype == "float":
                    assert value.dtype == float_type, field.name
                else:
                    assert value.dtype == np.dtype(field.dtype), field.name


def test_batch_keys():
    budget = 8192
    assert BatchKey.of(13, budget) == BatchKey(None) and BatchKey.of(13, budget).shared
    big = budget // 8 + 1
    assert not shares_batch(big, budget)
    assert BatchKey.of(big, budget) == BatchKey(slot_size(big)) and not BatchKey.of(big, budget).shared
    assert len({BatchKey.of(n, budget) for n in (5, 64, 1000)}) == 1


def test_status_labels():
    assert Status.BLEW_APART.label == "diverged"
    assert [s.label for s in (Status.CONVERGED, Status.UNCONVERGED, Status.DIVERGED)] == \
        ["converged", "unconverged", "diverged"]


def test_status_after_step_precedence():
    # one system per case: (active, finite, within, fmax, steps) -> status
    cases = [
        ((True, False, False, 0.0, 9), Status.DIVERGED),  # non-finite wins over everything
        ((True, True, False, 0.0, 9), Status.BLEW_APART),  # out of reach wins over converged
        ((True, True, True, 0.01, 9), Status.CONVERGED),  # converged wins over the step limit
        ((True, True, True, 1.0, 9), Status.UNCONVERGED),
        ((True, True, True, 1.0, 3), Status.RUNNING),
        ((False, False, False, 0.0, 9), Status.CONVERGED),  # inactive systems keep their status
    ]
    active, finite, within, fmax, steps = (jnp.asarray(v) for v in zip(*(c for c, _ in cases)))
    before = jnp.asarray([Status.RUNNING] * 5 + [Status.CONVERGED], jnp.int32)
    targets = Targets(fmax=jnp.full(len(cases), 0.05), max_steps=jnp.full(len(cases), 9, jnp.int32))
    after = _status_after_step(before, active, finite, within, fmax, steps, targets)
    assert [Status(int(s)) for s in after] == [expected for _, expected in cases]
