"""The ``relax-batch`` console script, driven in subprocesses (issue 4 acceptance).

Five real runs, shared between the tests by module-scoped fixtures:

* ``mixed``: EMT (the default potential) on a folder of xyz/extxyz/cif/POSCAR inputs with a
  garbled file, NaN coordinates, an element EMT does not cover, a duplicate name and a
  step limit that one system hits; settings from a YAML config with flags overriding it.
  Every status, step count and energy is checked against ASE's own LBFGS + EMT.
* ``full``: 16 small Lennard-Jones clusters, uninterrupted; its files are read with plain
  h5py and ``read_trajectory`` and compared with :func:`kups_relax.relax` (run in a
  subprocess too, so that it reuses the compiled programs).
* ``killed`` + ``resumed``: the same inputs, ``kill -9`` once some ``.h5`` files exist,
  then ``--resume``; the outputs must equal the uninterrupted run's and no complete file
  may be rewritten.
* a run with no readable input (exit status 2).
* FIRE with a variable cell (``--optimizer fire --cell frechet --pressure``) on a bulk crystal
  and a cluster, against ASE's FIRE on ASE's FrechetCellFilter (the cluster: plain FIRE).

The subprocesses share a private JAX compilation cache, so the killed and resumed runs
and the API run reuse the programs the full run compiled.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT as AseEMT
from ase.cluster import Icosahedron, Octahedron
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import FIRE, LBFGS

import kups_relax
from kups_relax import cli
from kups_relax.io import read_trajectory
from structures import LJ_PARAMS, random_cluster

SCRIPT = shutil.which("relax-batch") or str(Path(sys.executable).parent / "relax-batch")
LJ_FLAGS = ["--potential", "lj", "--potential-params", "sigma=3.4,epsilon=0.0104,rc=8.5", "--fmax", "0.01"]
MIXED_FMAX = 0.05


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")))
    return env


def run_cli(args, env, cwd, timeout=300):
    return subprocess.run([SCRIPT, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def read_summary(path):
    with open(path, newline="") as f:
        return {row["name"] + "|" + row["source"]: row for row in csv.DictReader(f)}


# --- a mixed folder, EMT, against ASE -----------------------------------------------------------

def _mixed_structures():
    cu = Icosahedron("Cu", 2)
    cu.rattle(0.08, seed=1)
    au, ag = Octahedron("Au", 2), Octahedron("Ag", 2)
    au.rattle(0.1, seed=2)
    ag.rattle(0.15, seed=3)
    ni = bulk("Ni", "fcc", a=3.60, cubic=True)
    ni.rattle(0.05, seed=4)
    pt = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)
    pt.set_constraint(FixAtoms(indices=[a.index for a in pt if a.tag == 3]))
    pt.rattle(0.05, seed=5)
    return {"cu13": cu, "clusters-0": au, "clusters-1": ag, "ni": ni, "POSCAR_pt": pt}


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """A folder of inputs in several formats, some bad, and one more file with a name already taken."""
    root = tmp_path_factory.mktemp("mixed")
    folder, other = root / "in", root / "other"
    folder.mkdir()
    other.mkdir()
    s = _mixed_structures()
    write(folder / "cu13.xyz", s["cu13"])
    write(folder / "clusters.extxyz", [s["clusters-0"], s["clusters-1"]])
    write(folder / "ni.cif", s["ni"])
    write(folder / "POSCAR_pt", s["POSCAR_pt"], format="vasp")
    (folder / "garbled.xyz").write_text("3\nnot a frame\nCu 0 0\n")
    (folder / "nan.xyz").write_text("2\n\nCu 0 0 0\nCu nan 0 2.5\n")
    write(folder / "argon.xyz", Icosahedron("Ar", 2))
    (folder / "notes.txt").write_text("not a structure")
    write(other / "cu13.xyz", Icosahedron("Cu", 2))  # same name as in/cu13.xyz
    return root


@pytest.fixture(scope="module")
def ase_emt_reference(mixed_inputs):
    """ASE's LBFGS + EMT on every relaxable input as read from its file: steps to fmax, energy after each step."""
    files = {"cu13": "cu13.xyz", "clusters-0": "clusters.extxyz@0", "clusters-1": "clusters.extxyz@1",
             "ni": "ni.cif", "POSCAR_pt": "POSCAR_pt"}
    out = {}
    for name, file in files.items():
        atoms = read(mixed_inputs / "in" / file)
        atoms.calc = AseEMT()
        energies = []
        opt = LBFGS(atoms, logfile=None)
        opt.attach(lambda: energies.append(atoms.get_potential_energy()))  # at step 0, then after every step
        assert opt.run(fmax=MIXED_FMAX, steps=500), name
        assert len(energies) == opt.nsteps + 1
        out[name] = dict(steps=opt.nsteps, energies=energies)
    assert read(mixed_inputs / "in" / "POSCAR_pt").constraints  # FixAtoms went through the POSCAR
    return out


@pytest.fixture(scope="module")
def mixed(mixed_inputs, env, ase_emt_reference):
    root = mixed_inputs
    steps = sorted(ref["steps"] for ref in ase_emt_reference.values())
    assert steps[0] < steps[-1], steps
    limit = max(n for n in steps if n < steps[-1])  # at least the slowest system hits the limit
    config = root / "settings.yaml"
    config.write_text(f"fmax: 0.5\nmax-steps: {limit}\nplot: true\nout: out\n")
    proc = run_cli(["in", "other/cu13.xyz", "--config", config.name, "--fmax", MIXED_FMAX], env, root)
    return dict(root=root, out=root / "out", proc=proc, limit=limit)


def test_mixed_exit_status_and_table(mixed):
    proc = mixed["proc"]
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:4] == ["name", "atoms", "status", "steps"]
    assert "garbled.xyz: cannot read file" in proc.stderr
    assert "9 systems:" in proc.stdout


def test_mixed_summary_rows_match_ase(mixed, ase_emt_reference):
    rows = read_summary(mixed["out"] / "summary.csv")
    assert [key.split("|")[0] for key in rows] == ["POSCAR_pt", "argon", "clusters-0", "clusters-1", "cu13",
                                                 "garbled", "nan", "ni", "cu13"]
    bad = {key.split("|")[0] + ("(dup)" if "other" in key else ""): row for key, row in rows.items()
           if row["status"] not in ("converged", "unconverged")}
    assert bad["garbled"]["status"] == "unreadable" and "Frame has 1 atoms" in bad["garbled"]["reason"]
    assert bad["nan"]["status"] == "invalid" and "non-finite positions" in bad["nan"]["reason"]
    assert bad["argon"]["status"] == "invalid" and "Ar not covered" in bad["argon"]["reason"]
    assert bad["cu13(dup)"]["status"] == "invalid" and "duplicate system name 'cu13'" in bad["cu13(dup)"]["reason"]
    assert set(bad) == {"garbled", "nan", "argon", "cu13(dup)"}

    limit = mixed["limit"]
    statuses = set()
    for name, ref in ase_emt_reference.items():
        row = next(r for key, r in rows.items() if key.startswith(name + "|in"))
        converged = ref["steps"] <= limit
        statuses.add(row["status"])
        assert row["status"] == ("converged" if converged else "unconverged"), (name, row)
        assert row["converged"] == str(converged)
        assert int(row["steps"]) == min(ref["steps"], limit), name
        assert float(row["final_energy"]) == pytest.approx(ref["energies"][int(row["steps"])], abs=1e-8)
        assert float(row["final_fmax"]) < MIXED_FMAX if converged else float(row["final_fmax"]) >= MIXED_FMAX
        if not converged:
            assert f"not converged within {limit} steps" in row["reason"]
    assert statuses == {"converged", "unconverged"}


def test_mixed_h5_metadata_config_and_flags(mixed, ase_emt_reference):
    out = mixed["out"]
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(ase_emt_reference)
    for name, ref in ase_emt_reference.items():
        with h5py.File(out / f"{name}.h5", "r") as f:
            p = f["parameters"].attrs
            assert p["fmax"] == MIXED_FMAX  # the flag overrides the config's 0.5
            assert p["max_steps"] == mixed["limit"]  # from the config
            assert p["dtype"] == "float64" and p["version"] == kups_relax.__version__
            assert f["parameters/potential"].attrs["name"] == "emt"  # the default potential
            assert f["parameters/optimizer"].attrs["name"] == "lbfgs"
            assert f["parameters/optimizer"].attrs["max_step"] == 0.2
            assert bool(p["converged"]) == (ref["steps"] <= mixed["limit"])
            energies = f["observables/potential_energy/value"][()]
            assert len(energies) == p["steps"] + 1 == f["particles/all/position/value"].shape[0]
            np.testing.assert_allclose(energies, ref["energies"][:p["steps"] + 1], rtol=0, atol=1e-8)
    with h5py.File(out / "POSCAR_pt.h5", "r") as f:
        fixed = f["particles/all/fixed"][()]
        positions = f["particles/all/position/value"][()]
    np.testing.assert_array_equal(positions[:, fixed.all(axis=1)], positions[:1, fixed.all(axis=1)].repeat(
        len(positions), axis=0))  # fixed atoms never moved
    assert fixed.all(axis=1).sum() == 4


def test_mixed_relaxed_extxyz_and_plot(mixed):
    out = mixed["out"]
    rows = read_summary(out / "summary.csv")
    frames = read(out / "relaxed.extxyz", index=":")
    assert [a.info["name"] for a in frames] == ["POSCAR_pt", "clusters-0", "clusters-1", "cu13", "ni"]
    for a in frames:
        row = next(r for key, r in rows.items() if key.startswith(a.info["name"] + "|in"))
        assert a.info["converged"] == (row["converged"] == "True") and a.info["steps"] == int(row["steps"])
        assert a.get_potential_energy() == float(row["final_energy"])
        assert a.get_forces().shape == (len(a), 3)
    assert (out / "fmax.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_no_readable_input_exits_2(tmp_path, env):
    (tmp_path / "garbled.xyz").write_text("not xyz\n")
    proc = run_cli(["garbled.xyz", "missing.cif"], env, tmp_path)
    assert proc.returncode == 2
    assert "no readable input" in proc.stderr and "missing.cif: no such file" in proc.stderr
    assert not (tmp_path / "relax_out").exists()


def test_out_naming_a_file_is_a_usage_error(tmp_path, env):
    """``--out FILE`` (an existing regular file): exit status 2 and one line naming it, before any input is
    read; it was a FileExistsError traceback (status 1) from creating the folder after reading the inputs."""
    write(tmp_path / "cu.xyz", bulk("Cu", "fcc", a=3.6, cubic=True))
    taken = tmp_path / "results.txt"
    taken.write_text("keep me\n")
    before = taken.stat().st_mtime_ns
    for out, what in (("results.txt", "is a file, not a folder"), ("results.txt/sub", "results.txt is a file")):
        proc = run_cli(["cu.xyz", "--out", out, "--potential", "emt"], env, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("relax-batch: error:")]
        assert len(errors) == 1 and errors[0].startswith(f"relax-batch: error: --out {out}: "), proc.stderr
        assert what in errors[0] and proc.stderr.strip().endswith(errors[0])
    assert taken.read_text() == "keep me\n" and taken.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cu.xyz", "results.txt"]


def test_fire_variable_cell_matches_ase(tmp_path, env):
    """``--optimizer fire --cell frechet --pressure 0.01`` on a sheared, rattled 4-atom Cu crystal
    and a 6-atom Cu cluster: each system's steps, final cell and positions equal ASE's
    ``FIRE(FrechetCellFilter(atoms, scalar_pressure=0.01))`` + ASE's EMT (the cluster, which has
    no periodic direction, ASE's plain FIRE), and the .h5 holds the cell of every step."""
    bulk_cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    bulk_cu.rattle(0.05, seed=1)
    bulk_cu.cell[0, 1] += 0.1
    cluster = Octahedron("Cu", 2)
    cluster.rattle(0.05, seed=2)
    write(tmp_path / "cu_bulk.extxyz", bulk_cu)
    write(tmp_path / "cu_cluster.xyz", cluster)
    proc = run_cli(["cu_bulk.extxyz", "cu_cluster.xyz", "--potential", "emt", "--optimizer", "fire",
                    "--cell", "frechet", "--pressure", "0.01", "--fmax", "0.05", "--out", "out"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    relaxed = {a.info["name"]: a for a in read(tmp_path / "out" / "relaxed.extxyz", index=":")}
    assert sorted(relaxed) == ["cu_bulk", "cu_cluster"]
    for name, file in (("cu_bulk", "cu_bulk.extxyz"), ("cu_cluster", "cu_cluster.xyz")):
        atoms = read(tmp_path / file)  # as the CLI read it
        atoms.calc = AseEMT()
        periodic = atoms.pbc.any()
        opt = FIRE(FrechetCellFilter(atoms, scalar_pressure=0.01) if periodic else atoms, logfile=None)
        cells = []
        opt.attach(lambda: cells.append(atoms.cell.array.copy()))  # at step 0, then after every step
        assert opt.run(fmax=0.05, steps=500), name
        ours = relaxed[name]
        assert ours.info["converged"] and ours.info["steps"] == opt.nsteps, (name, ours.info, opt.nsteps)
        np.testing.assert_allclose(ours.cell.array, atoms.cell.array, rtol=0, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(ours.positions, atoms.positions, rtol=0, atol=1e-8, err_msg=name)
        assert abs(ours.get_potential_energy() - atoms.get_potential_energy()) < 1e-8, name
        with h5py.File(tmp_path / "out" / f"{name}.h5", "r") as f:
            assert f["parameters/optimizer"].attrs["name"] == "fire"
            edges = f["particles/all/box/edges/value"][()]
            boundary = [b.decode() for b in f["particles/all/box"].attrs["boundary"]]
        assert edges.shape == (opt.nsteps + 1, 3, 3), (name, edges.shape)
        np.testing.assert_allclose(edges, np.stack(cells), rtol=0, atol=1e-8, err_msg=name)  # ASE's cell path
        np.testing.assert_allclose(edges[-1], ours.cell.array, rtol=0, atol=1e-12, err_msg=name)
        if periodic:
            assert boundary == ["periodic"] * 3
            assert not np.allclose(edges[0], edges[-1], rtol=0, atol=1e-3), name  # the cell relaxed ...
            assert len({e.tobytes() for e in edges}) > opt.nsteps // 2, name  # ... changing along the way
        else:
            assert boundary == ["none"] * 3
            np.testing.assert_array_equal(edges, np.zeros_like(edges))


# --- LJ: uninterrupted, against the API; killed and resumed -----------------------------------

N_CLUSTERS = 16


@pytest.fixture(scope="module")
def lj_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lj")
    (root / "in").mkdir()
    # 120 atoms: the resumed run (a system or two fewer) packs into the same capacities and reuses the programs
    for k, n in enumerate([4, 5, 6, 7, 8, 9, 10, 11] * 2):
        write(root / "in" / f"c{k:02d}.xyz", random_cluster(n, seed=100 + k))
    return root


@pytest.fixture(scope="module")
def full(lj_inputs, env):
    proc = run_cli(["in", "--out", "full", *LJ_FLAGS], env, lj_inputs)
    return dict(proc=proc, out=lj_inputs / "full")


@pytest.fixture(scope="module")
def killed(lj_inputs, env, full):
    """A run killed with SIGKILL once its first trajectory exists; what it left behind."""
    out = lj_inputs / "resumed"
    with open(lj_inputs / "killed.log", "w") as log:
        proc = subprocess.Popen([SCRIPT, "in", "--out", "resumed", *LJ_FLAGS], env=env, cwd=lj_inputs,
                                stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and any(p.suffix == ".h5" for p in out.iterdir()):
                proc.kill()  # SIGKILL: no cleanup of any kind
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    complete = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in out.glob("*.h5")}
    return dict(returncode=proc.returncode, complete=complete, out=out,
                left=sorted(p.name for p in out.iterdir()))


@pytest.fixture(scope="module")
def resumed(lj_inputs, env, killed):
    proc = run_cli(["in", "--out", "resumed", "--resume", *LJ_FLAGS], env, lj_inputs)
    return dict(proc=proc, out=lj_inputs / "resumed")


def test_full_run_exits_0_with_every_output(full):
    assert full["proc"].returncode == 0, full["proc"].stderr
    out = full["out"]
    assert len(list(out.glob("*.h5"))) == N_CLUSTERS
    rows = read_summary(out / "summary.csv")
    assert len(rows) == N_CLUSTERS and all(r["status"] == "converged" for r in rows.values())
    assert len(read(out / "relaxed.extxyz", index=":")) == N_CLUSTERS


def test_same_command_again_compiles_nothing_and_gives_the_same_files(lj_inputs, env, full):
    """Issue 6: a second run of the same command loads every program (kups_relax.executables: no
    tracing, no lowering, no compiling) and writes byte-identical results."""
    proc = run_cli(["in", "--out", "again", *LJ_FLAGS], env, lj_inputs)
    assert proc.returncode == 0, proc.stderr
    assert "compiled 0 programs" in proc.stderr, proc.stderr
    saved = Path(env["JAX_COMPILATION_CACHE_DIR"]) / "kups-executables"
    assert len(list(saved.glob("*.exe"))) >= 4 and not list(saved.glob("*.part"))
    again = lj_inputs / "again"
    assert (again / "summary.csv").read_bytes() == (full["out"] / "summary.csv").read_bytes()
    assert (again / "relaxed.extxyz").read_bytes() == (full["out"] / "relaxed.extxyz").read_bytes()
    for p in full["out"].glob("*.h5"):
        x, y = read_trajectory(p), read_trajectory(again / p.name)
        assert np.array_equal(np.stack([f.positions for f in x]), np.stack([f.positions for f in y])), p.name


API_SCRIPT = """
import pickle, sys
from kups_relax import relax
from kups_relax.io import read_structures
from potentials import LennardJones
items = read_structures([sys.argv[1]])
results = relax([it.atoms for it in items], LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5), fmax=0.01,
                names=[it.name for it in items], trajectory=True)
with open(sys.argv[2], "wb") as f:
    pickle.dump(results, f)
"""


@pytest.fixture(scope="module")
def api_results(lj_inputs, env, full):
    """``kups_relax.relax`` on the same inputs, in a fresh process that reuses the CLI run's compiled programs."""
    path = lj_inputs / "api.pickle"
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT, "in", path.name], env=env, cwd=lj_inputs,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(path, "rb") as f:
        return pickle.load(f)


def test_h5_matches_api_and_read_trajectory(full, api_results):
    assert len(api_results) == N_CLUSTERS
    for result in api_results:
        path = full["out"] / f"{result.name}.h5"
        with h5py.File(path, "r") as f:  # plain h5py, no kups_relax code
            positions = f["particles/all/position/value"][()]
            forces = f["particles/all/force/value"][()]
            energies = f["observables/potential_energy/value"][()]
            fmaxes = f["observables/max_force/value"][()]
            species = f["particles/all/species"][()]
            assert f["parameters"].attrs["steps"] == result.steps
            assert f["parameters"].attrs["status"] == result.status
            assert f["parameters/potential"].attrs["sigma"] == LJ_PARAMS["sigma"]
        np.testing.assert_array_equal(species, result.atoms.numbers)
        np.testing.assert_allclose(positions, np.stack([a.positions for a in result.trajectory]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(forces, np.stack([a.get_forces() for a in result.trajectory]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(energies, result.energies, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fmaxes, result.fmaxes, rtol=0, atol=1e-12)
        frames = read_trajectory(path)
        assert len(frames) == len(result.trajectory) == result.steps + 1
        for ours, api in zip(frames, result.trajectory):
            np.testing.assert_allclose(ours.positions, api.positions, rtol=0, atol=1e-12)
            np.testing.assert_allclose(ours.get_forces(), api.get_forces(), rtol=0, atol=1e-12)
            assert ours.get_potential_energy() == pytest.approx(api.get_potential_energy(), abs=1e-12)


def test_killed_run_left_some_complete_files(killed):
    assert killed["returncode"] == -9, "the run finished before it could be killed"
    assert 0 < len(killed["complete"]) < N_CLUSTERS, killed["left"]
    assert "summary.csv" not in killed["left"] and "relaxed.extxyz" not in killed["left"]
    for name in killed["complete"]:  # every file under its final name is whole
        assert len(read_trajectory(killed["out"] / name)) > 1


def test_resume_never_rewrites_and_ends_like_the_uninterrupted_run(killed, resumed, full):
    proc = resumed["proc"]
    assert proc.returncode == 0, proc.stderr
    assert f"resume: {len(killed['complete'])} of {N_CLUSTERS} systems already complete" in proc.stderr
    out = resumed["out"]
    for name, (ino, mtime, digest) in killed["complete"].items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == (ino, mtime), name
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(p.name for p in full["out"].glob("*.h5"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    a, b = read_summary(full["out"] / "summary.csv"), read_summary(out / "summary.csv")
    assert list(a) == list(b)
    for key in a:
        for column in ("atoms", "converged", "steps", "status", "reason"):
            assert a[key][column] == b[key][column], (key, column)
        # the resumed run packs fewer systems into a different slot layout, so sums run over other
        # padded shapes: equal to round-off (forces after a few hundred steps: ~1e-11 eV/Å)
        for column, tol in (("initial_energy", 1e-12), ("final_energy", 1e-12), ("final_fmax", 1e-10)):
            assert float(a[key][column]) == pytest.approx(float(b[key][column]), abs=tol), (key, column)
    full_frames = read(full["out"] / "relaxed.extxyz", index=":")
    resumed_frames = read(out / "relaxed.extxyz", index=":")
    assert [f.info["name"] for f in full_frames] == [f.info["name"] for f in resumed_frames]
    for x, y in zip(full_frames, resumed_frames):
        np.testing.assert_allclose(x.positions, y.positions, rtol=0, atol=1e-10)
        assert x.info["steps"] == y.info["steps"]
    for p in full["out"].glob("*.h5"):
        x, y = read_trajectory(p), read_trajectory(out / p.name)
        assert len(x) == len(y), p.name
        # mid-path frames: the round-off above, amplified along flat stretches (the ASE-parity tolerance)
        np.testing.assert_allclose(np.stack([f.positions for f in x]), np.stack([f.positions for f in y]),
                                   rtol=0, atol=1e-8)


def test_second_resume_has_nothing_to_do_and_touches_nothing(lj_inputs, resumed, capsys, monkeypatch):
    out = resumed["out"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.h5")}
    summary = (out / "summary.csv").read_text()
    monkeypatch.chdir(lj_inputs)
    assert cli.main(["in", "--out", "resumed", "--resume", *LJ_FLAGS]) == 0  # in-process: no relaxation to compile
    assert f"resume: {N_CLUSTERS} of {N_CLUSTERS} systems already complete, relaxed 0" in capsys.readouterr().err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.h5")} == before
    assert (out / "summary.csv").read_text() == summary


def test_existing_outputs_need_resume_or_overwrite(lj_inputs, full, capsys, monkeypatch):
    monkeypatch.chdir(lj_inputs)
    before = {p.name: p.stat().st_mtime_ns for p in full["out"].iterdir()}
    assert cli.main(["in", "--out", "full", *LJ_FLAGS]) == 2
    assert "pass --resume to keep them" in capsys.readouterr().err
    assert cli.main(["in", "--out", "full", "--resume", *LJ_FLAGS[:-2], "--fmax", "0.02"]) == 2
    assert "fmax: 0.01 there, 0.02 now" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in full["out"].iterdir()} == before


def test_background_writer_finishes_every_write_and_reraises_the_first_error():
    from types import SimpleNamespace

    from kups_relax.cli import BackgroundWriter

    done = []
    results = [SimpleNamespace(trajectory=object()) for _ in range(5)]
    with BackgroundWriter(backlog=2) as writer:
        for i, r in enumerate(results):
            writer.submit(r, lambda i=i: done.append(i))
    assert done == [0, 1, 2, 3, 4] and all(r.trajectory is None for r in results)

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as writer:
            writer.submit(results[0], fail)
            writer.submit(results[1], lambda: done.append("after the failure"))
    assert "after the failure" not in done
    # an error in the block itself wins, and the writes already submitted still finish
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter() as writer:
            writer.submit(results[2], lambda: done.append("before the interrupt"))
            raise KeyboardInterrupt
    assert done[-1] == "before the interrupt"
