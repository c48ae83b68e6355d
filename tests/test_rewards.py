import itertools

import numpy as np
import pytest

from common.prompts import parse_completion
from reward.rewards import (MaskRewardConfig, box_iou_matrix, box_reward, dice, format_reward, giou, iou,
                            mask_reward, switch_threshold, total_reward)


def test_format_reward():
    good = "<think> a </think> <answer> The polyp is located at [[1, 2, 3, 4]]. The mask is <seg>. </answer>"
    assert format_reward(parse_completion(good)) == (1.0, "")
    assert format_reward(parse_completion("no tags")) == (0.0, "no_think_block")


def test_box_reward_hand_cases():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert box_reward(gt, gt)[0] == pytest.approx(1.0)  # perfect
    assert box_reward([[50, 50, 60, 60]], gt)[:2] == (0.0, "no_box_match")  # disjoint
    # partial overlap: [0,0,10,10] vs [0,0,10,8] -> IoU 0.8 (TP), second gt missed
    value, _, d = box_reward([[0, 0, 10, 8]], gt)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 0, 1) and value == pytest.approx(0.8 * (2 / 3))
    value, _, d = box_reward([gt[0]], gt)  # one of two lesions found: mIoU 1, F1 = 2/3
    assert value == pytest.approx(2 / 3)
    value, _, d = box_reward(gt + [[40, 40, 45, 45]], gt)  # an extra box: F1 = 4/5
    assert value == pytest.approx(0.8) and d["fp"] == 1
    assert box_reward([], [])[0] == 1.0  # empty / empty
    assert box_reward([], gt)[:2] == (0.0, "no_boxes")
    # below tau (IoU 0.25) is not a true positive
    assert box_reward([[0, 0, 10, 10]], [[5, 0, 15, 10]], 0.5)[0] == 0.0
    # boxes outside the image are clipped before IoU
    assert box_reward([[-5, -5, 10, 10]], [[0, 0, 10, 10]], image_size=(64, 64))[0] == pytest.approx(1.0)


def _brute_force(pred, gt, tau):
    iou_m = box_iou_matrix(pred, gt)
    best = None
    n, m = len(pred), len(gt)
    for perm in itertools.permutations(range(max(n, m))):
        pairs = [(i, perm[i]) for i in range(n) if perm[i] < m]
        total = sum(iou_m[i, j] for i, j in pairs)
        if best is None or total > best[0] + 1e-12:
            best = (total, pairs)
    tps = [iou_m[i, j] for i, j in best[1] if iou_m[i, j] >= tau]
    tp = len(tps)
    f1 = 2 * tp / (2 * tp + (n - tp) + (m - tp))
    return (np.mean(tps) if tp else 0.0) * f1


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n, m = rng.integers(1, 5), rng.integers(1, 5)
        gt = np.sort(rng.integers(0, 40, (m, 2, 2)), axis=1).reshape(m, 4)[:, [0, 2, 1, 3]] + [0, 0, 1, 1]
        gt = np.concatenate([gt[:, :2], gt[:, :2] + rng.integers(4, 15, (m, 2))], 1).astype(float)
        pred = gt[rng.integers(0, m, n)] + rng.normal(0, 3, (n, 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
        tau = 0.3
        assert box_reward(pred, gt, tau)[0] == pytest.approx(_brute_force(pred, gt, tau), abs=1e-9)


def test_dice_iou_against_set_arithmetic():
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.random((16, 16)) > 0.5, rng.random((16, 16)) > 0.6
        sa, sb = set(zip(*np.nonzero(a))), set(zip(*np.nonzero(b)))
        assert dice(a, b) == pytest.approx(2 * len(sa & sb) / (len(sa) + len(sb)))
        assert iou(a, b) == pytest.approx(len(sa & sb) / len(sa | sb))


def _box_mask(x1, y1, x2, y2, size=40):
    m = np.zeros((size, size), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_mask_reward_both_sides_of_delta():
    gt = _box_mask(0, 0, 10, 10)
    # separated boxes: IoU 0, hull 20x10=200, union 200 -> wait: pred [15,0,20,10] area 50; union 150, hull 200
    value, reason, d = mask_reward(_box_mask(15, 0, 20, 10), gt)
    assert d == 0 and value == pytest.approx(0 - (200 - 150) / 200) and reason == ""
    # touching boxes: [10,0,20,10]: union 200 = hull -> GIoU 0
    assert mask_reward(_box_mask(10, 0, 20, 10), gt)[0] == pytest.approx(0.0)
    # nested, Dice below delta: pred 1 px inside a 10x10 gt -> Dice 2/101 < 0.05; GIoU = IoU = 1/100
    value, _, d = mask_reward(_box_mask(4, 4, 5, 5), gt)
    assert d == pytest.approx(2 / 101) and value == pytest.approx(1 / 100)
    # above delta: 1 + 2 * Dice; pred 10x5 inside gt -> Dice = 100/150
    value, _, d = mask_reward(_box_mask(0, 0, 10, 5), gt)
    assert value == pytest.approx(1 + 2 * (100 / 150))
    # empty prediction -> coarse minimum with a reason
    assert mask_reward(np.zeros_like(gt), gt)[:2] == (-1.0, "empty_mask")


def test_density_aware_threshold():
    cfg = MaskRewardConfig(dice_threshold=0.05, density_aware=True, density_ref_fraction=0.05,
                           density_max_threshold=0.3)
    large = _box_mask(0, 0, 20, 20, 40)  # fraction 0.25 >= ref -> delta unchanged
    small = _box_mask(0, 0, 4, 2, 40)  # fraction 8/1600 = 0.005 -> 0.05 * sqrt(10)
    assert switch_threshold(large, cfg) == 0.05
    assert switch_threshold(small, cfg) == pytest.approx(0.05 * np.sqrt(10))
    # a prediction with Dice 0.1 on the small lesion stays on the box branch only when density-aware
    pred = _box_mask(0, 0, 4, 2, 40) | _box_mask(20, 20, 32, 32, 40)  # Dice = 16 / 160
    d = dice(pred, small)
    assert 0.05 < d < 0.05 * np.sqrt(10)
    assert mask_reward(pred, small)[0] == pytest.approx(1 + 2 * d)
    assert mask_reward(pred, small, cfg)[0] == pytest.approx(giou([0, 0, 32, 32], [0, 0, 4, 2]))


def test_total_reward_weights():
    total, comps = total_reward(1.0, 0.5, 2.0, w_format=1.0, w_box=0.0, w_mask=0.5)
    assert total == pytest.approx(2.0) and comps == {"format": 1.0, "box": 0.5, "mask": 2.0}
