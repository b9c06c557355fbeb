"""Our H5MD trajectories against the H5MD 1.1 specification and MDAnalysis' H5MD reader (issue 16).

One ``relax`` call (EMT, a few L-BFGS steps) relaxes a rattled Cu crystal, a Cu cluster without
periodic boundaries, a Cu slab periodic in two directions (bottom layer fixed) and a strained Cu
crystal whose cell relaxes too (``cell_filter="frechet"``: the box changes every frame). Their
trajectories are written the way ``relax-batch`` writes them (:class:`kups_relax.outputs.TrajectoryWriter`:
``per-system`` files through :func:`kups_relax.io.write_result`, and one ``per-shard`` file), then

* checked against the specification with plain ``h5py``: every time-dependent element has ``step``
  and ``time`` (one hard-linked pair per system, as H5MD asks of ``box`` and ``position``), the box
  its ``dimension``/``boundary`` attributes and ``edges``, and every unit is an H5MD unit string;
* opened with MDAnalysis' H5MD reader (:func:`universe`: no topology file, ``convert_units=False``),
  per-system files directly and each system of the shard through
  :func:`kups_relax.h5md.write_system_link` (MDAnalysis reads one particle group per file): frames,
  positions, boxes, forces, time, step and the observables must be ours (MDAnalysis holds float32);
* read back with :func:`kups_relax.io.read_trajectory` in this layout and in the previous one (the
  files turned back into what the previous version wrote).
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms

from kups_relax import relax
from kups_relax.h5md import write_system_link
from kups_relax.io import optimizer_metadata, potential_metadata, read_observable, read_trajectory, system_names
from kups_relax.outputs import TrajectoryWriter
from kups_relax.engine import resolve_optimizer
from potentials import get_potential

mda = pytest.importorskip("MDAnalysis", reason="MDAnalysis is in the test extra: pip install -e '.[test]'")
from MDAnalysis.coordinates.H5MD import H5MDReader  # noqa: E402

EMT = get_potential("emt")
MAX_STEPS = 5
F32 = dict(rtol=1e-5, atol=1e-5)  # MDAnalysis' float32 frames against our float64 arrays


def _structures():
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.rattle(0.05, seed=1)
    cluster = Icosahedron("Cu", 2)
    cluster.rattle(0.08, seed=2)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 2]))
    slab.rattle(0.05, seed=3)
    strained = bulk("Cu", "fcc", a=3.75, cubic=True)
    strained.cell[0, 1] += 0.1
    strained.rattle(0.04, seed=4)
    return {"cu-crystal": (crystal, None), "cu-cluster": (cluster, None), "cu-slab": (slab, None),
            "cu-cell": (strained, "frechet")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The results, and their trajectories as relax-batch writes them: per-system files and one shard."""
    cases = _structures()
    results = relax([a for a, _ in cases.values()], EMT, fmax=1e-4, max_steps=MAX_STEPS, trajectory=True,
                    names=list(cases), cell_filter=[c for _, c in cases.values()])
    assert not cases["cu-cluster"][0].pbc.any() and list(cases["cu-slab"][0].pbc) == [True, True, False]
    root = tmp_path_factory.mktemp("h5md")
    info = dict(potential=potential_metadata(EMT, "emt"), optimizer=optimizer_metadata(resolve_optimizer(None), "lbfgs"))
    files = {}
    for mode in ("per-system", "per-shard"):
        out = root / mode
        out.mkdir()
        with TrajectoryWriter(out, mode, **info) as writer:
            for r in results:
                writer.write(r, source=f"{r.name}.xyz")
        if mode == "per-system":
            files.update({r.name: writer.path(r.name) for r in results})
        else:
            (shard,) = writer.shards
    return dict(results={r.name: r for r in results}, files=files, shard=shard, root=root)


def _frames(result):
    """Our arrays of one result: positions, forces, cells (T, 3, 3), energies, fmaxes."""
    t = result.trajectory
    cells = t.cells if t.cells is not None else np.broadcast_to(t.atoms.cell.array, (len(t), 3, 3))
    return t.positions, t.forces, np.asarray(cells), result.energies, result.fmaxes


def _elements(group: h5py.Group) -> dict[str, h5py.Group]:
    """Every H5MD time-dependent element (a group holding a ``value`` dataset) under ``group``."""
    found = {}

    def visit(name, obj):  # returns None: visititems stops at the first other value
        if isinstance(obj, h5py.Group) and isinstance(obj.get("value"), h5py.Dataset):
            found[name] = obj

    group.visititems(visit)
    return found


def _check_system(particles: h5py.Group, observables: h5py.Group, result) -> None:
    positions, forces, cells, energies, fmaxes = _frames(result)
    T = result.steps + 1
    assert len(positions) == T
    elements = {**{f"particles/{k}": v for k, v in _elements(particles).items()},
                **{f"observables/{k}": v for k, v in _elements(observables).items()}}
    assert sorted(elements) == ["observables/max_force", "observables/potential_energy", "particles/box/edges",
                                "particles/force", "particles/position"]
    step, time = particles["position/step"], particles["position/time"]
    for name, element in elements.items():
        assert element["step"].dtype.kind == "i" and element["time"].dtype.kind == "f", name
        assert element["step"].shape == element["time"].shape == (T,) == element["value"].shape[:1], name
        np.testing.assert_array_equal(element["step"][()], np.arange(T))
        np.testing.assert_array_equal(element["time"][()], np.arange(T))  # a relaxation's time is its step
        assert "unit" not in element["time"].attrs, name  # dimensionless
        assert element["step"] == step and element["time"] == time, name  # one hard-linked pair
    box = particles["box"]
    assert box.attrs["dimension"] == 3
    assert [b.decode() for b in box.attrs["boundary"]] == ["periodic" if p else "none" for p in result.atoms.pbc]
    np.testing.assert_array_equal(box["edges/value"][()], cells)
    units = {name: element["value"].attrs.get("unit") for name, element in elements.items()}
    assert units == {"particles/position": "Angstrom", "particles/box/edges": "Angstrom", "particles/force": None,
                     "observables/potential_energy": "eV", "observables/max_force": "eV Angstrom-1"}
    for key in ("position", "box/edges"):  # a length unit MDAnalysis converts
        assert H5MDReader._unit_translation["length"][units[f"particles/{key}"]] == "Angstrom"
    np.testing.assert_array_equal(particles["position/value"][()], positions)
    np.testing.assert_array_equal(particles["force/value"][()], forces)
    np.testing.assert_array_equal(observables["potential_energy/value"][()], energies)
    np.testing.assert_array_equal(observables["max_force/value"][()], fmaxes)


def test_per_system_files_follow_h5md_1_1(written):
    for name, path in written["files"].items():
        result = written["results"][name]
        with h5py.File(path, "r") as f:
            assert list(f["h5md"].attrs["version"]) == [1, 1]
            assert f["h5md/creator"].attrs["name"] == "kups-relax" and "name" in f["h5md/author"].attrs
            assert list(f["particles"]) == ["all"]
            _check_system(f["particles/all"], f["observables"], result)
            if result.atoms.pbc.all():  # the final stress, with its unit and step
                stress = f["parameters/stress"]
                assert stress.shape == (3, 3) and stress.attrs["unit"] == "eV Angstrom-3"
                assert stress.attrs["step"] == result.steps
            else:
                assert "stress" not in f["parameters"]


def test_shard_follows_h5md_1_1(written):
    with h5py.File(written["shard"], "r") as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1] and f.attrs["layout"] == "shard"
        assert sorted(f["particles"]) == sorted(written["results"])
        for name, result in written["results"].items():
            _check_system(f["particles"][name], f["observables"][name], result)
            assert ("stress" in f["parameters"][name]) == bool(result.atoms.pbc.all())


def universe(path, **kwargs):
    """MDAnalysis' Universe of an H5MD file without a topology file (see :mod:`kups_relax.h5md`).

    ``Universe(path, format="H5MD")`` alone cannot work: MDAnalysis finds the atom count of a
    topology-less file only when it is named ``*.h5md`` and only with unit conversion on, and unit
    conversion needs a time unit, which a relaxation has not.
    """
    with h5py.File(path, "r") as f:
        n_atoms = len(f["particles/all/species"])
    kwargs.setdefault("convert_units", False)
    return mda.Universe(str(path), format="H5MD", topology_format="MINIMAL", n_atoms=n_atoms, to_guess=(), **kwargs)


def _check_universe(u, result) -> None:
    positions, forces, cells, energies, fmaxes = _frames(result)
    assert u.trajectory.n_frames == result.steps + 1 == len(positions)
    assert len(u.atoms) == len(result.atoms)
    for t, ts in enumerate(u.trajectory):
        assert ts.frame == t and ts.data["step"] == t and ts.time == t
        np.testing.assert_allclose(ts.positions, positions[t], **F32)
        np.testing.assert_allclose(ts.forces, forces[t], **F32)
        if result.atoms.pbc.any():
            atoms = result.trajectory[t]
            np.testing.assert_allclose(ts.dimensions, atoms.cell.cellpar(), **F32)  # lengths Å, angles degrees
        else:  # no cell at all (ASE's zero cell): no box
            assert not cells[t].any() and ts.dimensions is None
        assert ts.data["potential_energy"] == energies[t] and ts.data["max_force"] == fmaxes[t]


def test_mdanalysis_reads_per_system_files(written):
    cells = {}
    for name, path in written["files"].items():
        result = written["results"][name]
        u = universe(path)
        _check_universe(u, result)
        cells[name] = [ts.dimensions.copy() if ts.dimensions is not None else None for ts in u.trajectory]
        u.trajectory.close()
    assert written["results"]["cu-cell"].steps >= 2
    assert not np.allclose(cells["cu-cell"][0], cells["cu-cell"][-1])  # the box changed under the filter


def test_mdanalysis_needs_convert_units_off(written):
    """With unit conversion on, MDAnalysis needs a time unit; a relaxation's time (its step) has none."""
    with pytest.raises(ValueError, match="convert_units"):
        universe(written["files"]["cu-crystal"], convert_units=True)


def test_mdanalysis_reads_each_system_of_a_shard_through_a_link_file(written, tmp_path):
    shard = written["shard"]
    before = shard.stat().st_size
    for name in system_names(shard):
        link = write_system_link(shard, name, shard.with_name(f"{name}.link.h5"))
        assert link.stat().st_size < 20_000  # links, not a copy
        u = universe(link)
        _check_universe(u, written["results"][name])
        u.trajectory.close()
        back = read_trajectory(link)  # our reader takes it as a per-system file
        np.testing.assert_array_equal(back[-1].positions, written["results"][name].trajectory.positions[-1])
        assert system_names(link) == [name]
    moved = tmp_path / "elsewhere.h5"  # another folder: an absolute link
    write_system_link(shard, "cu-slab", moved)
    assert len(read_trajectory(moved)) == written["results"]["cu-slab"].steps + 1
    assert shard.stat().st_size == before
    with pytest.raises(KeyError):
        write_system_link(shard, "missing", tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="not a shard"):
        write_system_link(written["files"]["cu-slab"], "cu-slab", tmp_path / "not-a-shard.h5")


# --- the previous layout still reads ------------------------------------------------------------------

def _to_previous_layout(path) -> None:
    """Turn a file of this layout into what the previous version wrote: no ``time`` datasets, units
    ``angstrom``/``eV/angstrom`` (forces too), and the final stress as the observable
    ``stress/{step (1,), value (1, 3, 3)}`` instead of ``/parameters/stress``."""
    old_units = {"Angstrom": "angstrom", "eV Angstrom-1": "eV/angstrom", "eV": "eV"}
    with h5py.File(path, "r+") as f:
        shard = f.attrs.get("layout") == "shard"
        systems = [(f["particles"][n], f["observables"][n], f["parameters"][n]) for n in f["particles"]] if shard \
            else [(f["particles/all"], f["observables"], f["parameters"])]
        for particles, observables, params in systems:
            for group in (particles, observables):
                for element in _elements(group).values():
                    del element["time"]
                    value = element["value"]
                    value.attrs["unit"] = old_units[value.attrs["unit"]] if "unit" in value.attrs else "eV/angstrom"
            if "stress" in params:
                stress, step = params["stress"][()], params["stress"].attrs["step"]
                del params["stress"]
                old = observables.create_group("stress")
                old.create_dataset("step", data=np.array([step], np.int64))
                old.create_dataset("value", data=stress[None]).attrs["unit"] = "eV/angstrom^3"


def _same_frames(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell.array, y.cell.array)
        np.testing.assert_array_equal(x.pbc, y.pbc)
        np.testing.assert_array_equal(x.numbers, y.numbers)
        assert x.info["step"] == y.info["step"]
        assert x.calc.results.keys() == y.calc.results.keys()
        for key, value in x.calc.results.items():
            np.testing.assert_array_equal(value, y.calc.results[key])
        assert [c.todict() for c in x.constraints] == [c.todict() for c in y.constraints]


def test_read_trajectory_reads_this_layout_and_the_previous_one(written, tmp_path):
    for name, path in written["files"].items():
        result = written["results"][name]
        new = read_trajectory(path)
        positions, forces, cells, energies, _ = _frames(result)
        assert len(new) == result.steps + 1
        np.testing.assert_array_equal([a.positions for a in new], positions)
        np.testing.assert_array_equal([a.calc.results["forces"] for a in new], forces)
        np.testing.assert_array_equal([a.cell.array for a in new], cells)
        np.testing.assert_array_equal([a.get_potential_energy() for a in new], energies)
        assert ("stress" in new[-1].calc.results) == bool(result.atoms.pbc.all())
        if result.atoms.pbc.all():
            np.testing.assert_allclose(new[-1].get_stress(), result.atoms.get_stress(), rtol=0, atol=1e-12)
        old = tmp_path / path.name
        shutil.copy(path, old)
        _to_previous_layout(old)
        with h5py.File(old, "r") as f:
            assert "time" not in f["particles/all/position"] and "stress" not in f["parameters"]
        _same_frames(read_trajectory(old), new)
        if result.atoms.pbc.all():
            for file in (path, old):
                step, stress = read_observable(file, "stress")
                assert list(step) == [result.steps] and stress.shape == (1, 3, 3)
    old_shard = tmp_path / written["shard"].name
    shutil.copy(written["shard"], old_shard)
    _to_previous_layout(old_shard)
    assert system_names(old_shard) == system_names(written["shard"]) == list(written["results"])
    for name in written["results"]:
        _same_frames(read_trajectory(old_shard, system=name), read_trajectory(written["shard"], system=name))
