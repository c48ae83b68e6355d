"""The reward functions against hand-worked values and independent (pure-Python / set) computations."""
import itertools

import numpy as np
import pytest

from coreseg.common.config import RewardConfig
from coreseg.common.prompts import build_completion, parse_completion
from coreseg.reward.rewards import MaskRewardConfig, box_reward, dice, format_reward, iou, mask_reward, switch_threshold
from coreseg.reward.terms import score_completion

GOOD = "<think> a </think> <answer> The polyp is located at [[1, 2, 3, 4]]. The mask is <seg>. </answer>"


def test_format_reward():
    assert format_reward(parse_completion(GOOD)) == (1.0, "")
    assert format_reward(parse_completion("no tags")) == (0.0, "no_think_block")
    two_segs = GOOD.replace("</answer>", "<seg> </answer>")
    assert format_reward(parse_completion(two_segs)) == (0.0, "multiple_seg_tokens")
    assert format_reward(parse_completion("")) == (0.0, "empty_output")


def test_box_reward_hand_cases():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert box_reward(gt, gt)[0] == pytest.approx(1.0)  # perfect
    assert box_reward([[50, 50, 60, 60]], gt)[:2] == (0.0, "no_box_match")  # disjoint
    # partial overlap: [0,0,10,8] vs [0,0,10,10] -> IoU 80/100 (TP); second gt missed: F1 = 2/3
    value, _, d = box_reward([[0, 0, 10, 8]], gt)
    assert (d["tp"], d["fp"], d["fn"]) == (1, 0, 1) and value == pytest.approx(0.8 * 2 / 3)
    value, _, d = box_reward([gt[0]], gt)  # one of two lesions found: mIoU 1, F1 = 2/3
    assert value == pytest.approx(2 / 3) and d["fn"] == 1
    value, _, d = box_reward(gt + [[40, 40, 45, 45]], gt)  # an extra box: F1 = 4/5
    assert value == pytest.approx(0.8) and d["fp"] == 1
    assert box_reward([], [])[:2] == (1.0, "")  # empty / empty
    assert box_reward([], gt)[:2] == (0.0, "no_boxes")
    assert box_reward([[0, 0, 5, 5]], [])[0] == 0.0  # a box where there is no lesion: F1 = 0
    # IoU 50/150 = 1/3 < tau = 0.5: matched but not a true positive
    assert box_reward([[0, 0, 10, 10]], [[5, 0, 15, 10]], 0.5)[0] == 0.0
    assert box_reward([[0, 0, 10, 10]], [[5, 0, 15, 10]], 0.3)[0] == pytest.approx(1 / 3)
    # clipped to the 64x64 image before IoU: [-5,-5,10,10] -> [0,0,10,10]
    assert box_reward([[-5, -5, 10, 10]], [[0, 0, 10, 10]], image_size=(64, 64))[0] == pytest.approx(1.0)
    assert box_reward([[-5, -5, 10, 10]], [[0, 0, 10, 10]], 0.4)[0] == pytest.approx(100 / 225)  # unclipped
    assert box_reward([[0, 0, np.nan, 5]], gt)[:2] == (0.0, "boxes_not_finite")


def _iou_py(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _optimal_rewards(pred, gt, tau):
    """mIoU(TP) x F1 of every optimal assignment, by enumeration (itertools): of all assignments of min(n, m)
    pairs, those of maximal total IoU (equal up to 1e-9)."""
    n, m = len(pred), len(gt)
    scored = []  # (total IoU, reward) per assignment
    for perm in itertools.permutations(range(max(n, m))):
        ious = [_iou_py(pred[i], gt[perm[i]]) for i in range(n) if perm[i] < m]
        tps = [v for v in ious if v >= tau]
        tp = len(tps)
        f1 = 2 * tp / (2 * tp + (n - tp) + (m - tp))
        scored.append((sum(ious), (sum(tps) / tp if tp else 0.0) * f1))
    best_total = max(total for total, _ in scored)
    return [reward for total, reward in scored if total >= best_total - 1e-9]


def _brute_force(pred, gt, tau):
    """The rule: the highest reward among the optimal assignments."""
    return max(_optimal_rewards(pred, gt, tau))


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(80):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        corners = rng.uniform(0, 40, (m, 2))
        gt = np.concatenate([corners, corners + rng.uniform(4, 15, (m, 2))], 1)
        pred = gt[rng.integers(0, m, n)] + rng.normal(0, 3, (n, 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
        tau = 0.3
        assert box_reward(pred, gt, tau)[0] == pytest.approx(_brute_force(pred, gt, tau), abs=1e-9)


def test_box_matching_ties_go_to_the_higher_reward():
    # Both assignments have total IoU 0.5: (0.25 + 0.25, no TP) and (0.0 + 0.5, one TP at tau = 0.5).
    pred, gt = [[3, 0, 6, 1], [2, 0, 6, 1]], [[2, 0, 4, 1], [2, 0, 3, 1]]
    value, reason, d = box_reward(pred, gt)
    assert (d["tp"], d["fp"], d["fn"], reason) == (1, 1, 1, "")
    assert value == pytest.approx(0.5 * 2 * 1 / 4)  # mIoU 0.5 x F1 2/4
    # one-pixel-high boxes on a small integer range: optimal assignments with different rewards are common there
    rng = np.random.default_rng(5)
    ambiguous = 0
    for _ in range(600):
        n, m = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        x1, width = rng.integers(0, 3, n + m), rng.integers(1, 5, n + m)
        boxes = np.stack([x1, 0 * x1, x1 + width, 0 * x1 + 1], 1).astype(float)
        pred, gt = boxes[:n], boxes[n:]
        rewards = _optimal_rewards(pred, gt, 0.5)
        ambiguous += max(rewards) - min(rewards) > 1e-12
        assert box_reward(pred, gt, 0.5)[0] == pytest.approx(max(rewards), abs=1e-12), (pred, gt)
    assert ambiguous >= 5  # the cases do exercise the tie-break


def test_dice_iou_against_set_arithmetic():
    rng = np.random.default_rng(2)
    for k in range(30):
        a, b = rng.random((16, 12)) > rng.random(), rng.random((16, 12)) > rng.random()
        sa, sb = set(zip(*np.nonzero(a))), set(zip(*np.nonzero(b)))
        want_d = 2 * len(sa & sb) / (len(sa) + len(sb)) if sa or sb else 1.0
        want_j = len(sa & sb) / len(sa | sb) if sa or sb else 1.0
        assert dice(a, b) == pytest.approx(want_d) and iou(a, b) == pytest.approx(want_j)
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0


def _box_mask(x1, y1, x2, y2, size=40):
    m = np.zeros((size, size), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_mask_reward_both_sides_of_delta():
    gt = _box_mask(0, 0, 10, 10)  # area 100
    # separated: pred [15,0,20,10] area 50, union 150, hull [0,0,20,10] = 200 -> GIoU = 0 - 50/200
    value, reason, d = mask_reward(_box_mask(15, 0, 20, 10), gt)
    assert (d, reason) == (0.0, "") and value == pytest.approx(-0.25)
    # touching: pred [10,0,20,10]: union 200 = hull -> GIoU 0
    assert mask_reward(_box_mask(10, 0, 20, 10), gt)[0] == pytest.approx(0.0)
    # far apart on the diagonal: pred [30,30,40,40], union 200, hull 1600 -> -1400/1600
    assert mask_reward(_box_mask(30, 30, 40, 40), gt)[0] == pytest.approx(-0.875)
    # nested, Dice below delta: 1 px inside a 10x10 gt -> Dice 2/101 < 0.05; GIoU = IoU = 1/100
    value, _, d = mask_reward(_box_mask(4, 4, 5, 5), gt)
    assert d == pytest.approx(2 / 101) and value == pytest.approx(1 / 100)
    # above delta: 1 + 2 * Dice; pred 10x5 inside gt -> Dice = 2*50/150
    value, _, d = mask_reward(_box_mask(0, 0, 10, 5), gt)
    assert d == pytest.approx(2 / 3) and value == pytest.approx(1 + 4 / 3)
    assert mask_reward(gt, gt)[0] == pytest.approx(3.0)  # perfect
    # empty prediction -> the coarse branch's minimum, with a reason
    assert mask_reward(np.zeros_like(gt), gt)[:2] == (-1.0, "empty_mask")
    assert mask_reward(gt, np.zeros_like(gt))[:2] == (-1.0, "mask_without_lesion")
    assert mask_reward(np.zeros((5, 5), bool), gt)[:2] == (0.0, "mask_shape_mismatch")
    # the threshold is a config value: at delta = 0.7, Dice 2/3 falls on the box branch (nested: GIoU = IoU)
    value, _, _ = mask_reward(_box_mask(0, 0, 10, 5), gt, MaskRewardConfig(dice_threshold=0.7))
    assert value == pytest.approx(0.5)


def test_density_aware_threshold_small_and_large_lesion():
    cfg = RewardConfig(dice_threshold=0.05, density_aware=True, density_ref_fraction=0.05,
                       density_max_threshold=0.3)
    large = _box_mask(0, 0, 20, 20)  # fraction 400/1600 = 0.25 >= ref -> delta unchanged
    small = _box_mask(0, 0, 4, 2)  # fraction 8/1600 = 0.005 -> 0.05 * sqrt(0.05 / 0.005) = 0.05 * sqrt(10)
    tiny = _box_mask(0, 0, 1, 1)  # fraction 1/1600 -> 0.05 * sqrt(80) = 0.447 > cap 0.3
    assert switch_threshold(large, cfg) == 0.05
    assert switch_threshold(small, cfg) == pytest.approx(0.05 * np.sqrt(10))
    assert switch_threshold(tiny, cfg) == pytest.approx(0.3)
    assert switch_threshold(small, RewardConfig()) == 0.05  # off by default
    # Dice 0.1 on the small lesion: pred = lesion (8 px) + a 12x12 box elsewhere -> 2*8/(152+8) = 0.1
    pred = small | _box_mask(20, 20, 32, 32)
    assert dice(pred, small) == pytest.approx(0.1)
    assert mask_reward(pred, small)[0] == pytest.approx(1.2)  # plain: fine branch, 1 + 2*0.1
    # density-aware: coarse branch, bbox [0,0,32,32] contains the lesion box -> GIoU = IoU = 8/1024
    assert mask_reward(pred, small, cfg)[0] == pytest.approx(8 / 1024)
    # the large lesion keeps delta: Dice 0.1 stays on the fine branch in both variants
    pred_large = _box_mask(0, 0, 20, 2) | _box_mask(24, 24, 40, 40)  # 40 px inside, 256 outside
    d = 2 * 40 / (296 + 400)
    assert mask_reward(pred_large, large, cfg)[0] == pytest.approx(1 + 2 * d)
    assert mask_reward(pred_large, large)[0] == pytest.approx(1 + 2 * d)


def test_total_reward_weights():
    gt_mask = _box_mask(0, 0, 10, 10)
    # box [0,0,10,5] vs gt [0,0,10,10]: IoU 0.5 (a TP at tau 0.5) -> 0.5 x F1 1; the mask is the gt: 3
    text = build_completion("x", "polyp", [[0, 0, 10, 5]])
    cfg = RewardConfig(w_format=1.0, w_box=0.0, w_mask=0.5)
    score = score_completion(text, gt_mask, [gt_mask], [[0, 0, 10, 10]], (40, 40), cfg)
    assert score.components == {"format": 1.0, "box": pytest.approx(0.5), "mask": 3.0}
    assert score.total == pytest.approx(1.0 + 0.0 * 0.5 + 0.5 * 3.0)
    assert score_completion(text, gt_mask, [gt_mask], [[0, 0, 10, 10]], (40, 40), RewardConfig()).total == \
        pytest.approx(1.0 + 0.5 + 3.0)


def test_score_completion_components_and_reasons():
    gt_mask = _box_mask(0, 0, 10, 10)
    gt_boxes = np.array([[0, 0, 10, 10]], float)
    text = build_completion("round lesion", "polyp", gt_boxes)
    perfect = score_completion(text, gt_mask, [gt_mask], gt_boxes, (40, 40), RewardConfig())
    assert perfect.total == pytest.approx(1 + 1 + 3) and perfect.reasons == [] and perfect.format_ok
    assert (perfect.dice, perfect.iou) == (1.0, 1.0)
    no_seg = score_completion(text, "no_seg_token", [gt_mask], gt_boxes, (40, 40), RewardConfig(w_box=0.5))
    assert no_seg.components == {"format": 1.0, "box": 1.0, "mask": 0.0} and no_seg.total == pytest.approx(1.5)
    assert no_seg.reasons == ["mask:no_seg_token"]
    junk = score_completion("garbage [[1, 2", np.zeros((40, 40), bool), [gt_mask], gt_boxes, (40, 40),
                            RewardConfig())
    assert junk.components == {"format": 0.0, "box": 0.0, "mask": -1.0} and not junk.format_ok
    assert junk.reasons == ["format:no_think_block", "box:no_think_block", "mask:empty_mask"]
