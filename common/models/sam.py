"""SAM builders (segment_anything modeling classes) and image pre/post-processing.

Real checkpoints (SAM vit_b/l/h, MedSAM) load from a local .pth as a plain state dict
(`weights_only=True`: nothing is unpickled); `tiny` builds a small SAM in-process.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROMPT_DIM = 256  # SAM's prompt width
TINY_IMAGE_SIZE = 128


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
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    torch.random.set_rng_state(gen_state)
    return sam.eval()


def build_sam(sam_type: str = "tiny", checkpoint: str = "", seed: int = 0):
    """`tiny`, or vit_b/vit_l/vit_h from a local checkpoint (empty checkpoint = random init, for benchmarks)."""
    if sam_type == "tiny":
        return build_tiny_sam(seed=seed)
    from segment_anything import sam_model_registry

    if sam_type not in sam_model_registry:
        raise ValueError(f"model.sam_type={sam_type!r}: expected tiny, vit_b, vit_l or vit_h")
    if checkpoint and not Path(checkpoint).expanduser().exists():
        raise FileNotFoundError(f"model.sam_checkpoint={checkpoint!r} does not exist (a local SAM/MedSAM .pth; "
                                f"nothing is downloaded at run time)")
    torch.manual_seed(seed)
    sam = sam_model_registry[sam_type](checkpoint=None)
    if checkpoint:
        state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = sam.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{checkpoint}: not a {sam_type} SAM checkpoint (missing {missing[:3]} ...)")
    return sam.eval()


def preprocess_image(sam, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """HxWx3 uint8 -> SAM input [3, S, S] (longest side resized to S, normalised, zero-padded), input size."""
    size = sam.image_encoder.img_size
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean = sam.pixel_mean.to(torch.float32).cpu()
    std = sam.pixel_std.to(torch.float32).cpu()
    x = (x - mean) / std
    x = F.pad(x, (0, size - nw, 0, size - nh))
    return x[0], (nh, nw)


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
    scale = sam.image_encoder.img_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def upscale_masks(sam, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Low-res mask logits [M, 1, l, l] -> logits at the image's size [M, 1, H, W]."""
    return sam.postprocess_masks(low_res, input_size_for(sam, height, width), (height, width))
