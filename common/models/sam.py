"""SAM builders (segment_anything modeling classes), one per checkpoint family, and each family's image
pre/post-processing.

`model.sam_type`:
- `tiny`: a small SAM built in-process (random weights, tests and the tiny presets), SAM's preprocessing.
- `vit_b` / `vit_l` / `vit_h`: Meta's SAM. Input: the image resized so its longest side is S (1024),
  normalised with ImageNet's pixel mean/std on the 0-255 scale, zero-padded bottom/right to S x S. Masks:
  the low-res logits cover the padded square, so they are upscaled to S x S, cropped to the resized image and
  resized to the original size (`Sam.postprocess_masks`).
- `medsam`: MedSAM (a fine-tuned SAM vit_b). Its reference inference (bowang-lab/MedSAM,
  MedSAM_Inference.py) resizes the image to S x S without keeping the aspect ratio, casts it to integers,
  min-max scales it to [0, 1] per image (no mean/std) and resizes the low-res mask straight to the image's
  H x W. The reference resizes with skimage's order-3 spline; here the resize is the same bilinear
  (antialiased) one as SAM's, so both families share one tested interpolation. The reference thresholds
  sigmoid probabilities at 0.5 after the resize; here the logits are resized and thresholded at
  `reward.mask_threshold` (0 = probability 0.5), because the learner's DiceCE needs logits.

A real type loads its weights from `model.sam_checkpoint` (a local .pth read with `weights_only=True`, or a
.safetensors file); an empty or missing path is an error, never random weights. Benchmarks that want a
random SAM write one with `save_random_sam` and load it like a real checkpoint.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROMPT_DIM = 256  # SAM's prompt width
TINY_IMAGE_SIZE = 128
# ImageNet's pixel mean/std on the 0-255 scale (SAM's Sam defaults)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# sam_type -> (segment_anything registry architecture, preprocessing family)
SAM_TYPES: Dict[str, Tuple[str, str]] = {
    "tiny": ("tiny", "sam"),
    "vit_b": ("vit_b", "sam"),
    "vit_l": ("vit_l", "sam"),
    "vit_h": ("vit_h", "sam"),
    "medsam": ("vit_b", "medsam"),
}
PREPROCESSING_ATTR = "coreseg_preprocessing"  # set on every SAM this module builds: "sam" | "medsam"


def preprocessing_of(sam) -> str:
    return getattr(sam, PREPROCESSING_ATTR, "sam")


def build_tiny_sam(image_size: int = TINY_IMAGE_SIZE, seed: int = 0):
    """A small random-init SAM: 2-block ViT encoder, 16 px patches, full-width (256) prompt/decoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    patch = 16
    grid = image_size // patch
    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=image_size, mlp_ratio=2.0,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=patch,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=4,
                              out_chans=PROMPT_DIM)
    prompt = PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=512, num_heads=8),
                          transformer_dim=PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=PROMPT_DIM)
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
              pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))
    torch.random.set_rng_state(gen_state)
    setattr(sam, PREPROCESSING_ATTR, "sam")
    return sam.eval()


def _check_sam_type(sam_type: str) -> Tuple[str, str]:
    if sam_type not in SAM_TYPES:
        raise ValueError(f"model.sam_type={sam_type!r}: expected one of {', '.join(SAM_TYPES)}")
    return SAM_TYPES[sam_type]


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing is unpickled
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint {"model": ...}
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.sam_checkpoint={str(path)!r}: not a state dict (got {type(state).__name__})")
    return state


def build_sam(sam_type: str = "tiny", checkpoint: str = "", seed: int = 0):
    """`tiny` (built in-process from `seed`), or a real SAM family from its local checkpoint file."""
    arch, preprocessing = _check_sam_type(sam_type)
    if arch == "tiny":
        return build_tiny_sam(seed=seed)
    if not str(checkpoint).strip():
        raise ValueError(f"model.sam_type={sam_type!r} needs model.sam_checkpoint (a local {arch} .pth or "
                         f".safetensors file); it is empty. Random weights are never used in its place "
                         f"(benchmarks write a random checkpoint with common.models.sam.save_random_sam)")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.sam_checkpoint={str(checkpoint)!r} does not exist (a local SAM/MedSAM "
                                f"checkpoint for model.sam_type={sam_type!r}; nothing is downloaded at run time)")
    from segment_anything import sam_model_registry

    sam = sam_model_registry[arch](checkpoint=None)
    state = _read_state_dict(path)
    try:
        missing, _ = sam.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture's weights
        raise ValueError(f"model.sam_checkpoint={str(checkpoint)!r}: not a {arch} checkpoint "
                         f"(model.sam_type={sam_type!r}): {str(err).splitlines()[-1].strip()}") from None
    if missing:
        raise ValueError(f"model.sam_checkpoint={str(checkpoint)!r}: not a {arch} checkpoint "
                         f"(model.sam_type={sam_type!r}; missing {missing[:3]} ...)")
    setattr(sam, PREPROCESSING_ATTR, preprocessing)
    return sam.eval()


def save_random_sam(sam_type: str, path: str | Path, seed: int = 0) -> Path:
    """A random-init checkpoint of a real SAM architecture (safetensors), for benchmarks and shape tests that
    load it through `model.sam_checkpoint` like a real one."""
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    arch, _ = _check_sam_type(sam_type)
    if arch == "tiny":
        raise ValueError("model.sam_type='tiny' is built in-process; it has no checkpoint file")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sam = sam_model_registry[arch](checkpoint=None)
    torch.random.set_rng_state(gen_state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    return path


# -- preprocessing (pure functions of the image and the encoder's input size S) ---------------------------
def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """[1, C, h, w] float -> [1, C, *size], bilinear with antialiasing (SAM's resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None]


def longest_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """SAM: the image's size once its longest side is `size` (aspect kept, rounded to the nearest pixel)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_input(image: np.ndarray, size: int, mean: Sequence[float] = SAM_PIXEL_MEAN,
              std: Sequence[float] = SAM_PIXEL_STD) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """SAM: HxWx3 uint8 -> [3, S, S] (longest side resized to S, (x - mean) / std on 0-255, zero-padded
    bottom/right), and the resized size (nh, nw)."""
    nh, nw = longest_side_size(*image.shape[:2], size)
    x = _resize(_image_tensor(image), (nh, nw))
    x = (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None, None]
    return F.pad(x, (0, size - nw, 0, size - nh))[0], (nh, nw)


def medsam_input(image: np.ndarray, size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """MedSAM: HxWx3 uint8 -> [3, S, S] (resized to S x S, aspect not kept, cast to integers like the
    reference's uint8 cast, then (x - min) / max(max - min, 1e-8) over the whole image), and (S, S)."""
    x = _resize(_image_tensor(image), (size, size)).clamp(0.0, 255.0).floor()
    lo, hi = x.min(), x.max()
    return ((x - lo) / (hi - lo).clamp(min=1e-8))[0], (size, size)


def preprocess_image(sam, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The encoder's input [3, S, S] for one HxWx3 uint8 image, and the image's size inside it."""
    size = sam.image_encoder.img_size
    if preprocessing_of(sam) == "medsam":
        return medsam_input(image, size)
    return sam_input(image, size, sam.pixel_mean.flatten().tolist(), sam.pixel_std.flatten().tolist())


@torch.no_grad()
def encode_images(sam, images: Sequence[np.ndarray], batch_size: int = 8) -> torch.Tensor:
    """Image embeddings [N, 256, g, g] from the frozen encoder."""
    param = next(sam.image_encoder.parameters())
    out: List[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([preprocess_image(sam, im)[0] for im in images[start:start + batch_size]])
        out.append(sam.image_encoder(x.to(param.device, param.dtype)).float())
    return torch.cat(out)


def input_size_for(sam, height: int, width: int) -> Tuple[int, int]:
    """The image's size inside the encoder's S x S input."""
    size = sam.image_encoder.img_size
    if preprocessing_of(sam) == "medsam":
        return size, size
    return longest_side_size(height, width, size)


def upscale_masks(sam, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Low-res mask logits [M, 1, l, l] -> logits at the image's size [M, 1, H, W]."""
    if preprocessing_of(sam) == "medsam":  # the low-res grid covers the whole (stretched) image
        return F.interpolate(low_res, (height, width), mode="bilinear", align_corners=False)
    return sam.postprocess_masks(low_res, input_size_for(sam, height, width), (height, width))
