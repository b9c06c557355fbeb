"""The scheduler's waiting room on the host: a first-come-first-served queue per slot size.

Only ``.atoms`` (its length) and ``.index`` (reading order) of a job are read, so the jobs here
are plain namespaces; no JAX program is compiled.
"""

from __future__ import annotations

import types

from ase import Atoms

from kups_relax.layout import slot_size
from kups_relax.scheduler import WaitingRoom


def job(index: int, n_atoms: int):
    return types.SimpleNamespace(index=index, atoms=Atoms(numbers=[29] * n_atoms), name=f"job-{index}")


def room_with(*sizes: int) -> tuple[WaitingRoom, list]:
    """A room holding jobs of these atom counts, appended in reading order (index = position)."""
    room = WaitingRoom()
    jobs = [job(i, n) for i, n in enumerate(sizes)]
    for j in jobs:
        room.append(j)
    return room, jobs


def test_empty_room():
    room = WaitingRoom()
    assert len(room) == 0 and not room
    assert room.sizes() == []
    assert room.pop_exact(8) is None
    assert room.pop_fitting(10_000) is None


def test_len_bool_and_sizes_follow_appends_and_pops():
    room, jobs = room_with(5, 30, 7, 100)
    assert len(room) == 4 and room
    assert sorted(room.sizes()) == [5, 7, 30, 100]
    room.pop_exact(slot_size(30))
    assert len(room) == 3 and sorted(room.sizes()) == [5, 7, 100]
    for _ in range(3):
        assert room.pop_fitting(10_000) is not None
    assert len(room) == 0 and not room
    # queues emptied by pops leave the room falsy
    assert room.pop_fitting(10_000) is None


def test_jobs_queue_by_slot_size():
    room, jobs = room_with(3, 8, 9, 12, 13, 17)
    # 3 and 8 atoms take 8-row slots; 9, 12 and 13 atoms 16-row slots; 17 atoms a 24-row slot
    assert [j.index for j in (room.pop_exact(8), room.pop_exact(8))] == [0, 1]
    assert room.pop_exact(8) is None
    assert [room.pop_exact(16).index for _ in range(3)] == [2, 3, 4]
    assert room.pop_exact(16) is None
    assert room.pop_exact(24).index == 5
    assert not room


def test_pop_exact_is_first_come_first_served_within_a_size():
    room, jobs = room_with(10, 50, 11, 12, 60, 9)
    popped = [room.pop_exact(16) for _ in range(4)]
    assert [j.index for j in popped if j] == [0, 2, 3, 5]
    assert popped[-1] is not None and room.pop_exact(16) is None
    assert [room.pop_exact(64).index for _ in range(2)] == [1, 4]


def test_pop_exact_never_returns_another_size():
    room, _ = room_with(100, 100)
    assert room.pop_exact(8) is None  # smaller slot
    assert room.pop_exact(256) is None  # larger slot: pop_exact wants this exact size
    assert len(room) == 2


def test_pop_fitting_takes_the_earliest_structure_that_fits():
    room, jobs = room_with(200, 20, 5, 100, 6)
    # a 32-row slot holds the 20-, 5- and 6-atom structures; the earliest of them is index 1
    assert room.pop_fitting(32).index == 1
    assert room.pop_fitting(32).index == 2
    assert room.pop_fitting(32).index == 4
    assert room.pop_fitting(32) is None  # 200 and 100 atoms do not fit
    assert room.pop_fitting(128).index == 3
    assert room.pop_fitting(256).index == 0
    assert not room


def test_pop_fitting_prefers_reading_order_over_a_snug_fit():
    room, _ = room_with(7, 120)  # the 8-row structure came first
    assert room.pop_fitting(128).index == 0
    assert room.pop_fitting(128).index == 1


def test_pop_fitting_bound_is_inclusive_and_in_slot_rows():
    room, _ = room_with(13)  # 13 atoms need a 16-row slot
    assert room.pop_fitting(15) is None
    assert room.pop_fitting(16).index == 0


def test_pop_fitting_sees_later_arrivals_in_order():
    room, _ = room_with(40, 4)
    assert room.pop_fitting(8).index == 1
    room.append(job(2, 3))
    room.append(job(3, 30))
    assert room.pop_fitting(64).index == 0  # 40 atoms, read first
    assert room.pop_fitting(64).index == 2
    assert room.pop_fitting(64).index == 3
