"""SAM and MedSAM preprocessing and mask postprocessing against hand computations (numpy), and the checkpoint
rules of the real SAM types."""
import copy

import numpy as np
import pytest
import torch

from coreseg.common.config import ConfigError, load_config
from coreseg.common.models.sam import (PREPROCESSING_ATTR, build_sam, encode_images, input_size_for, medsam_input,
                               preprocess_image, sam_input, save_random_sam, upscale_masks)
from coreseg.learner.losses import low_res_target

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def bilinear_1d_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of bilinear resampling with half-pixel centres (align_corners=False): source
    coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at the borders."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def resize_hand(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """HxWxC (or HxW) upsampled to h x w, separably."""
    rows, cols = bilinear_1d_weights(x.shape[0], h), bilinear_1d_weights(x.shape[1], w)
    return np.einsum("ij,jk...,lk->il...", rows, x.astype(np.float64), cols)


@pytest.fixture()
def image():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(2, 4, 3), dtype=np.uint8)  # H=2, W=4


def test_sam_input_resizes_longest_side_normalises_and_pads_bottom(image):
    x, (nh, nw) = sam_input(image, 8)  # longest side 4 -> 8: 4 x 8, then padded to 8 x 8
    assert (nh, nw) == (4, 8)
    want = np.zeros((8, 8, 3))
    want[:4] = (resize_hand(image, 4, 8) - MEAN) / STD
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-4)


def test_medsam_input_stretches_to_square_and_min_max_scales(image):
    x, size = medsam_input(image, 8)  # 2 x 4 -> 8 x 8, aspect not kept
    assert size == (8, 8)
    resized = np.floor(np.clip(resize_hand(image, 8, 8), 0, 255) + 1e-9)  # the reference's integer cast
    want = (resized - resized.min()) / max(resized.max() - resized.min(), 1e-8)  # over the whole image
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_medsam_input_of_a_flat_image_is_zero():
    x, _ = medsam_input(np.full((5, 5, 3), 77, np.uint8), 16)
    assert float(x.abs().max()) == 0.0


def _as_medsam(tiny_sam):
    sam = copy.deepcopy(tiny_sam)
    setattr(sam, PREPROCESSING_ATTR, "medsam")
    return sam


def test_encoder_gets_each_familys_input(tiny_sam):
    image = np.random.default_rng(0).integers(0, 256, size=(40, 100, 3), dtype=np.uint8)
    medsam = _as_medsam(tiny_sam)
    size = tiny_sam.image_encoder.img_size
    with torch.no_grad():
        for sam, want_input in ((tiny_sam, sam_input(image, size)[0]), (medsam, medsam_input(image, size)[0])):
            np.testing.assert_array_equal(preprocess_image(sam, image)[0].numpy(), want_input.numpy())
            np.testing.assert_allclose(encode_images(sam, [image])[0].numpy(),
                                       sam.image_encoder(want_input[None])[0].numpy(), atol=1e-5)
    assert input_size_for(tiny_sam, 40, 100) == (51, 128) and input_size_for(medsam, 40, 100) == (128, 128)


def test_medsam_masks_resize_the_low_res_grid_straight_to_the_image(tiny_sam):
    low = torch.randn(2, 1, 4, 4)
    out = upscale_masks(_as_medsam(tiny_sam), low, 6, 10).numpy()
    for m in range(2):
        np.testing.assert_allclose(out[m, 0], resize_hand(low[m, 0].numpy(), 6, 10), atol=1e-5)


def test_medsam_mask_target_is_stretched_not_padded():
    mask = np.zeros((2, 4), bool)
    mask[:, :2] = True  # left half
    soft = low_res_target(mask, 8, 4, soft=True, keep_aspect=False).numpy()
    stretched = resize_hand(mask.astype(float), 8, 8)
    want = stretched.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 2x2 area average
    np.testing.assert_allclose(soft, want, atol=1e-6)
    # every row alike: the mask fills the whole square, no padded rows at the bottom
    assert np.allclose(soft[:, 0], 1) and np.allclose(soft[:, 3], 0) and np.allclose(soft, soft[:1])


@pytest.mark.parametrize("sam_type", ["vit_b", "vit_l", "vit_h", "medsam"])
def test_real_types_refuse_an_empty_or_missing_checkpoint(sam_type, tmp_path):
    with pytest.raises(ValueError, match="model.sam_checkpoint"):
        build_sam(sam_type, "")
    with pytest.raises(FileNotFoundError, match="model.sam_checkpoint"):
        build_sam(sam_type, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="model.sam_checkpoint"):
        load_config("tiny_cpu", [f"model.sam_type={sam_type}", "model.sam_checkpoint=''"])


def test_unknown_sam_type_is_refused():
    with pytest.raises(ValueError, match="model.sam_type"):
        build_sam("vit_x", "x.pth")
    with pytest.raises(ConfigError, match="model.sam_type"):
        load_config("tiny_cpu", ["model.sam_type=vit_x"])


def test_medsam_checkpoint_loads_from_safetensors_and_pth(tmp_path):
    path = save_random_sam("medsam", tmp_path / "medsam.safetensors", seed=1)
    from safetensors.torch import load_file

    state = load_file(str(path))
    sam = build_sam("medsam", str(path))
    assert getattr(sam, PREPROCESSING_ATTR) == "medsam"
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_prediction_head.layers.0.weight"):
        assert torch.equal(sam.state_dict()[key], state[key])
    pth = tmp_path / "medsam_vit_b.pth"
    torch.save({"model": state}, pth)  # a training checkpoint: tensors only, read with weights_only=True
    again = build_sam("medsam", str(pth))
    assert torch.equal(again.state_dict()["image_encoder.pos_embed"], state["image_encoder.pos_embed"])
    with pytest.raises(ValueError, match="not a vit_l checkpoint"):
        build_sam("vit_l", str(path))


def test_segmenter_draws_medsam_masks_from_the_stretched_grid(tiny_sam):
    from coreseg.common.models.adapter import build_adapter
    from coreseg.common.models.segment import decode_masks
    from coreseg.reward.segmenter import Segmenter

    medsam = _as_medsam(tiny_sam)
    adapter = build_adapter(16)
    image = np.random.default_rng(1).integers(0, 256, size=(40, 100, 3), dtype=np.uint8)
    states = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    masks = Segmenter(medsam, adapter).masks_for(["a"], [image], states, [0, 0])
    with torch.no_grad():
        emb = medsam.image_encoder(medsam_input(image, medsam.image_encoder.img_size)[0][None])
        low, _ = decode_masks(medsam, adapter, emb, states, torch.zeros(2, dtype=torch.long))
    for m in range(2):
        want = resize_hand(low[m, 0].numpy(), 40, 100) > 0
        assert masks[m].shape == (40, 100)
        assert (masks[m] != want).mean() < 0.002  # float32 vs float64 at pixels on the threshold
