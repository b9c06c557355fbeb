"""Streaming through fixed slots with in-flight refill: each structure still follows ASE's path."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones as AseLJ
from ase.optimize import LBFGS

from kups_relax import relax_iter
from potentials import LennardJones
from structures import LJ_PARAMS, lj_structures

FMAX = 0.01


def assert_follows_ase(result, atoms, name):
    """``result`` took ASE's LBFGS steps to ASE's positions (1e-8 Å); returns ASE's relaxed copy."""
    ref = atoms.copy()
    ref.calc = AseLJ(**LJ_PARAMS)
    opt = LBFGS(ref, logfile=None)
    opt.run(fmax=FMAX, steps=500)
    assert result.converged and result.steps == opt.nsteps, name
    assert np.abs(result.atoms.positions - ref.positions).max() <= 1e-8, name
    return ref


@pytest.fixture(scope="module")
def small():
    return [(n, a) for n, a in lj_structures() if len(a) <= 16]


@pytest.fixture(scope="module")
def streamed(small):
    """Four slots of 16 atoms for a dozen structures and a bad one: slots are refilled in flight."""
    def generate():  # a generator: the engine never sees the whole list
        for k, (name, atoms) in enumerate(small):
            yield name, atoms
            if k == 3:
                yield "bad", Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 0]])
    out = list(relax_iter(generate(), LennardJones(**LJ_PARAMS), fmax=FMAX, max_steps=500, atoms_per_batch=64))
    return out


def test_every_structure_comes_back_once(small, streamed):
    indices = sorted(i for i, _ in streamed)
    assert indices == list(range(len(small) + 1))
    assert len(small) >= 12  # more structures than the four slots: refills happened
    bad = [r for _, r in streamed if r.name == "bad"]
    assert len(bad) == 1 and bad[0].status == "invalid" and "same place" in bad[0].reason


def test_refilled_slots_follow_ase(small, streamed):
    by_name = {r.name: r for _, r in streamed}
    for name, atoms in small:
        result = by_name[name]
        ref = assert_follows_ase(result, atoms, name)
        assert abs(result.energy - ref.get_potential_energy()) <= 1e-9, name


def test_results_arrive_as_systems_finish(streamed):
    """Quick systems are handed over before slow ones that started earlier."""
    order = [r.name for _, r in streamed]
    steps = {r.name: r.steps for _, r in streamed}
    first_four = [n for n in order if n != "bad"][:4]
    assert max(steps[n] for n in first_four) <= max(steps.values())
    assert order.index("bad") < order.index(first_four[-1])  # rejected before relaxing, not at the end


def test_feed_runs_what_is_queued_and_ends_when_closed(small):
    """A Feed filled from another thread: the stream relaxes what is queued without waiting for
    more (results arrive while the feed is still open), takes a second piece into the running
    batch, and ends only after close; every structure follows ASE's path."""
    import threading

    from kups_relax import Feed

    feed = Feed()
    first, second = small[:4], small[4:8]
    positions = [feed.put(pair) for pair in first]
    assert positions == [0, 1, 2, 3]
    stream = relax_iter(feed, LennardJones(**LJ_PARAMS), fmax=FMAX, max_steps=500, atoms_per_batch=64)
    safety = threading.Timer(120, feed.close)  # a stream that waited for close would end here, and fail below
    safety.start()
    try:
        got = [next(stream) for _ in first]
        assert not feed.closed, "the stream waited for the feed to close before handing over results"
        filler = threading.Thread(target=lambda: [feed.put(pair) for pair in second])
        filler.start()
        filler.join()
        got += [next(stream) for _ in second]
        assert not feed.closed
        feed.close()
        assert next(stream, None) is None  # closed and drained: the stream ends
    finally:
        safety.cancel()
        feed.close()
    assert sorted(i for i, _ in got) == list(range(8))
    names = [n for n, _ in first + second]
    for index, result in got:
        name, atoms = (first + second)[index]
        assert result.name == name
        assert_follows_ase(result, atoms, name)
    assert len(set(names)) == 8
    with pytest.raises(ValueError, match="closed"):
        feed.put(small[0])
