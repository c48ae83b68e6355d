"""`<seg>` states -> masks through the adapter and SAM's mask decoder (shared by learner and reward)."""
from __future__ import annotations

from typing import Tuple

import torch


def decode_masks(sam, adapter, image_embeddings: torch.Tensor, seg_states: torch.Tensor,
                 image_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits for each `<seg>` state.

    image_embeddings [N, C, h, w] (one per distinct image), seg_states [M, H], image_index [M] (which image
    each state belongs to). All states of one image go through the decoder in one call.
    Returns (low_res_logits [M, 1, 4h, 4w], predicted IoU [M, 1]).
    """
    pe = sam.prompt_encoder.get_dense_pe()
    dec_dtype = next(sam.mask_decoder.parameters()).dtype
    sparse = adapter(seg_states, image_embeddings[image_index], pe)
    h, w = image_embeddings.shape[-2:]
    dense_one = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
    logits = [None] * seg_states.shape[0]
    ious = [None] * seg_states.shape[0]
    for img in torch.unique(image_index).tolist():
        rows = (image_index == img).nonzero(as_tuple=True)[0]
        low, iou = sam.mask_decoder(
            image_embeddings=image_embeddings[img:img + 1].to(dec_dtype), image_pe=pe.to(dec_dtype),
            sparse_prompt_embeddings=sparse[rows].to(dec_dtype),
            dense_prompt_embeddings=dense_one.expand(len(rows), -1, -1, -1).to(dec_dtype),
            multimask_output=False)
        for j, r in enumerate(rows.tolist()):
            logits[r], ious[r] = low[j], iou[j]
    return torch.stack(logits), torch.stack(ious)
