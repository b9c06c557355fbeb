"""The slot-layout contract of :mod:`kups_relax.layout`, on the host (no JAX program is compiled).

``plan_layout`` is otherwise only exercised through whole relaxations; these tests pin down what
its docstrings promise: every size gets a slot, known lists never get more slots of a size than
they need, the budget is split in proportion to demand and filled, every slot is whole row blocks.
"""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest

from kups_relax.buckets import bucket
from kups_relax.layout import (
    BYTES_PER_ATOM_ROW,
    CPU_ATOMS_PER_BATCH,
    MIN_SLOT,
    SHARED_FRACTION,
    SlotLayout,
    atoms_budget,
    plan_layout,
    shares_batch,
    slot_size,
)
from kups_relax.segments import ROW_BLOCK


def slot_counts(layout: SlotLayout) -> dict[int, int]:
    """Slots of each size (spare zero-row slots left out)."""
    return dict(collections.Counter(s for s in layout.slot_atoms if s))


def rows_used(layout: SlotLayout) -> int:
    return sum(layout.slot_atoms)


def check_shape(layout: SlotLayout) -> None:
    """What every layout satisfies, whatever the input."""
    sizes = [s for s in layout.slot_atoms if s]
    assert sizes, "a layout has at least one slot"
    assert list(layout.slot_atoms) == sorted(layout.slot_atoms, reverse=True), "largest first, spares last"
    assert all(s % ROW_BLOCK == 0 and s >= MIN_SLOT for s in sizes), "slots are whole row blocks"
    assert layout.n_slots == bucket(len(sizes), minimum=1), "the slot count is a capacity bucket"
    assert layout.n_rows == bucket(rows_used(layout), minimum=8), "the row count is a capacity bucket"
    assert layout.n_rows >= rows_used(layout)
    starts = layout.first_atom
    assert starts.shape == (layout.n_slots,)
    assert np.all(starts % ROW_BLOCK == 0), "every slot starts on a row block"
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(layout.slot_atoms)[:-1]]))
    assert layout.largest == sizes[0]


# --- slot_size and shares_batch -----------------------------------------------------------------

@pytest.mark.parametrize("n_atoms, expected", [
    (1, 8), (8, 8), (9, 16), (12, 16), (13, 16), (16, 16), (17, 24), (24, 24), (25, 32),
    (33, 48), (100, 128), (1024, 1024), (1025, 1536),
])
def test_slot_size_examples(n_atoms, expected):
    assert slot_size(n_atoms) == expected


def test_slot_size_holds_the_structure_in_whole_row_blocks():
    for n in range(1, 5000):
        size = slot_size(n)
        assert size >= max(n, MIN_SLOT)
        assert size % ROW_BLOCK == 0
        assert size == -(-bucket(n, minimum=MIN_SLOT) // ROW_BLOCK) * ROW_BLOCK
        if n >= 13:  # 9-12 atoms: bucket 12, aligned up to 16 rows (the one exception)
            assert size - n < size / 3, f"{n} atoms waste a third or more of their {size}-row slot"


def test_slot_sizes_form_a_small_ladder():
    # a stream of 1..4096-atom structures needs few slot sizes (few compiled programs)
    assert len({slot_size(n) for n in range(1, 4097)}) <= 2 * 10


def test_shares_batch_threshold_is_the_shared_fraction_of_the_budget():
    budget = 8192
    limit = int(budget * SHARED_FRACTION)  # 1024 rows
    assert shares_batch(1, budget)
    assert shares_batch(limit, budget)  # slot 1024 == limit
    assert not shares_batch(limit + 1, budget)  # slot 1536 > limit
    for n in (1, 50, 500, 1000, 1024, 1025, 3000):
        assert shares_batch(n, budget) == (slot_size(n) <= limit)


def test_shares_batch_with_a_tiny_budget_still_shares_the_smallest_slot():
    # int(budget * SHARED_FRACTION) would be 0; the smallest slot always shares
    assert shares_batch(1, 8)
    assert shares_batch(MIN_SLOT, 1)
    assert not shares_batch(MIN_SLOT + 1, 8)


# --- plan_layout --------------------------------------------------------------------------------

def test_empty_list_is_refused():
    with pytest.raises(ValueError, match="at least one structure"):
        plan_layout([], 8192)


def test_one_structure_known_gets_one_slot():
    layout = plan_layout([5], 8192)
    check_shape(layout)
    assert layout.slot_atoms == (8,)
    assert layout.n_rows == 8


def test_one_structure_unknown_fills_the_budget():
    # a sample of the stream: the budget is filled with slots of the sizes seen
    layout = plan_layout([5], 8192, known=False)
    check_shape(layout)
    assert slot_counts(layout) == {8: 8192 // 8}
    assert rows_used(layout) == 8192


def test_known_list_that_fits_gets_every_structure_a_slot():
    sizes = [3, 7, 8, 9, 12, 30, 30, 31, 64, 100, 200, 500]
    layout = plan_layout(sizes, 8192)
    check_shape(layout)
    assert slot_counts(layout) == dict(collections.Counter(slot_size(n) for n in sizes))
    assert rows_used(layout) <= 8192


def test_known_list_over_budget_never_gets_more_slots_than_structures():
    sizes = [10] * 300 + [100] * 50 + [400] * 3  # 16 * 300 + 128 * 50 + 512 * 3 = 12,736 rows > budget
    budget = 4096
    layout = plan_layout(sizes, budget)
    check_shape(layout)
    need = collections.Counter(slot_size(n) for n in sizes)
    got = slot_counts(layout)
    assert set(got) == set(need), "every size gets a slot"
    assert all(got[s] <= need[s] for s in got)
    assert rows_used(layout) <= budget
    # filled: no size with structures left could take one more slot within the budget
    left = budget - rows_used(layout)
    assert all(s > left for s in got if got[s] < need[s])


def test_unknown_list_fills_the_budget_in_proportion_to_demand():
    # equal demand (count x slot rows) for two sizes: about half the budget each
    budget = 8192
    sizes = [8] * 64 + [64] * 8
    layout = plan_layout(sizes, budget, known=False)
    check_shape(layout)
    got = slot_counts(layout)
    assert set(got) == {8, 64}
    rows = {s: s * n for s, n in got.items()}
    assert abs(rows[8] - budget / 2) <= 64 and abs(rows[64] - budget / 2) <= 64
    assert budget - rows_used(layout) < min(got), "the leftover rows cannot hold another slot"


def test_unknown_list_shares_follow_demand_not_counts():
    budget = 8192
    # 3 x as many rows wanted by the 128-row structures as by the 16-row ones
    sizes = [10] * 24 + [100] * 9  # demand 16 * 24 = 384, 128 * 9 = 1152
    layout = plan_layout(sizes, budget, known=False)
    check_shape(layout)
    got = slot_counts(layout)
    share_small = 16 * got[16] / rows_used(layout)
    assert share_small == pytest.approx(0.25, abs=128 / budget)
    assert budget - rows_used(layout) < min(got)


def test_unknown_list_may_hold_more_slots_than_structures_seen():
    # the sizes are a sample: more structures of these sizes are expected
    layout = plan_layout([20, 20], 1024, known=False)
    assert slot_counts(layout)[24] == 1024 // 24 > 2


def test_every_size_gets_a_slot_even_with_a_small_share():
    # one 1000-atom structure among many small ones: its share is below one slot, it gets one
    budget = 8192
    sizes = [5] * 4000 + [1000]
    for known in (True, False):
        layout = plan_layout(sizes, budget, known=known)
        check_shape(layout)
        got = slot_counts(layout)
        assert got.get(1024) == 1 and got.get(8, 0) >= 1


def test_minimum_slots_may_exceed_the_budget_by_at_most_their_own_rows():
    # The at-least-one-slot rule is applied after the proportional split, so a size whose
    # share is under one slot adds its rows on top; nothing else exceeds the budget.
    budget = 8192
    sizes = [5] * 100_000 + [1000]
    layout = plan_layout(sizes, budget, known=False)
    check_shape(layout)
    got = slot_counts(layout)
    assert got[1024] == 1
    assert rows_used(layout) - 1024 <= budget
    assert 8 * got[8] <= budget


def test_structure_larger_than_the_budget_still_gets_a_slot():
    for known in (True, False):
        layout = plan_layout([2000], 1000, known=known)
        check_shape(layout)
        assert layout.slot_atoms == (2048,)
        assert layout.n_rows == 2048


def test_structure_above_the_shared_fraction_planned_on_its_own():
    # the engine gives such a structure a batch of its own; planned alone it fits one slot
    assert not shares_batch(2000, 8192)
    layout = plan_layout([2000], 8192)
    check_shape(layout)
    assert layout.slot_atoms == (2048,)


def test_same_sizes_in_any_order_give_the_same_layout():
    rng = np.random.default_rng(0)
    sizes = list(rng.integers(1, 300, size=200))
    for known in (True, False):
        first = plan_layout(sizes, 4096, known=known)
        assert plan_layout(list(rng.permutation(sizes)), 4096, known=known) == first


# --- SlotLayout.uniform -------------------------------------------------------------------------

@pytest.mark.parametrize("slot, n", [(8, 1), (64, 5), (256, 7), (1024, 8)])
def test_uniform_layout(slot, n):
    layout = SlotLayout.uniform(slot, n)
    check_shape(layout)
    assert layout.slot_atoms[:n] == (slot,) * n
    assert set(layout.slot_atoms[n:]) <= {0}
    assert layout.n_slots == bucket(n, minimum=1)
    assert layout.n_rows == bucket(slot * n, minimum=8)


# --- atoms_budget -------------------------------------------------------------------------------

def fake_device(platform: str, stats=None, raises: bool = False):
    def memory_stats():
        if raises:
            raise RuntimeError("no memory statistics on this backend")
        return stats
    return types.SimpleNamespace(platform=platform, memory_stats=memory_stats)


def test_atoms_budget_on_this_cpu():
    import jax

    if jax.devices()[0].platform == "cpu":
        assert atoms_budget() == CPU_ATOMS_PER_BATCH


def test_atoms_budget_from_device_memory():
    limit = 140 * 2**30
    assert atoms_budget(fake_device("gpu", {"bytes_limit": limit})) == int(limit * 0.5) // BYTES_PER_ATOM_ROW
    assert atoms_budget(fake_device("gpu", {"bytes_limit": limit}), fraction=0.25) \
        == int(limit * 0.25) // BYTES_PER_ATOM_ROW


def test_atoms_budget_falls_back_to_the_cpu_budget():
    assert atoms_budget(fake_device("cpu", {"bytes_limit": 2**40})) == CPU_ATOMS_PER_BATCH
    assert atoms_budget(fake_device("gpu", None)) == CPU_ATOMS_PER_BATCH
    assert atoms_budget(fake_device("gpu", {})) == CPU_ATOMS_PER_BATCH
    assert atoms_budget(fake_device("gpu", raises=True)) == CPU_ATOMS_PER_BATCH
    # a small accelerator never gets less than the CPU budget
    assert atoms_budget(fake_device("gpu", {"bytes_limit": 2**20})) == CPU_ATOMS_PER_BATCH
