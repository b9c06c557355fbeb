"""Campaigns on a Dask cluster (issue 15, items 2 and 3): a 2-worker ``LocalCluster`` on loopback.

* every structure ends exactly once in ``summary.csv`` and as one complete ``.h5``, with ASE's
  L-BFGS step count and geometry (the shards of a worker share its one relaxation stream);
* with ``--trajectories per-shard`` each task writes one shard file, and ``--resume`` keeps them;
* a worker killed (SIGKILL) while shards are in flight loses nothing and duplicates nothing, and
  the outputs finished before the kill are not rewritten;
* ``relax-batch --dask-scheduler ADDRESS --resume`` keeps every complete output of an earlier
  distributed run and relaxes only what is missing;
* an unreachable scheduler is exit status 2 with its address in the message.

One module-scoped cluster serves every test (its workers keep their engines warm between the
tests, as between shards); the structures are small Lennard-Jones clusters.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from ase.calculators.lj import LennardJones as AseLJ
from ase.io import write
from ase.optimize import LBFGS

from kups_relax import cli
from kups_relax import distributed as kd
from kups_relax.io import read_parameters, read_structures, read_trajectory
from kups_relax.outputs import CampaignOutputs
from structures import LJ_PARAMS, random_cluster

SCRIPT = shutil.which("relax-batch") or str(Path(sys.executable).parent / "relax-batch")
LJ_FLAGS = ["--potential", "lj", "--potential-params", "sigma=3.4,epsilon=0.0104,rc=8.5", "--fmax", "0.01",
            "--chunk-steps", "8"]
#: Every structure has 8 atoms and every shard 3 structures, so every shard packs into the same
#: batch shapes: the workers compile one set of programs (cold, the bulk of this module's time)
#: and load it from the compilation cache after a restart.
N_ATOMS, SHARD = 8, 3


@pytest.fixture(scope="module")
def client():
    client = kd.connect(workers=2)
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask-in")
    for k in range(24):
        write(folder / f"c{k:02d}.xyz", random_cluster(N_ATOMS, seed=300 + k))
    return folder


def settings_for(out: Path, *flags: str) -> dict:
    return cli.resolve_settings(cli.build_parser().parse_args(["unused", "--out", str(out), *LJ_FLAGS, *flags]))


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def h5_state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.h5")}


def check_complete(out: Path, items) -> list[dict]:
    """Each input exactly once in summary.csv, one complete .h5 each, no temporaries left."""
    rows = summary(out)
    names = [r["name"] for r in rows]
    assert sorted(names) == sorted(it.name for it in items), "every structure exactly once"
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(names)
    assert not [p for p in out.iterdir() if ".tmp." in p.name]
    for r in rows:
        params = read_parameters(out / f"{r['name']}.h5")
        assert params["status"] == r["status"] == "converged"
        assert int(params["steps"]) == int(r["steps"])
        frames = read_trajectory(out / f"{r['name']}.h5")
        assert len(frames) == int(r["steps"]) + 1
        assert frames[-1].get_potential_energy() == float(r["final_energy"])
    return rows


@pytest.fixture(scope="module")
def first_run(client, inputs, tmp_path_factory):
    items = read_structures([inputs])[:12]
    out = tmp_path_factory.mktemp("dask-out") / "out"
    outputs = CampaignOutputs(out, fmax=0.01)
    reports = []
    report = kd.relax_campaign(items, settings_for(out), client, outputs, shard_size=SHARD, on_report=reports.append)
    outputs.close()
    return dict(items=items, out=out, report=report, reports=reports)


def test_two_workers_every_structure_once_and_as_ase(client, first_run):
    out, items, report = first_run["out"], first_run["items"], first_run["report"]
    rows = check_complete(out, items)
    assert report.systems == 12 and report.relaxed == 12 and report.kept == 0 and report.shards == 4
    assert report.all_converged
    assert len({r.worker for r in first_run["reports"]}) == 2, "both workers took shards"
    # the workers' streams were busy for part of the campaign's wall time, and said how long
    assert 0 < report.busy_seconds <= 2 * report.wall_seconds and 0 <= report.overhead < 1
    assert "% idle" in report.describe()
    # the shards of a worker share one stream (their structures mix in its batches), so the
    # reference is ASE's LBFGS one structure at a time, as for the in-process engine
    by_name = {r["name"]: r for r in rows}
    for it in items:
        ref = it.atoms.copy()
        ref.calc = AseLJ(**LJ_PARAMS)
        opt = LBFGS(ref, logfile=None)
        opt.run(fmax=0.01, steps=1000)
        assert int(by_name[it.name]["steps"]) == opt.nsteps, it.name
        last = read_trajectory(out / f"{it.name}.h5", -1)
        # last-bit differences of the summation order, grown over ~100 steps (1.0e-8 Å seen)
        assert np.abs(last.positions - ref.positions).max() <= 1e-7, it.name
        assert abs(float(by_name[it.name]["final_energy"]) - ref.get_potential_energy()) <= 1e-9, it.name


def test_per_shard_trajectories_one_file_per_task_and_resume(client, inputs, tmp_path):
    """``--trajectories per-shard`` on Dask: each task writes one shard file of its systems; a
    rerun with ``--resume`` keeps them all and writes nothing."""
    from kups_relax.h5md import system_names
    from kups_relax.outputs import shard_paths

    items = read_structures([inputs])[:9]
    out = tmp_path / "out"
    with CampaignOutputs(out, fmax=0.01, trajectories="per-shard") as sink:
        report = kd.relax_campaign(items, settings_for(out, "--trajectories", "per-shard"), client, sink,
                                   shard_size=SHARD)
    shards = shard_paths(out)
    assert [p.name for p in shards] == ["shard-000001.h5", "shard-000002.h5", "shard-000003.h5"]
    held = [name for p in shards for name in system_names(p)]
    assert sorted(held) == sorted(it.name for it in items), "every system in exactly one shard"
    assert not list(out.glob("c*.h5")) and not [p for p in out.iterdir() if ".tmp." in p.name]
    assert report.relaxed == 9 and report.all_converged
    rows = {r["name"]: r for r in summary(out)}
    for p in shards:
        for name in system_names(p):
            frames = read_trajectory(p, system=name)
            assert len(frames) == int(rows[name]["steps"]) + 1
    state = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    with CampaignOutputs(out, fmax=0.01, trajectories="per-shard") as sink:
        again = kd.relax_campaign(items, settings_for(out, "--trajectories", "per-shard", "--resume"), client, sink,
                                  shard_size=SHARD)
    assert again.relaxed == 0 and again.kept == 9 and again.all_converged
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_paths(out)} == state


def test_killed_worker_loses_nothing_and_duplicates_nothing(client, inputs, tmp_path):
    items = read_structures([inputs])  # 24 structures: 8 tasks over 2 workers
    out = tmp_path / "out"
    pids = client.run(os.getpid)
    killed: dict = {}

    def kill_the_other_worker(report):
        if killed:
            return
        processing = client.processing()
        victim = next(w for w in sorted(pids) if w != report.worker and processing.get(w))
        os.kill(pids[victim], signal.SIGKILL)
        killed.update(worker=victim, shard=processing[victim], before=h5_state(out))

    outputs = CampaignOutputs(out, fmax=0.01)
    report = kd.relax_campaign(items, settings_for(out), client, outputs, shard_size=SHARD,
                               on_report=kill_the_other_worker)
    outputs.close()
    assert killed, "a worker was killed while it ran a shard"
    print(f"killed {killed['worker']} running {killed['shard']} with {len(killed['before'])} outputs complete; "
          f"{report.describe()}")
    check_complete(out, items)
    after = h5_state(out)
    assert all(after[name] == state for name, state in killed["before"].items()), \
        "outputs finished before the kill were not rewritten"
    assert report.systems == len(items) and report.all_converged
    # a retried shard relaxes only what its killed first attempt had not finished (the rest is
    # "kept"); tasks that returned account for every structure once
    assert report.relaxed + report.kept == len(items)
    deadline = time.monotonic() + 60  # the nanny restarts the killed worker
    while len(client.scheduler_info(n_workers=-1)["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, cwd, timeout=300, **env):
    # the test session's compilation cache: relax-batch hands its folder to the workers (WorkerSetup)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir, **env)
    return subprocess.run([SCRIPT, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_resume_across_distributed_runs(client, first_run, inputs):
    out, items = first_run["out"], first_run["items"]
    before = h5_state(out)
    removed = [f"{it.name}.h5" for it in items[3:6]]  # as if a campaign had been stopped before this shard
    for name in removed:
        (out / name).unlink()
    paths = [inputs / f"{it.name}.xyz" for it in items]
    proc = run_cli([*paths, "--out", out, *LJ_FLAGS, "--dask-scheduler", client.scheduler.address,
                    "--task-size", SHARD, "--resume"], cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    rows = check_complete(out, items)
    after = h5_state(out)
    assert {n: s for n, s in after.items() if n not in removed} == {n: s for n, s in before.items()
                                                                       if n not in removed}
    assert "3 relaxed, 9 kept" in proc.stdout, proc.stdout
    assert sorted(r["name"] for r in rows) == sorted(it.name for it in items)
    # the same command again: nothing to relax; other settings: exit 2, naming the difference
    proc = run_cli([*paths, "--out", out, *LJ_FLAGS, "--dask-scheduler", client.scheduler.address, "--resume",
                    "--max-steps", "77"], cwd=out.parent)
    assert proc.returncode == 2 and "max_steps" in proc.stderr, proc.stderr
    assert h5_state(out) == after


def test_relax_batch_workers_starts_and_closes_a_local_cluster(inputs, tmp_path):
    """``--workers 2``: a LocalCluster of this process's own, closed at the end (same shapes as the
    module's shards, so its workers load their programs from the session's compilation cache)."""
    paths = [inputs / f"c{k:02d}.xyz" for k in range(SHARD)]
    proc = run_cli([*paths, "--out", tmp_path / "out", *LJ_FLAGS, "--workers", 2, "--task-size", SHARD], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{SHARD} relaxed, 0 kept" in proc.stdout, proc.stdout
    check_complete(tmp_path / "out", read_structures(paths))


def test_unreachable_scheduler_exits_2_naming_the_address(inputs, tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    proc = run_cli([inputs / "c00.xyz", "--out", tmp_path / "out", *LJ_FLAGS, "--dask-scheduler", address],
                   cwd=tmp_path, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    assert proc.returncode == 2, proc.stderr
    assert address in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_worker_without_the_package_or_the_potential_file_is_named(client, tmp_path, monkeypatch):
    """Checked on every worker before the first shard: nothing is relaxed or written."""
    items = [it for it in read_structures([tmp_path]) if it.ok]  # none needed: the checks come first
    missing = tmp_path / "absent" / "Cu.eam.alloy"
    settings = cli.resolve_settings(cli.build_parser().parse_args(
        ["unused", "--out", str(tmp_path / "out"), "--potential", f"eam:{missing}"]))
    with pytest.raises(kd.SetupError) as err, CampaignOutputs(tmp_path / "out") as sink:
        kd.relax_campaign(items, settings, client, sink)
    assert "worker tcp://127.0.0.1:" in str(err.value) and str(missing) in str(err.value)
    # a distribution the workers do not have stands for kups-relax missing there
    monkeypatch.setattr(kd, "DISTRIBUTION", "kups-relax-not-installed-anywhere")
    with pytest.raises(kd.SetupError, match=r"worker tcp://127\.0\.0\.1:\d+ cannot import kups-relax"), \
            CampaignOutputs(tmp_path / "out") as sink:
        kd.relax_campaign(items, settings_for(tmp_path / "out"), client, sink)
    assert not [p for p in (tmp_path / "out").iterdir()], "nothing written"
