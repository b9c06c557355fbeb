"""Every local device: one slot-batch stream per device, fed from one queue (issue 15, item 1).

This process has one CPU device, so the runs on two devices happen in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (JAX reads it when it starts). There, the
same structures are relaxed on one device and on two: every structure ends exactly once, ``relax``
keeps input order, ``relax_iter`` yields every index once, and every result is bit-identical.

Why bit-identical, not merely close: a system's path is bit-identical whenever it runs in a batch
of the same shapes (DESIGN, "Systems are independent"), and the run below makes every batch of
both runs one shape on purpose:

* 40 Lennard-Jones clusters of 8 atoms (one slot size) and ``atoms_per_batch=128``: the
  1-device batch plans 16 slots of 8 rows from the whole list, and each device's batch plans
  from its half (20 of each size), which the budget also cuts to 16 slots: the same layout;
* a batch of 128 rows is never compacted (a quarter of it is below ``MIN_COMPACTED_ROWS``);
* every atom of an 8-atom cluster (a 2x2x2 grid, 3.9 Å apart) sees all 7 others within
  cutoff + skin (9 Å), so every batch's neighbor matrix has the same width from the first build
  on and never overflows.

Shapes that differ (another slot plan, a compaction, a grown neighbor list) run other XLA
programs, which round differently in the last bit; that holds on one device as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from kups_relax import relax_iter
from kups_relax.engine import resolve_devices

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import json, logging, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
import kups_relax
from kups_relax import relax, relax_iter
from potentials import LennardJones
from structures import LJ_PARAMS, random_cluster

kups_relax.enable_compilation_cache(sys.argv[2])
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("kups_relax").addHandler(handler)
logging.getLogger("kups_relax").setLevel(logging.INFO)

potential = LennardJones(**LJ_PARAMS)
structures = [random_cluster(8, seed=100 + i) for i in range(40)]
names = [f"cluster-{i}" for i in range(40)]
options = dict(fmax=0.01, max_steps=300, atoms_per_batch=128)

def fingerprint(r):
    return dict(name=r.name, status=r.status, steps=r.steps, energy=r.energy.hex(), fmax=r.fmax.hex(),
                positions=r.atoms.positions.tobytes().hex(), forces=r.atoms.get_forces().tobytes().hex(),
                energies=r.energies.tobytes().hex())

out = {"devices": [str(d) for d in jax.devices()]}
one = relax(structures, potential, names=names, devices=1, **options)
out["one"] = [fingerprint(r) for r in one]
messages.clear()
two = relax(structures, potential, names=names, devices=None, **options)
out["two"] = [fingerprint(r) for r in two]
out["two_log"] = [m for m in messages if "devices" in m]
alone = relax(structures, potential, names=names, devices=[jax.devices()[1]], **options)
out["second_alone"] = [fingerprint(r) for r in alone]
seen = []
for index, result in relax_iter(zip(names, structures), potential, devices=2, **options):
    seen.append([index, fingerprint(result)])
out["iter"] = seen

def failing():
    yield from zip(names[:3], structures[:3])
    raise RuntimeError("input failed on purpose")
try:
    list(relax_iter(failing(), potential, devices=2, **options))
    out["error"] = None
except RuntimeError as err:
    out["error"] = str(err)
try:
    relax(structures[:1], potential, devices=3)
    out["too_many"] = None
except ValueError as err:
    out["too_many"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    """What the script printed, run on two forced CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cache = tmp_path_factory.mktemp("cache")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS), str(cache)], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_subprocess_has_two_devices(two_devices):
    assert two_devices["devices"] == ["cpu:0", "cpu:1"]


def test_relax_keeps_input_order_and_every_structure_once(two_devices):
    names = [r["name"] for r in two_devices["two"]]
    assert names == [f"cluster-{i}" for i in range(40)]
    assert not [r for r in two_devices["two"] if r["status"] == "invalid"]


def test_both_devices_took_structures(two_devices):
    """The run's summary names each device with how many structures it finished: both took some."""
    summary = [m for m in two_devices["two_log"] if m.startswith("relaxed 40 structures")]
    assert len(summary) == 1, two_devices["two_log"]
    counts = [int(part.split(": ")[1]) for part in summary[0].split("(")[1].split(")")[0].split(", ")]
    assert len(counts) == 2 and sum(counts) == 40 and min(counts) > 0, summary


def test_two_devices_bit_identical_to_one(two_devices):
    """Same batch shapes on every device (module docstring), so every bit of every result matches."""
    for one, two in zip(two_devices["one"], two_devices["two"], strict=True):
        assert one == two, one["name"]


def test_second_device_alone_bit_identical(two_devices):
    """One device that is not JAX's default runs in a thread of its own, with the same results."""
    assert two_devices["second_alone"] == two_devices["one"]


def test_relax_iter_yields_every_index_once_with_the_same_results(two_devices):
    seen = two_devices["iter"]
    assert sorted(index for index, _ in seen) == list(range(40))
    for index, result in seen:
        assert result == two_devices["one"][index], result["name"]


def test_error_in_a_device_thread_reaches_the_caller(two_devices):
    """The input is read in the devices' threads: its error is raised in the caller's, which does not hang."""
    assert two_devices["error"] == "input failed on purpose"


def test_too_many_devices_is_a_clear_error(two_devices):
    assert "devices=3" in two_devices["too_many"] and "2 local cpu device" in two_devices["too_many"]


# ---- choosing devices (this process: one CPU device, nothing compiled)

def test_resolve_devices_default_is_every_local_device():
    assert resolve_devices() == jax.local_devices()
    assert resolve_devices(1) == jax.local_devices()[:1]
    assert resolve_devices(jax.devices()[0]) == [jax.devices()[0]]
    assert resolve_devices(jax.devices()) == jax.devices()


@pytest.mark.parametrize("devices, error, match", [
    (0, ValueError, "devices=0"),
    (len(jax.local_devices()) + 1, ValueError, "local cpu device"),
    ([], ValueError, "empty"),
    ("cpu", TypeError, "devices must be"),
    (True, TypeError, "devices must be"),
    ([object()], TypeError, "JAX devices"),
    (jax.devices() * 2, ValueError, "more than once"),
])
def test_resolve_devices_rejects(devices, error, match):
    with pytest.raises(error, match=match):
        resolve_devices(devices)


def test_relax_iter_checks_devices_before_reading():
    with pytest.raises(ValueError, match="devices=5"):
        next(relax_iter(iter([]), potential=None, devices=5))
