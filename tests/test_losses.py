"""DiceCE against a numpy implementation; mask targets against hand-made masks and SAM's own upscaling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coreseg.learner.losses import dice_ce_loss, low_res_target


def np_dice_ce(logits, target, dice_w, bce_w, smooth, valid):
    dices, bces = [], []
    for i in range(logits.shape[0]):
        if not valid[i]:
            continue
        x, t = logits[i].ravel(), target[i].ravel()
        p = 1 / (1 + np.exp(-x))
        dices.append(1 - (2 * np.sum(p * t) + smooth) / (np.sum(p) + np.sum(t) + smooth))
        bces.append(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
    return dice_w * np.mean(dices) + bce_w * np.mean(bces), np.mean(dices), np.mean(bces)


@pytest.mark.parametrize("dice_w,bce_w,smooth", [(1.0, 1.0, 1.0), (0.5, 2.0, 1e-3)])
def test_dice_ce_matches_numpy(dice_w, bce_w, smooth):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(4, 1, 5, 6))
    target = (rng.random((4, 1, 5, 6)) > 0.6).astype(np.float64)
    target[3] = 0  # an empty ground truth
    valid = np.array([True, False, True, True])
    loss, parts = dice_ce_loss(torch.tensor(logits), torch.tensor(target), dice_w, bce_w, smooth,
                               valid=torch.tensor(valid))
    want, dice, bce = np_dice_ce(logits, target, dice_w, bce_w, smooth, valid)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert parts["dice"] == pytest.approx(dice, rel=1e-9) and parts["bce"] == pytest.approx(bce, rel=1e-9)
    all_valid, _ = dice_ce_loss(torch.tensor(logits), torch.tensor(target), dice_w, bce_w, smooth)
    assert all_valid.item() == pytest.approx(np_dice_ce(logits, target, dice_w, bce_w, smooth, [True] * 4)[0])


def test_dice_ce_hand_computed_single_pixel():
    # one pixel, logit 0 -> p = 0.5, target 1: dice = 1 - (2*0.5 + 1)/(0.5 + 1 + 1) = 0.2, bce = ln 2
    loss, parts = dice_ce_loss(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert parts["dice"] == pytest.approx(0.2) and parts["bce"] == pytest.approx(np.log(2))
    assert loss.item() == pytest.approx(0.2 + np.log(2), rel=1e-6)


def test_dice_ce_gradients_finite_and_prediction_matters():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good, _ = dice_ce_loss((target * 2 - 1) * 20, target)
    bad, _ = dice_ce_loss((1 - target * 2) * 20, target)
    assert good.item() < 0.01 < 1.0 < bad.item()
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = dice_ce_loss(logits, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0


def test_dice_ce_no_valid_sample_is_connected_zero():
    logits = torch.randn(3, 1, 4, 4, requires_grad=True)
    loss, parts = dice_ce_loss(logits, torch.ones(3, 1, 4, 4), valid=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and parts == {"dice": 0.0, "bce": 0.0} and torch.all(logits.grad == 0)


def test_dice_ce_rejects_bad_shapes():
    with pytest.raises(ValueError):
        dice_ce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError):
        dice_ce_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError):
        dice_ce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), valid=torch.ones(3, dtype=torch.bool))


# ---- targets in SAM's low-res frame --------------------------------------------------------------------
def test_low_res_target_wide_image_is_padded_at_the_bottom():
    mask = np.zeros((60, 120), bool)  # longest side 120 -> 128, height 60 -> 64 (rows 64.. are padding)
    mask[0:30, 60:120] = True  # top-right quarter of the image
    t = low_res_target(mask, 128, 32)  # low-res grid covers the padded 128x128 square at 1/4
    expected = np.zeros((32, 32))
    expected[0:8, 16:32] = 1  # image rows 0..30 -> input 0..32 -> low 0..8; columns 64..128 -> 16..32
    assert t.shape == (32, 32) and np.array_equal(t.numpy(), expected)


def test_low_res_target_tall_image_pads_on_the_right_with_partial_column():
    # 100x30, S=64: scale 0.64 -> input 64x19 (19.2 rounded); low-res 16 = 4 input px per cell.
    # Column 4 covers input columns 16..19 of which 16,17,18 are image: 3/4 lesion.
    t = low_res_target(np.ones((100, 30), bool), 64, 16, soft=True)
    assert np.allclose(t[:, :4].numpy(), 1) and np.allclose(t[:, 4].numpy(), 0.75) and t[:, 5:].sum() == 0
    hard = low_res_target(np.ones((100, 30), bool), 64, 16)
    assert hard[:, :5].all() and hard[:, 5:].sum() == 0


def test_low_res_target_small_image_is_upscaled_like_the_image():
    # 32x16 mask, S=64: scale 2 -> input 64x32. Block rows/cols 0..8 -> input 0..16 with a bilinear edge:
    # input px 15 = 0.75*1 + 0.25*0, px 16 = 0.25 (align_corners=False), so the low-res cells
    # (4 input px each) at the edge hold (1+1+1+0.75)/4 = 0.9375 and 0.25/4 = 0.0625.
    mask = np.zeros((32, 16), bool)
    mask[0:8, 0:8] = True
    soft = low_res_target(mask, 64, 16, soft=True).numpy()
    edge = np.array([1, 1, 1, 0.9375, 0.0625, 0, 0, 0])
    assert np.allclose(soft[:8, :8], np.outer(edge, edge)) and soft[:, 8:].sum() == 0 and soft[8:].sum() == 0
    hard = low_res_target(mask, 64, 16).numpy()
    assert hard[:4, :4].all() and hard.sum() == 16


def test_low_res_target_round_trips_through_sams_upscaling(tiny_sam):
    from coreseg.common.models.sam import upscale_masks

    yy, xx = np.mgrid[:90, :200]
    mask = ((yy - 40) / 25.0) ** 2 + ((xx - 130) / 50.0) ** 2 <= 1  # an ellipse in a wide image
    low = tiny_sam.image_encoder.img_size // 4  # SAM's low-res logits are 4x the embedding grid
    target = low_res_target(mask, tiny_sam.image_encoder.img_size, low)
    back = upscale_masks(tiny_sam, ((target * 2 - 1) * 10)[None, None], 90, 200)[0, 0].numpy() > 0
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.88  # 0.91 here; the rest is the 4x coarser grid
    # the naive target (whole image squeezed into the square, no padding) lands in the wrong place
    squeezed = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], (low, low), mode="area")
    naive = (squeezed[0, 0] >= 0.5).float()
    back = upscale_masks(tiny_sam, ((naive * 2 - 1) * 10)[None, None], 90, 200)[0, 0].numpy() > 0
    assert (back & mask).sum() / (back | mask).sum() < 0.6
