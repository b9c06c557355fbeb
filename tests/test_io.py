"""Readers, safe writers, the H5MD layout and the CLI's config handling (no relaxation, no compilation)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron
from ase.constraints import FixAtoms, FixCartesian
from ase.io import write

import kups_relax
from kups_relax import RelaxResult, cli
from kups_relax.h5md import write_relaxation
from kups_relax.io import (SUMMARY_COLUMNS, atomic_output, read_observable, read_parameters, read_structures,
                           read_trajectory, remove_stale_temporaries, write_result, write_summary_csv)
from kups_relax.report import summary_table

REPO = Path(__file__).resolve().parents[1]


# --- reading inputs -----------------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path):
    """A folder of mixed inputs, and the structures written into it."""
    folder = tmp_path / "in"
    folder.mkdir()
    ico = Icosahedron("Ar", 2)
    ico.rattle(0.1, seed=1)
    write(folder / "ico.xyz", ico)
    frames = [Icosahedron("Cu", 2) for _ in range(3)]
    for k, f in enumerate(frames):
        f.rattle(0.05, seed=10 + k)
    write(folder / "multi.extxyz", frames)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    write(folder / "cu.cif", cu)
    write(folder / "POSCAR_cu", cu, format="vasp")
    (folder / "garbled.xyz").write_text("3\nhello\nAr 0 0\n")
    (folder / "unknown.xyz").write_text("2\n\nAr 0 0 0\nXx 0 0 3.8\n")
    (folder / "notes.txt").write_text("not a structure")
    (folder / ".hidden.xyz").write_text("1\n\nAr 0 0 0\n")
    other = tmp_path / "other"
    other.mkdir()
    write(other / "ico.xyz", Icosahedron("Ar", 2))
    return tmp_path, dict(ico=ico, frames=frames, cu=cu)


def test_read_structures_names_sources_and_problems(inputs):
    root, built = inputs
    items = read_structures([root / "in", root / "other" / "ico.xyz", root / "missing.cif"])
    names = [it.name for it in items]
    # folder in sorted order, one system per frame, hidden and non-structure files skipped
    assert names == ["POSCAR_cu", "cu", "garbled", "ico", "multi-0", "multi-1", "multi-2", "unknown", "ico",
                     "missing"]
    assert items[5].source == str(root / "in" / "multi.extxyz@1")
    np.testing.assert_allclose(items[5].atoms.positions, built["frames"][1].positions, atol=1e-8)
    np.testing.assert_allclose(items[3].atoms.positions, built["ico"].positions, atol=1e-8)
    np.testing.assert_allclose(items[0].atoms.cell.array, built["cu"].cell.array, atol=1e-10)
    assert all(it.ok for it in items if it.name in ("POSCAR_cu", "cu", "multi-0", "multi-1", "multi-2"))
    assert items[2].status == "unreadable" and "Frame has 1 atoms, expected 3" in items[2].reason
    assert items[7].status == "unreadable" and "'Xx'" in items[7].reason
    duplicate = items[8]
    assert duplicate.status == "invalid" and duplicate.atoms is not None
    assert "duplicate system name 'ico'" in duplicate.reason and "ico.xyz" in duplicate.reason
    assert items[3].ok  # the first one keeps the name
    assert items[9].status == "unreadable" and items[9].reason == "no such file"


def test_read_structures_forced_format_takes_every_file(tmp_path):
    a = Icosahedron("Ar", 2)
    write(tmp_path / "frame.dat", a, format="extxyz")
    assert read_structures([tmp_path]) == []  # .dat does not look like a structure file
    (item,) = read_structures([tmp_path], format="extxyz")
    assert item.ok and item.name == "frame"
    np.testing.assert_allclose(item.atoms.positions, a.positions, atol=1e-8)


def test_calculator_results_of_inputs_are_dropped(tmp_path):
    a = Icosahedron("Ar", 2)
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.ones((len(a), 3)))
    write(tmp_path / "withcalc.extxyz", a)
    (item,) = read_structures([tmp_path / "withcalc.extxyz"])
    assert item.atoms.calc is None


# --- safe writing ---------------------------------------------------------------------------------

def test_atomic_output_renames_only_on_success(tmp_path):
    target = tmp_path / "x.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.txt.tmp.")
        tmp.write_text("complete")
        assert not target.exists()
    assert target.read_text() == "complete"

    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "complete"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]  # and no temporary left


def test_remove_stale_temporaries_keeps_live_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.h5.tmp.{dead.pid}"
    live = tmp_path / f".b.h5.tmp.{os.getpid()}"
    other = tmp_path / "c.h5"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_summary_csv_keeps_every_digit_and_blanks_missing_values(tmp_path):
    rows = [dict(name="a", source="in/a.xyz", atoms=3, converged=True, steps=4, initial_energy=-1.0,
                 final_energy=-1.2345678901234567, final_fmax=0.01, status="converged", reason=""),
            dict(name="b", source="in/b.xyz", atoms=None, converged=False, final_energy=float("nan"),
                 status="unreadable", reason="cannot read file (x, y)")]
    write_summary_csv(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == SUMMARY_COLUMNS
    assert float(read[0]["final_energy"]) == -1.2345678901234567
    assert read[1]["atoms"] == "" and read[1]["final_energy"] == "" and read[1]["reason"] == "cannot read file (x, y)"


# --- the H5MD layout ------------------------------------------------------------------------------

def _synthetic_trajectory(T=4, N=5, seed=0):
    rng = np.random.default_rng(seed)
    base = Atoms("Cu3Au2", positions=rng.uniform(0, 5, (N, 3)), cell=[[5, 0, 0], [1, 6, 0], [0, 0, 7]],
                 pbc=[True, True, False])
    base.set_constraint([FixAtoms(indices=[0]), FixCartesian(2, mask=[False, False, True])])
    frames, energies = [], []
    for t in range(T):
        a = base.copy()
        a.positions = base.positions + 0.01 * t
        e = -1.0 - 0.1 * t
        a.calc = SinglePointCalculator(a, energy=e, forces=rng.normal(size=(N, 3)))
        frames.append(a)
        energies.append(e)
    return frames, np.array(energies), np.linspace(1.0, 0.1, T)


def test_h5md_layout_reads_with_plain_h5py(tmp_path):
    frames, energies, fmaxes = _synthetic_trajectory()
    stress = np.arange(9.0).reshape(3, 3) * 1e-3
    path = tmp_path / "sys.h5"
    write_relaxation(path, frames, energies, fmaxes, parameters=dict(name="sys", steps=3, converged=True, reason=""),
                     potential=dict(name="emt", cutoff=5.0, pairs=None), optimizer=dict(name="lbfgs", maxstep=0.2),
                     stress=stress, creator_version="9.9")
    with h5py.File(path, "r") as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/creator"].attrs["name"] == "kups-relax" and f["h5md/creator"].attrs["version"] == "9.9"
        assert "name" in f["h5md/author"].attrs
        p = f["particles/all"]
        np.testing.assert_array_equal(p["species"][()], frames[0].numbers)
        assert [b.decode() for b in p["box"].attrs["boundary"]] == ["periodic", "periodic", "none"]
        assert p["box"].attrs["dimension"] == 3
        assert p["position/value"].shape == (4, 5, 3) and p["position/value"].attrs["unit"] == "Angstrom"
        assert "unit" not in p["force/value"].attrs  # eV/Å: no unit MDAnalysis would open (kups_relax.h5md)
        assert p["box/edges/value"].attrs["unit"] == "Angstrom"
        np.testing.assert_array_equal(p["position/step"][()], np.arange(4))
        np.testing.assert_array_equal(p["position/time"][()], np.arange(4.0))  # no physical time: the step
        assert p["force/time"] == p["position/time"] and p["box/edges/step"] == p["position/step"]  # hard links
        np.testing.assert_array_equal(p["position/value"][2], frames[2].positions)
        np.testing.assert_array_equal(p["force/value"][3], frames[3].calc.results["forces"])
        np.testing.assert_array_equal(p["box/edges/value"][1], frames[0].cell.array)
        fixed = p["fixed"][()]
        assert fixed[0].all() and list(fixed[2]) == [False, False, True] and not fixed[[1, 3, 4]].any()
        o = f["observables"]
        np.testing.assert_array_equal(o["potential_energy/value"][()], energies)
        assert o["potential_energy/value"].attrs["unit"] == "eV"
        np.testing.assert_array_equal(o["max_force/value"][()], fmaxes)
        np.testing.assert_array_equal(o["max_force/step"][()], np.arange(4))
        assert o["max_force/value"].attrs["unit"] == "eV Angstrom-1" and "stress" not in o
        s = f["parameters/stress"]
        np.testing.assert_array_equal(s[()], stress)
        assert s.attrs["step"] == 3 and s.attrs["unit"] == "eV Angstrom-3"
        assert f["parameters"].attrs["name"] == "sys" and bool(f["parameters"].attrs["converged"])
        assert f["parameters/potential"].attrs["name"] == "emt" and "pairs" not in f["parameters/potential"].attrs
        assert f["parameters/optimizer"].attrs["maxstep"] == 0.2


def test_read_trajectory_round_trip(tmp_path):
    frames, energies, fmaxes = _synthetic_trajectory()
    stress = np.diag([1.0, 2.0, 3.0]) * 1e-3
    path = tmp_path / "sys.h5"
    write_relaxation(path, frames, energies, fmaxes, parameters={}, potential={}, optimizer={}, stress=stress)
    back = read_trajectory(path)
    assert len(back) == len(frames)
    for t, (a, b) in enumerate(zip(frames, back)):
        np.testing.assert_array_equal(b.positions, a.positions)
        np.testing.assert_array_equal(b.numbers, a.numbers)
        np.testing.assert_array_equal(b.cell.array, a.cell.array)
        np.testing.assert_array_equal(b.pbc, a.pbc)
        assert b.get_potential_energy() == energies[t] and b.info["step"] == t
        np.testing.assert_array_equal(b.get_forces(apply_constraint=False), a.calc.results["forces"])
        np.testing.assert_array_equal(b.get_forces(), a.get_forces())  # constraints restored
    np.testing.assert_allclose(back[-1].get_stress(voigt=False), stress)
    last = read_trajectory(path, -1)
    assert isinstance(last, Atoms) and last.info["step"] == 3
    assert [a.info["step"] for a in read_trajectory(path, slice(1, 3))] == [1, 2]
    steps, values = read_observable(path, "max_force")
    np.testing.assert_array_equal(values, fmaxes)


def test_write_result_records_result_and_settings(tmp_path):
    frames, energies, fmaxes = _synthetic_trajectory(T=3)
    final = frames[-1].copy()
    final.calc = SinglePointCalculator(final, energy=energies[-1], forces=frames[-1].calc.results["forces"])
    result = RelaxResult(name="sys", atoms=final, energy=energies[-1], initial_energy=energies[0], fmax=fmaxes[-1],
                         steps=2, converged=False, status="unconverged", reason="not converged within 2 steps",
                         energies=energies, fmaxes=fmaxes, trajectory=frames)
    path = write_result(tmp_path / "sys.h5", result, potential=dict(name="lj", sigma=3.4), optimizer="lbfgs",
                        metadata=dict(fmax=0.05, source="in/sys.xyz"))
    p = read_parameters(path)
    assert p["status"] == "unconverged" and p["converged"] is False and p["steps"] == 2
    assert p["reason"] == "not converged within 2 steps" and p["source"] == "in/sys.xyz" and p["fmax"] == 0.05
    assert p["final_energy"] == energies[-1] and p["initial_energy"] == energies[0] and p["n_atoms"] == 5
    assert p["version"] == kups_relax.__version__
    assert p["potential"] == dict(name="lj", sigma=3.4)
    assert p["optimizer"]["name"] == "lbfgs" and p["optimizer"]["max_step"] == 0.2
    assert p["optimizer"]["memory_size"] == 100 and p["optimizer"]["alpha"] == 70.0
    with pytest.raises(ValueError, match="'sys': no trajectory"):
        write_result(tmp_path / "none.h5", RelaxResult(name="sys", atoms=final, energy=0.0, initial_energy=0.0,
                                                       fmax=0.0, steps=0, converged=False, status="invalid"))
    assert not (tmp_path / "none.h5").exists()


# --- configuration --------------------------------------------------------------------------------

def _settings(argv):
    return cli.resolve_settings(cli.build_parser().parse_args(argv))


def test_defaults_and_shipped_configs():
    defaults = _settings(["x.xyz"])
    assert defaults["potential"] == "emt" and defaults["optimizer"] == "lbfgs"
    assert defaults["fmax"] == 0.05 and defaults["max_steps"] == kups_relax.DEFAULT_MAX_STEPS
    default_file = _settings(["x.xyz", "--config", str(REPO / "configs" / "default.yaml")])
    # default.yaml spells out the defaults (maxstep 0.2 is LBFGS's own default)
    assert {k: v for k, v in default_file.items() if k != "maxstep"} == {k: v for k, v in defaults.items()
                                                                        if k != "maxstep"}
    assert default_file["maxstep"] == 0.2 and defaults["maxstep"] is None
    tight = _settings(["x.xyz", "--config", str(REPO / "configs" / "tight.yaml")])
    fast = _settings(["x.xyz", "--config", str(REPO / "configs" / "fast.yaml")])
    assert tight["fmax"] < defaults["fmax"] < fast["fmax"]
    assert fast["dtype"] == "float32" and fast["max_steps"] < defaults["max_steps"]


def test_flags_override_config_and_params_merge(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fmax: 0.5\nmax-steps: 7\npotential: lj\npotential_params: {sigma: 3.4, epsilon: 0.0104}\n"
                   "plot: true\n")
    s = _settings(["x.xyz", "--config", str(cfg), "--fmax", "0.02", "--potential-params", "epsilon=0.02,rc=8.5",
                   "--no-plot", "--steps", "9"])
    assert s["fmax"] == 0.02 and s["max_steps"] == 9 and s["potential"] == "lj" and s["plot"] is False
    assert s["potential_params"] == dict(sigma=3.4, epsilon=0.02, rc=8.5)
    s = _settings(["x.xyz", "--config", str(cfg)])
    assert s["fmax"] == 0.5 and s["max_steps"] == 7 and s["plot"] is True


@pytest.mark.parametrize("text, message", [
    ("fmax: 0.1\nfmaxx: 0.2\n", "unknown key 'fmaxx'"),
    ("fmax: fast\n", "fmax: could not convert"),
    ("fmax: -1\n", "fmax: must be > 0"),
    ("max_steps: 1.5\n", "max_steps: expected an integer"),
    ("dtype: float16\n", "dtype: must be one of float64, float32"),
    ("resume: 1\n", "resume: expected true or false"),
    ("- fmax\n", "expected a mapping"),
    ("fmax: [\n", "not valid YAML"),
])
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(cli.UsageError, match=message.replace("[", r"\[")):
        _settings(["x.xyz", "--config", str(cfg)])


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(cli.UsageError, match="exclude each other"):
        _settings(["x.xyz", "--resume", "--overwrite"])
    with pytest.raises(cli.UsageError, match="--potential-params: expected KEY=VALUE"):
        _settings(["x.xyz", "--potential-params", "sigma"])
    assert cli.main(["x.xyz", "--potential", "nope"]) == 2
    assert "unknown potential 'nope'" in capsys.readouterr().err
    assert cli.main(["x.xyz", "--potential", "lj", "--potential-params", "sigma=3.4,foo=1"]) == 2
    assert "potential 'lj': " in (err := capsys.readouterr().err) and "'foo'" in err
    assert cli.main(["x.xyz", "--optimizer", "bfgs2"]) == 2
    assert "unknown optimizer 'bfgs2'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors also exit with 2
        cli.main(["x.xyz", "--fmax"])
    assert exit_info.value.code == 2


def test_summary_table_lists_problems_first_when_cut():
    rows = [dict(name=f"s{i}", atoms=3, status="converged", steps=5, final_energy=-1.0, final_fmax=0.01)
            for i in range(50)] + [dict(name="bad", status="unreadable", reason="cannot read file")]
    text = summary_table(rows, limit=10)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "atoms", "status"]
    assert lines[2].startswith("bad") and "cannot read file" in lines[2]
    assert "41 more rows in summary.csv" in text and text.endswith("51 systems: 50 converged, 1 unreadable")


def test_progress_follows_the_engine_chunk_records(caplog):
    import io
    import logging
    import time

    from kups_relax.report import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    engine = logging.getLogger("kups_relax.scheduler")
    stream = Terminal()
    with Progress(4, chunk_steps=10, stream=stream) as progress:
        assert "0/4 systems relaxed, compiling" in stream.getvalue()
        engine.debug("chunk %d: %d systems running", 1, 3)
        time.sleep(0.12)
        engine.debug("chunk %d: %d systems running", 2, 1)
        assert progress.done == 3 and progress.rate() > 0
    text = stream.getvalue()
    assert "\r\033[K[##################......] 3/4 systems relaxed" in text
    assert text.endswith("\n") and "4/4 systems relaxed" in text.splitlines()[-1]
    assert engine.level == logging.NOTSET and progress not in engine.handlers  # left as found

    with caplog.at_level(logging.INFO, logger="kups_relax.cli"):
        with Progress(2, chunk_steps=10, stream=io.StringIO(), interval=0.0):
            engine.debug("chunk %d: %d systems running", 1, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "kups_relax.cli"]
    assert lines[-2].startswith("progress: 1/2 systems relaxed") and lines[-1].startswith("progress: 2/2")

    silent = Terminal()
    with Progress(2, chunk_steps=10, stream=silent, enabled=False):
        engine.debug("chunk %d: %d systems running", 1, 0)
    assert silent.getvalue() == ""
