"""The stand-in alignment stage of the `tiny-aligned` preset (common/models/align.py), on a few steps."""
import json
import math

import numpy as np
import torch
from safetensors.torch import load_file

from coreseg.common.config import BUILT_IN_POLICIES
from coreseg.common.models.align import (ALIGN_SYNTH_SEED, AlignSpec, alignment_samples, coverage_targets,
                                         encode_rows, lr_at, place_loss, token_loss)
from coreseg.common.models.policy import (ALIGNED_PRESETS, PRESETS, build_aligned_policy, load_policy, policy_info,
                                          size_preset)
from coreseg.common.synth import MODALITIES, generate

FEW = AlignSpec(samples=6, steps=3, batch_size=2, lr=2e-3, recipe="test")


def test_alignment_images_are_in_distribution_and_not_the_runs_images():
    samples = alignment_samples(9, seed=0)
    ood = {m.name for m in MODALITIES if m.ood}
    assert {s.modality for s in samples} == {m.name for m in MODALITIES if not m.ood} and not ood & {s.modality for s in samples}
    run_images = {s.image.tobytes() for s in generate(40, seed=0, progress=False)}
    assert not run_images & {s.image.tobytes() for s in samples}
    # the policy seed moves the stage to other images
    assert samples[0].image.tobytes() != alignment_samples(1, seed=1)[0].image.tobytes()
    assert ALIGN_SYNTH_SEED > 1000  # far from the data.synth_seed values runs use (0 by default)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    spec = AlignSpec(samples=1, steps=100, batch_size=1, lr=1.0)
    assert math.isclose(lr_at(0, spec), 0.2) and math.isclose(lr_at(4, spec), 1.0)
    assert math.isclose(lr_at(99, spec), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert all(lr_at(s, spec) >= lr_at(s + 1, spec) for s in range(5, 99))


def test_token_loss_is_the_mean_cross_entropy_over_target_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    target = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.float32)
    logp = torch.log_softmax(logits, -1).numpy()
    picks = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if target[b, t]]
    assert math.isclose(float(token_loss(logits, ids, target)), float(np.mean(picks)), rel_tol=1e-5)


def test_aligned_build_is_deterministic_trains_every_part_and_loads(tmp_path, tiny_policy_dir):
    assert set(BUILT_IN_POLICIES) == set(PRESETS) | set(ALIGNED_PRESETS)
    assert size_preset("tiny-aligned") == "tiny" and size_preset("tiny") == "tiny" and size_preset("/x") is None
    plain = tiny_policy_dir  # the plain tiny build of seed 0, which tiny-aligned of seed 0 starts from
    one = build_aligned_policy(tmp_path / "one", "tiny-aligned", plain, seed=0, spec=FEW)
    two = build_aligned_policy(tmp_path / "two", "tiny-aligned", plain, seed=0, spec=FEW)
    w1, w2, w0 = (load_file(str(d / "model.safetensors")) for d in (one, two, plain))
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    changed = {k for k in w1 if not torch.equal(w1[k], w0[k])}
    assert any("visual" in k for k in changed) and any(k.startswith("model.layers.") for k in changed)
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (one / name).read_bytes() == (plain / name).read_bytes()
    meta = json.loads((one / "coreseg.json").read_text())
    assert meta["preset"] == "tiny-aligned" and meta["size"] == "tiny" and meta["align"]["steps"] == 3 and meta["align"]["seconds"] > 0
    model, processor = load_policy(one)  # the folder loads as the plain one does: only the weights differ
    assert processor.tokenizer.convert_tokens_to_ids("<seg>") == load_policy(plain)[1].tokenizer.convert_tokens_to_ids("<seg>")


def test_train_vision_false_leaves_the_vision_tower_as_it_was(tmp_path, tiny_policy_dir):
    from dataclasses import replace

    frozen = build_aligned_policy(tmp_path / "frozen", "tiny-aligned", tiny_policy_dir, seed=0,
                                  spec=replace(FEW, train_vision=False))
    w1, w0 = (load_file(str(d / "model.safetensors")) for d in (frozen, tiny_policy_dir))
    vision = [k for k in w0 if "visual" in k]
    assert vision and all(torch.equal(w1[k], w0[k]) for k in vision)
    assert any(not torch.equal(w1[k], w0[k]) for k in w0 if k.startswith("model.layers."))


def test_coverage_targets_are_the_lesion_fraction_of_each_cell_of_each_token():
    from coreseg.common.data import LesionSample

    mask = np.zeros((56, 56), bool)
    mask[0:7, 0:7] = True  # token 0, cell 0: full
    mask[28:35, 31:32] = True  # token 3 (row 1, col 1), cell 0 (rows 28-34, cols 28-34): 7 of 49 pixels
    sample = LesionSample(id="x", image=np.zeros((56, 56, 3), np.uint8), masks=[mask], boxes=np.zeros((1, 4)),
                          question="q")
    t = coverage_targets(sample, 28).numpy()
    assert t.shape == (4, 16)
    want = np.zeros((4, 16))
    want[0, 0], want[3, 0] = 1.0, 7 / 49
    np.testing.assert_allclose(t, want, rtol=1e-6)


def test_place_loss_is_the_cross_entropy_of_each_tokens_own_row_and_column():
    # two images: a 2 x 2 grid (rows 0 0 1 1, cols 0 1 0 1) and a 1 x 1 grid (row 0, col 0); max grid 2
    logits = torch.zeros(5, 4)
    assert math.isclose(float(place_loss(logits, [4, 1])), 2 * math.log(2), rel_tol=1e-6)  # uniform over 2
    logits[0] = torch.tensor([3.0, 0.0, 0.0, 1.0])  # token 0 (row 0, col 0): row right by 3, col wrong by 1
    row0 = -math.log(math.exp(3) / (math.exp(3) + 1))
    col0 = -math.log(1 / (1 + math.e))
    want = (row0 + 4 * math.log(2)) / 5 + (col0 + 4 * math.log(2)) / 5
    assert math.isclose(float(place_loss(logits, [4, 1])), want, rel_tol=1e-6)


def test_vision_position_changes_the_pretrained_tower_and_is_recorded(tmp_path, tiny_policy_dir):
    from dataclasses import replace

    spec = replace(FEW, vision_steps=2, train_vision=False)
    plain = build_aligned_policy(tmp_path / "a", "tiny-aligned", tiny_policy_dir, seed=0, spec=spec)
    placed = build_aligned_policy(tmp_path / "b", "tiny-aligned", tiny_policy_dir, seed=0,
                                  spec=replace(spec, vision_position=True))
    w_plain, w_placed = (load_file(str(d / "model.safetensors")) for d in (plain, placed))
    assert any(not torch.equal(w_plain[k], w_placed[k]) for k in w_plain if "visual" in k)
    assert json.loads((placed / "coreseg.json").read_text())["align"]["vision_position"] is True


def test_spec_rope_and_vision_pretraining_change_the_folder_as_named(tmp_path, tiny_policy_dir):
    from dataclasses import replace

    spec = replace(FEW, vision_steps=2, train_vision=False, rope_theta=100.0, mrope_section=(1, 3, 12))
    built = build_aligned_policy(tmp_path / "a", "tiny-aligned", tiny_policy_dir, seed=0, spec=spec)
    rope = json.loads((built / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope["rope_theta"] == 100.0 and rope["mrope_section"] == [1, 3, 12]
    plain_rope = json.loads((tiny_policy_dir / "config.json").read_text())["text_config"]["rope_parameters"]
    assert plain_rope["rope_theta"] == 1e6 and plain_rope["mrope_section"] == [4, 6, 6]
    w1, w0 = (load_file(str(d / "model.safetensors")) for d in (built, tiny_policy_dir))
    assert any(not torch.equal(w1[k], w0[k]) for k in w0 if "visual" in k)  # pre-trained, then frozen
    meta = json.loads((built / "coreseg.json").read_text())["align"]
    assert meta["vision_first_loss"] > 0 and meta["vision_output_scale"] > 0 and meta["mrope_section"] == [1, 3, 12]
    model, processor = load_policy(built)
    enc = encode_rows(processor, policy_info(built).family, alignment_samples(4, 0))
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(
            torch.cat([r["prompt"]["pixel_values"] for r in enc]), torch.cat([r["prompt"]["image_grid_thw"] for r in enc]),
            return_dict=True).pooler_output))
    assert 0.3 < float(feats.norm(dim=-1).mean()) < 3.0  # scaled to a mean norm of 1 (on the first 64 images)


def test_tiny_aligned_is_a_built_in_name_with_the_tiny_shape(tmp_path):
    from coreseg.common.config import absolute_path
    from coreseg.deploy.plan import resolve_shape

    assert absolute_path("tiny-aligned", tmp_path) == "tiny-aligned"  # not taken for a relative folder
    assert resolve_shape("tiny-aligned")[0] == resolve_shape("tiny")[0]
