"""The data-parallel batch layout (learner/balance.py): hand-worked cases and properties over random batches."""
import math

import numpy as np
import pytest

from coreseg.common.protocol import ForwardResult
from coreseg.learner.balance import assign_rows, in_batch_order, merge_forward, rank_layouts


def test_hand_worked_two_ranks_one_micro_batch_each():
    # 4 rows, 2 ranks x 2 rows: 5 -> r0, 3 -> r1, 3 -> r1 (3 < 5), 1 -> r0 (r1 full): loads 6 and 6
    assert assign_rows([5, 3, 3, 1], 2, 2) == [[[0, 3]], [[1, 2]]]


def test_hand_worked_three_prompts_over_two_ranks():
    # 3 prompts x 2 equal completions, micro-batches of 2: ceil(6 / 4) = 2 micro-batches per rank, rows dealt
    # alternately (ties go to the lower rank), each rank's 3 rows split 2 + 1
    assert assign_rows([10] * 6, 2, 2) == [[[0, 2], [4]], [[1, 3], [5]]]


def test_hand_worked_full_rank_takes_no_more():
    # rank 1 fills up with the four 1s (capacity 2 x 2) while rank 0 holds the 100; the rest must go to rank 0
    assert assign_rows([100, 1, 1, 1, 1, 1, 1, 1], 2, 2) == [[[0, 5], [6, 7]], [[1, 2], [3, 4]]]


def test_rows_keep_batch_order_within_a_rank():
    # one rank: the batch's contiguous chunks, as a plain micro-batch loop would make them
    assert assign_rows([1, 9, 5, 5, 2], 1, 2) == [[[0, 1], [2, 3], [4]]]
    # 9 -> r0, 5 -> r1, 5 -> r1 (5 < 9), 1 -> r0: each rank's rows in batch order, one per micro-batch
    assert assign_rows([1, 9, 5, 5], 2, 1) == [[[0], [1]], [[2], [3]]]


def test_rank_without_rows_gets_a_padding_row():
    # one row, two ranks: rank 1 runs the cheapest row with loss weight 0, in as many micro-batches as rank 0
    r0, r1 = rank_layouts([7], 2, 4)
    assert (r0.rows, r0.real, r0.micro) == ((0,), (True,), ((0, 1),))
    assert (r1.rows, r1.real, r1.micro) == ((0,), (False,), ((0, 1),))


def test_padding_row_is_the_cheapest_row():
    # 2 rows over 2 ranks with micro-batches of 1 -> 1 micro-batch each, no padding; 3 ranks -> one padded
    layouts = rank_layouts([9, 4], 3, 1)
    assert [lay.rows for lay in layouts] == [(0,), (1,), (1,)]
    assert [lay.real for lay in layouts] == [(True,), (True,), (False,)]


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        rank_layouts([], 2, 2)
    with pytest.raises(ValueError, match="ranks"):
        assign_rows([1], 0, 2)
    with pytest.raises(ValueError, match=">= 0"):
        assign_rows([1, -1], 1, 2)


@pytest.mark.parametrize("seed", range(200))
def test_layout_properties(seed):
    rng = np.random.default_rng(seed)
    n, ranks, mbs = int(rng.integers(1, 40)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
    costs = [int(c) for c in rng.integers(0, 300, n)]
    plan = assign_rows(costs, ranks, mbs)
    per_rank = max(1, math.ceil(n / (ranks * mbs)))
    assert len(plan) == ranks
    assert all(len(p) == per_rank for p in plan)  # the same number of micro-batches on every rank
    assert all(len(m) <= mbs for p in plan for m in p)
    assert sorted(i for p in plan for m in p for i in m) == list(range(n))  # every row exactly once
    loads = [sum(costs[i] for m in p for i in m) for p in plan]
    counts = [sum(len(m) for m in p) for p in plan]
    for heavy in range(ranks):
        for light in range(ranks):
            # a rank lighter by more than the largest row was full when the heavier one took its last row
            if loads[light] < loads[heavy] - max(costs):
                assert counts[light] == per_rank * mbs
    if len(set(costs)) == 1:  # equal rows: row counts differ by at most 1
        assert max(counts) - min(counts) <= 1
    layouts = rank_layouts(costs, ranks, mbs)
    assert all(len(lay.micro) == per_rank and all(b > a for a, b in lay.micro) for lay in layouts)
    real = sorted(i for lay in layouts for i, keep in zip(lay.rows, lay.real) if keep)
    assert real == list(range(n))
    pad = min(range(n), key=lambda i: (costs[i], i))
    assert all(i == pad for lay in layouts for i, keep in zip(lay.rows, lay.real) if not keep)
    # the per-row results of the ranks go back to batch order, padding dropped
    assert in_batch_order(layouts, [[f"row{i}" for i in lay.rows] for lay in layouts]) == [f"row{i}" for i in range(n)]


def test_merge_forward_restores_batch_order():
    layouts = rank_layouts([3, 1, 2], 2, 1)  # 2 micro-batches per rank, one of them padded
    results = [ForwardResult([np.full(2, float(i)) for i in lay.rows], [np.full(2, -float(i)) for i in lay.rows],
                             np.array([[float(i)] for i in lay.rows]), np.array([i == 1 for i in lay.rows]))
               for lay in layouts]
    merged = merge_forward(layouts, results)
    assert [float(x[0]) for x in merged.logprobs] == [0.0, 1.0, 2.0]
    assert [float(x[0]) for x in merged.ref_logprobs] == [0.0, -1.0, -2.0]
    np.testing.assert_array_equal(merged.seg_states, [[0.0], [1.0], [2.0]])
    np.testing.assert_array_equal(merged.seg_found, [False, True, False])
    no_ref = [ForwardResult(r.logprobs, [], r.seg_states, r.seg_found) for r in results]
    assert merge_forward(layouts, no_ref).ref_logprobs == []


def test_ranks_with_different_weight_digests_stop_the_run():
    from coreseg.learner.group import RankDesyncError, _combine_ranks

    rank = {"pg_loss": 0.5, "tokens": 10.0, "grad_norm": 2.0, "lr": 1e-3}
    same = _combine_ranks([{**rank, "weights_digest": 7.0}, {**rank, "weights_digest": 7.0}])
    assert same["ranks_in_sync"] == 1.0 and same["pg_loss"] == 1.0 and same["tokens"] == 20.0
    assert "weights_digest" not in same and same["grad_norm"] == 2.0
    assert "ranks_in_sync" not in _combine_ranks([rank, rank])  # no check this step
    with pytest.raises(RankDesyncError, match=r"\[7, 8\]"):
        _combine_ranks([{**rank, "weights_digest": 7.0}, {**rank, "weights_digest": 8.0}])


def test_grouped_rows_stay_on_one_rank():
    # packed: two prompts of 3 completions; each group is one unit (cost 12 + 3 + 3 + 3 = 21 and 8 + 2 + 2 + 2 = 14)
    groups = [0, 0, 0, 1, 1, 1]
    costs = [12 / 3 + 3] * 3 + [8 / 3 + 2] * 3
    assert assign_rows(costs, 2, 3, groups) == [[[0, 1, 2]], [[3, 4, 5]]]
    # without labels the same rows are dealt one by one, splitting both prompts over the ranks
    assert assign_rows(costs, 2, 3) == [[[0, 2, 5]], [[1, 3, 4]]]


def test_group_larger_than_a_ranks_room_is_dealt_by_rows():
    # one group of 4 rows, 2 ranks x 1 micro-batch of 2: it fits no rank whole, so its rows are dealt one by one
    assert assign_rows([5, 5, 5, 5], 2, 2, [0, 0, 0, 0]) == [[[0, 2]], [[1, 3]]]


def test_packed_costs_count_the_prompt_once_per_group():
    from types import SimpleNamespace as C

    from coreseg.learner.balance import completion_costs, prompt_groups

    comps = [C(prompt_token_ids=[1] * 9, token_ids=[2] * n) for n in (3, 4, 5)] + [C(prompt_token_ids=[7] * 4, token_ids=[2])]
    samples = [C(id="a")] * 3 + [C(id="b")]
    labels = prompt_groups(samples, comps)
    assert labels == [0, 0, 0, 1]
    costs = completion_costs(comps, True, labels)
    assert sum(costs[:3]) == pytest.approx(9 + 3 + 4 + 5) and costs[3] == 5
    assert completion_costs(comps) == [12, 13, 14, 5]
    with pytest.raises(ValueError, match="group label"):
        completion_costs(comps, True)


@pytest.mark.parametrize("seed", range(50))
def test_grouped_layout_properties(seed):
    # GRPO's case: every group has G rows, and a micro-batch holds whole groups (G divides micro_batch_size)
    rng = np.random.default_rng(seed)
    G = int(rng.integers(1, 5))
    sizes = [G] * int(rng.integers(1, 8))
    groups = [g for g, k in enumerate(sizes) for _ in range(k)]
    n, ranks, mbs = len(groups), int(rng.integers(1, 4)), G * int(rng.integers(1, 3))
    costs = [float(c) for c in rng.integers(1, 300, n)]
    plan = assign_rows(costs, ranks, mbs, groups)
    per_rank = max(1, math.ceil(n / (ranks * mbs)))
    assert all(len(p) == per_rank for p in plan) and all(len(m) <= mbs for p in plan for m in p)
    assert sorted(i for p in plan for m in p for i in m) == list(range(n))
    for g, k in enumerate(sizes):
        owners = {r for r, p in enumerate(plan) for m in p for i in m if groups[i] == g}
        assert len(owners) == 1  # never split over ranks
