"""Campaign-scale input and output (issue 15, item 4): lazy reading, file lists, the streaming
sink of summary rows, shard trajectories, and relax-batch with --from-list, --trajectories
per-shard/none and --resume on shards.

The host-side tests compile nothing; the relax-batch runs share one module-scoped pair of
subprocess runs on a handful of small Lennard-Jones clusters.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron
from ase.io import read, write

from kups_relax import cli
from kups_relax.h5md import ShardWriter, read_observable, read_parameters, read_trajectory, system_names
from kups_relax.io import iter_structures, read_path_list, read_structures
from kups_relax.outputs import CampaignOutputs, TrajectoryWriter, shard_index
from kups_relax.report import SummaryTally
from kups_relax.results import Trajectory
from structures import random_cluster

SCRIPT = shutil.which("relax-batch") or str(Path(sys.executable).parent / "relax-batch")
LJ_FLAGS = ["--potential", "lj", "--potential-params", "sigma=3.4,epsilon=0.0104,rc=8.5", "--fmax", "0.01"]


# --- lazy reading ---------------------------------------------------------------------------------

def test_iter_structures_reads_one_file_at_a_time_and_a_bad_one_stops_nothing(tmp_path):
    write(tmp_path / "a.xyz", random_cluster(4, seed=1))
    (tmp_path / "bad.xyz").write_text("3\nnot a frame\nAr 0 0\n")
    write(tmp_path / "c.xyz", random_cluster(5, seed=2))
    asked = []

    def paths():
        for name in ("a.xyz", "bad.xyz", "c.xyz"):
            asked.append(name)
            yield tmp_path / name

    stream = iter_structures(paths())
    first = next(stream)
    assert first.name == "a" and first.ok and asked == ["a.xyz"]  # nothing read ahead
    second = next(stream)
    assert second.name == "bad" and second.status == "unreadable" and asked == ["a.xyz", "bad.xyz"]
    third = next(stream)
    assert third.name == "c" and third.ok and len(third.atoms) == 5
    assert next(stream, None) is None


def test_multi_frame_file_is_read_frame_by_frame(tmp_path, monkeypatch):
    frames = [random_cluster(3 + k, seed=k) for k in range(5)]
    write(tmp_path / "many.extxyz", frames)
    import ase.io

    pulled = []
    real_iread = ase.io.iread

    def counting_iread(*args, **kwargs):
        for atoms in real_iread(*args, **kwargs):
            pulled.append(len(atoms))
            yield atoms

    monkeypatch.setattr(ase.io, "iread", counting_iread)
    stream = iter_structures([tmp_path / "many.extxyz"])
    first = next(stream)
    assert first.name == "many-0" and first.source.endswith("many.extxyz@0")
    assert len(pulled) == 2  # the first frame, and one ahead to know the file holds several
    assert [it.name for it in stream] == [f"many-{k}" for k in range(1, 5)]
    assert pulled == [3, 4, 5, 6, 7]


def test_a_frame_that_fails_keeps_the_frames_before(tmp_path):
    good = random_cluster(3, seed=1)
    write(tmp_path / "f.xyz", [good, good])
    with open(tmp_path / "f.xyz", "a") as f:
        f.write("3\nbroken\nAr 0 0\n")
    items = read_structures([tmp_path / "f.xyz"])
    assert [(it.name, it.status) for it in items] == [("f-0", ""), ("f-1", ""), ("f-2", "unreadable")]
    assert items[2].source.endswith("f.xyz@2") and "Frame has 1 atoms" in items[2].reason


def test_duplicates_in_a_stream_are_marked_as_they_come(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write(tmp_path / "x" / "s.xyz", random_cluster(3, seed=1))
    write(tmp_path / "y" / "s.xyz", random_cluster(3, seed=2))
    stream = iter_structures([tmp_path / "x" / "s.xyz", tmp_path / "y" / "s.xyz", tmp_path / "x" / "s.xyz"])
    first, second, third = list(stream)
    assert first.ok and second.status == third.status == "invalid"
    assert "duplicate system name 's'" in second.reason and str(tmp_path / "x" / "s.xyz") in second.reason


def test_read_path_list_skips_comments_and_resolves_against_the_list_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "paths.txt"
    listing.write_text("# inputs\n\n  ../in/a.xyz  \n/abs/b.cif\n# done\nc.xyz\n")
    assert list(read_path_list(listing)) == [tmp_path / "lists" / "../in/a.xyz", Path("/abs/b.cif"),
                                             tmp_path / "lists" / "c.xyz"]


# --- the sink of rows -------------------------------------------------------------------------------

def _relaxed(seed: int, energy: float):
    a = Icosahedron("Cu", 2)
    a.rattle(0.01, seed=seed)
    a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((len(a), 3)))
    return a


def _row(name, status="converged", **extra):
    return dict(name=name, source=f"in/{name}.xyz", atoms=13, converged=status == "converged", steps=3,
                final_energy=-1.0, final_fmax=0.01, status=status, **extra)


def test_campaign_outputs_stream_rows_to_temporaries_and_sort_them_on_close(tmp_path):
    out = tmp_path / "out"
    sink = CampaignOutputs(out, plot=False, flush_seconds=0.0)
    for position in (2, 0, 3):  # completion order
        sink.add(_row(f"s{position}"), _relaxed(position, -position), np.array([1.0, 0.1]), order=position)
    sink.add(dict(name="s1", source="in/s1.xyz", status="unreadable", reason="no such file"), order=1)
    # rows are on disk as they arrive, under temporary names; nothing under the final names yet
    temporaries = sorted(p.name for p in out.iterdir())
    assert all(name.startswith(".") for name in temporaries) and len(temporaries) == 2
    journal = next(p for p in out.iterdir() if p.name.startswith(".summary.csv"))
    assert journal.read_text().count("\n") == 5  # header + 4 rows, flushed
    sink.close()
    assert sorted(p.name for p in out.iterdir()) == ["relaxed.extxyz", "summary.csv"]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["s0", "s1", "s2", "s3"]  # input order
    assert rows[1]["status"] == "unreadable" and rows[0]["source"] == "in/s0.xyz"
    frames = read(out / "relaxed.extxyz", index=":")
    assert [f.info["name"] for f in frames] == ["s0", "s2", "s3"]
    assert [f.get_potential_energy() for f in frames] == [0.0, -2.0, -3.0]
    assert not sink.all_converged


def test_campaign_outputs_without_order_keep_arrival_order_and_an_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with CampaignOutputs(out) as sink:
        for name in ("b", "a", "c"):
            sink.add(_row(name), _relaxed(1, -1.0))
    with open(out / "summary.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["b", "a", "c"]
    assert sink.all_converged

    before = (out / "summary.csv").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with CampaignOutputs(out) as sink:
            sink.add(_row("z"), _relaxed(1, -1.0))
            raise KeyboardInterrupt
    assert (out / "summary.csv").read_bytes() == before  # the earlier run's file, untouched
    assert sorted(p.name for p in out.iterdir()) == ["relaxed.extxyz", "summary.csv"]  # no temporaries


def test_summary_tally_of_many_rows_shows_counts_and_the_problems_only():
    tally = SummaryTally(limit=5)
    for i in range(100_000):
        status = "unconverged" if i % 10_000 == 7 else "converged"
        tally.add(_row(f"s{i}", status, reason="not converged within 3 steps" if status != "converged" else ""))
    text = tally.table()
    lines = text.splitlines()
    assert len(lines) == 2 + 5 + 2  # header, rule, 5 rows, "... more", counts
    assert [line.split()[0] for line in lines[2:4]] == ["s7", "s10007"]  # problems first, in order
    assert "99995 more rows in summary.csv" in text
    assert text.endswith("100000 systems: 99990 converged, 10 unconverged")
    assert len(tally._converged) <= 5 and len(tally._problems) <= 5  # memory does not grow with the rows


# --- shards ---------------------------------------------------------------------------------------

def _result(name: str, n: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    atoms = random_cluster(n, seed=seed)
    positions = atoms.positions + rng.normal(scale=0.01, size=(steps + 1, n, 3))
    forces = rng.normal(size=(steps + 1, n, 3))
    energies = -np.arange(steps + 1, dtype=float) - seed
    fmaxes = np.linspace(1.0, 0.01, steps + 1)
    final = atoms.copy()
    final.positions = positions[-1]
    final.calc = SinglePointCalculator(final, energy=energies[-1], forces=forces[-1])
    return SimpleNamespace(name=name, atoms=final, energy=energies[-1], initial_energy=energies[0], fmax=fmaxes[-1],
                           steps=steps, converged=True, status="converged", reason="", energies=energies,
                           fmaxes=fmaxes, trajectory=Trajectory(atoms, positions, forces, energies))


def test_trajectory_writer_per_shard_fills_shards_and_each_system_reads_back(tmp_path):
    results = [_result(f"sys-{k}", 3 + k, 2 + k, seed=k) for k in range(5)]
    with TrajectoryWriter(tmp_path, "per-shard", potential=dict(name="lj", sigma=3.4),
                          optimizer=dict(name="lbfgs"), metadata=dict(fmax=0.01), shard_size=2) as writer:
        for r in results:
            writer.write(r, source=f"in/{r.name}.xyz")
            if r.name == "sys-3":  # two full shards are in place; the third is not begun
                assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
                    ["shard-000001.h5", "shard-000002.h5"]
    assert [p.name for p in writer.shards] == ["shard-000001.h5", "shard-000002.h5", "shard-000003.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in writer.shards]  # no temporaries
    assert system_names(tmp_path / "shard-000001.h5") == ["sys-0", "sys-1"]
    index = shard_index(tmp_path)
    assert {name: path.name for name, path in index.items()} == {
        "sys-0": "shard-000001.h5", "sys-1": "shard-000001.h5", "sys-2": "shard-000002.h5",
        "sys-3": "shard-000002.h5", "sys-4": "shard-000003.h5"}
    for r in results:
        path = index[r.name]
        frames = read_trajectory(path, system=r.name)
        assert len(frames) == r.steps + 1
        np.testing.assert_array_equal(np.stack([f.positions for f in frames]), r.trajectory.positions)
        np.testing.assert_array_equal(frames[-1].get_forces(), r.trajectory.forces[-1])
        assert read_trajectory(path, -1, system=r.name).get_potential_energy() == r.energy
        np.testing.assert_array_equal(read_observable(path, "max_force", system=r.name)[1], r.fmaxes)
        p = read_parameters(path, system=r.name)
        assert p["name"] == r.name and p["source"] == f"in/{r.name}.xyz" and p["steps"] == r.steps
        assert p["potential"] == dict(name="lj", sigma=3.4) and p["optimizer"] == dict(name="lbfgs")
    with h5py.File(tmp_path / "shard-000002.h5", "r") as f:  # plain h5py: one particles group per system
        assert f.attrs["layout"] == "shard" and sorted(f["particles"]) == ["sys-2", "sys-3"]
        assert f["particles/sys-3/position/value"].shape == (6, 6, 3)
    with pytest.raises(ValueError, match="holds 2 systems"):
        read_trajectory(tmp_path / "shard-000001.h5")
    with pytest.raises(KeyError, match="no system 'sys-9'"):
        read_trajectory(tmp_path / "shard-000001.h5", system="sys-9")
    # a second writer numbers its shards after the ones there
    again = TrajectoryWriter(tmp_path, "per-shard", potential={}, optimizer={}, shard_size=10)
    again.write(results[0], source="x")
    again.close()
    assert again.shards == [tmp_path / "shard-000004.h5"]


def test_per_system_files_still_read_with_a_system_name(tmp_path):
    results = [_result("only", 4, 3, seed=1)]
    writer = TrajectoryWriter(tmp_path, "per-system", potential={}, optimizer={})
    writer.write(results[0], source="in/only.xyz")
    assert system_names(tmp_path / "only.h5") == ["only"]
    assert len(read_trajectory(tmp_path / "only.h5", system="only")) == 4
    with pytest.raises(KeyError):
        read_trajectory(tmp_path / "only.h5", system="other")
    with ShardWriter(tmp_path / "one.h5") as shard:  # a shard of one system reads without a name
        shard.add("solo", results[0].trajectory, results[0].energies, results[0].fmaxes, parameters={},
                  potential={}, optimizer={})
    assert len(read_trajectory(tmp_path / "one.h5")) == 4


# --- relax-batch ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """Seven LJ clusters named in a list file (with a bad path), relaxed with per-shard trajectories."""
    root = tmp_path_factory.mktemp("campaign")
    (root / "in").mkdir()
    for k, n in enumerate([4, 5, 6, 7, 4, 5, 6]):
        write(root / "in" / f"c{k}.xyz", random_cluster(n, seed=200 + k))
    (root / "lists").mkdir()
    (root / "lists" / "paths.txt").write_text(
        "# the campaign\n" + "".join(f"../in/c{k}.xyz\n" for k in range(1, 7)) + "\n../in/missing.xyz\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")))
    proc = subprocess.run([SCRIPT, "in/c0.xyz", "--from-list", "lists/paths.txt", "--out", "shards",
                           "--trajectories", "per-shard", "--shard-size", "3", *LJ_FLAGS],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(root=root, env=env, proc=proc, out=root / "shards")


def _summary(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_from_list_and_per_shard_outputs(campaign):
    proc, out = campaign.proc, campaign.out
    assert proc.returncode == 1, proc.stderr  # the missing file's row
    assert "missing.xyz: no such file" in proc.stderr
    rows = _summary(out / "summary.csv")
    assert [r["name"] for r in rows] == [f"c{k}" for k in range(7)] + ["missing"]  # input order
    assert rows[-1]["status"] == "unreadable" and rows[-1]["source"] == str(Path("lists") / "../in/missing.xyz")
    assert all(r["status"] == "converged" for r in rows[:-1])
    assert sorted(p.name for p in out.iterdir()) == ["relaxed.extxyz", "shard-000001.h5", "shard-000002.h5",
                                                     "shard-000003.h5", "summary.csv"]
    index = shard_index(out)
    assert sorted(index) == [f"c{k}" for k in range(7)]
    relaxed = {a.info["name"]: a for a in read(out / "relaxed.extxyz", index=":")}
    for row in rows[:-1]:
        last = read_trajectory(index[row["name"]], -1, system=row["name"])
        # relaxed.extxyz holds 8 decimals
        np.testing.assert_allclose(last.positions, relaxed[row["name"]].positions, rtol=0, atol=1e-7)
        assert last.get_potential_energy() == pytest.approx(float(row["final_energy"]), abs=1e-12)
        assert read_parameters(index[row["name"]], system=row["name"])["steps"] == int(row["steps"])


def test_resume_from_shards_relaxes_only_the_systems_of_a_lost_shard(campaign):
    out = campaign.root / "resumed"
    shutil.copytree(campaign.out, out)
    lost = out / "shard-000002.h5"
    lost_names = system_names(lost)
    lost.unlink()
    (out / "summary.csv").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    proc = subprocess.run([SCRIPT, "in/c0.xyz", "--from-list", "lists/paths.txt", "--out", "resumed",
                           "--trajectories", "per-shard", "--shard-size", "3", "--resume", *LJ_FLAGS],
                          cwd=campaign.root, env=campaign.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "resume: 4 of 7 systems already complete, relaxed 3" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5") if p.name in kept} == kept
    assert sorted(system_names(out / "shard-000004.h5")) == sorted(lost_names)  # numbered after the others
    a, b = _summary(campaign.out / "summary.csv"), _summary(out / "summary.csv")
    assert [r["name"] for r in a] == [r["name"] for r in b]
    for x, y in zip(a, b):
        assert (x["status"], x["steps"]) == (y["status"], y["steps"])
        assert float(x["final_energy"] or 0) == pytest.approx(float(y["final_energy"] or 0), abs=1e-10)


def test_trajectories_none_writes_no_trajectory(campaign):
    proc = subprocess.run([SCRIPT, "in", "--out", "none", "--trajectories", "none", *LJ_FLAGS],
                          cwd=campaign.root, env=campaign.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = campaign.root / "none"
    assert sorted(p.name for p in out.iterdir()) == ["relaxed.extxyz", "summary.csv"]
    assert [r["name"] for r in _summary(out / "summary.csv")] == [f"c{k}" for k in range(7)]
    assert len(read(out / "relaxed.extxyz", index=":")) == 7


def test_resume_without_trajectories_and_outputs_without_a_flag_are_usage_errors(campaign, capsys, monkeypatch):
    monkeypatch.chdir(campaign.root)
    before = {p.name: p.stat().st_mtime_ns for p in campaign.out.iterdir()}
    assert cli.main(["in", "--out", "shards", "--trajectories", "none", "--resume", *LJ_FLAGS]) == 2
    assert "--trajectories none" in capsys.readouterr().err
    assert cli.main(["in", "--out", "shards", *LJ_FLAGS]) == 2
    assert "pass --resume to keep them" in capsys.readouterr().err
    assert cli.main(["in", "--out", "shards", "--trajectories", "per-shard", "--resume", *LJ_FLAGS[:-2],
                     "--fmax", "0.02"]) == 2
    assert "fmax: 0.01 there, 0.02 now" in capsys.readouterr().err
    assert cli.main(["--from-list", "lists/nope.txt", *LJ_FLAGS]) == 2
    assert "--from-list lists/nope.txt" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in campaign.out.iterdir()} == before


def test_resume_stops_at_an_output_whose_input_changed_and_writes_nothing_new(campaign, capsys, monkeypatch):
    """A streamed --resume finds a changed input when it reads it: exit status 2, the outputs there
    untouched, no summary written and no temporaries left."""
    root = campaign.root
    shutil.copytree(root / "in", root / "changed")
    atoms = read(root / "changed" / "c3.xyz")
    atoms.positions[0] += 0.1
    write(root / "changed" / "c3.xyz", atoms)
    out = root / "conflict"
    shutil.copytree(campaign.out, out)
    (out / "summary.csv").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.chdir(root)
    assert cli.main(["changed", "--out", "conflict", "--trajectories", "per-shard", "--resume", *LJ_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "does not match this run: c3 (input structure" in err and "changed" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
