import numpy as np
import pytest
import torch
from PIL import Image

from coreseg.common.models.adapter import build_adapter
from coreseg.common.models.policy import (ModelPathError, ensure_policy_dir, gather_seg_states, load_policy,
                                  policy_info)
from coreseg.common.models.sam import build_sam, encode_images, upscale_masks
from coreseg.common.models.segment import decode_masks
from coreseg.common.models.family import family_for_type
from coreseg.common.prompts import build_completion


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    model, processor = load_policy(tiny_policy_dir)
    return model.eval(), processor


def _inputs(processor, samples):
    texts = [family_for_type("qwen2_5_vl").prompt(s.question) + build_completion(s.reasoning, s.category, s.boxes) for s in samples]
    return processor(text=texts, images=[Image.fromarray(s.image) for s in samples], return_tensors="pt",
                     padding=True)


def test_seg_token_fits_in_spare_rows(tiny_policy_dir, policy):
    info = policy_info(tiny_policy_dir)
    rows = policy[0].get_input_embeddings().weight.shape[0]
    assert len(policy[1].tokenizer) <= info.seg_token_id + 1 <= rows
    assert policy[1].tokenizer.convert_ids_to_tokens([info.seg_token_id]) == ["<seg>"]
    assert info.image_token_id in info.vision_token_ids


def test_forward_with_image_returns_seg_states(tiny_policy_dir, policy, synth_samples):
    model, processor = policy
    enc = _inputs(processor, synth_samples[:2])
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    info = policy_info(tiny_policy_dir)
    states, found = gather_seg_states(out.hidden_states[-1], enc["input_ids"], info.seg_token_id)
    assert states.shape == (2, model.config.text_config.hidden_size) and found.all()
    # the gathered row is the hidden state at the <seg> position
    pos = (enc["input_ids"][0] == info.seg_token_id).nonzero()[-1].item()
    assert torch.equal(states[0], out.hidden_states[-1][0, pos])
    none_found, flags = gather_seg_states(out.hidden_states[-1], torch.zeros_like(enc["input_ids"]), info.seg_token_id)
    assert not flags.any() and torch.count_nonzero(none_found) == 0


def test_saved_tiny_model_reloads_with_identical_logits(tmp_path, policy, synth_samples):
    model, processor = policy
    model.save_pretrained(str(tmp_path / "m"))
    processor.save_pretrained(str(tmp_path / "m"))
    again, _ = load_policy(tmp_path / "m")
    enc = _inputs(processor, synth_samples[:1])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again.eval()(**enc).logits)


def test_sam_and_adapter_give_image_sized_mask_and_gradients_reach_seg_state(tiny_policy_dir, policy, tiny_sam,
                                                                           synth_samples):
    model, processor = policy
    samples = synth_samples[:2]
    enc = _inputs(processor, samples)
    out = model(**enc, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    hidden.retain_grad()
    states, found = gather_seg_states(hidden, enc["input_ids"], policy_info(tiny_policy_dir).seg_token_id)
    adapter = build_adapter(model.config.text_config.hidden_size)
    emb = encode_images(tiny_sam, [s.image for s in samples])
    low, iou = decode_masks(tiny_sam, adapter, emb, states, torch.tensor([0, 1]))
    masks = upscale_masks(tiny_sam, low, samples[0].height, samples[0].width)
    assert masks.shape == (2, 1, samples[0].height, samples[0].width)
    masks.sigmoid().mean().backward()
    grad = hidden.grad
    seg_pos = (enc["input_ids"] == policy_info(tiny_policy_dir).seg_token_id)
    assert grad[seg_pos].abs().sum() > 0  # gradient reaches the <seg> hidden state
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_sam_non_square_image_size(tiny_sam):
    image = np.zeros((60, 100, 3), np.uint8)
    emb = encode_images(tiny_sam, [image])
    adapter = build_adapter(16)
    low, _ = decode_masks(tiny_sam, adapter, emb, torch.randn(3, 16), torch.zeros(3, dtype=torch.long))
    assert upscale_masks(tiny_sam, low, 60, 100).shape == (3, 1, 60, 100)


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelPathError, match="nothing is downloaded"):
        ensure_policy_dir(str(tmp_path / "no-such-qwen"))
    with pytest.raises(FileNotFoundError, match="sam_checkpoint"):
        build_sam("vit_b", str(tmp_path / "sam.pth"))
    with pytest.raises(ValueError, match="sam_type"):
        build_sam("vit_x", "")


def test_weight_bundle_travels_as_numpy_and_comes_back_exact():
    import pickle

    from coreseg.common.protocol import WeightBundle

    g = torch.Generator().manual_seed(0)
    lora = {"m.lora_A.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16)}
    adapter = {"w": torch.randn(3, 5, generator=g), "b": torch.arange(5, dtype=torch.float16)}
    bundle = WeightBundle(7, lora, {"r": 4}, adapter, None)
    payload = pickle.dumps(bundle)
    assert b"torch._utils" not in payload  # no pickled torch storages: the tensors went as numpy buffers
    back = pickle.loads(payload)
    assert back.version == 7 and back.peft_config == {"r": 4} and back.mask_decoder is None
    for want, got in ((lora, back.lora), (adapter, back.adapter)):
        assert set(want) == set(got)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    back.adapter["w"].add_(1.0)  # a private, writable copy
    assert not torch.equal(back.adapter["w"], adapter["w"])
