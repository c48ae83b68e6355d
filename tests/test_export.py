"""`coreseg export`: the folder loads in a process without coreseg (plain transformers + peft + segment-anything)
and gives the learner's logits, `<seg>` state and the reward worker's mask."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coreseg.common.config import load_config, save_config, with_absolute_paths
from coreseg.common.images import encode_png

pytestmark = pytest.mark.slow  # DeepSpeed learner in-process

STANDALONE = r'''
import json, sys
for name in ("common", "deploy", "learner", "reward", "rollout"):
    sys.modules[name] = None  # coreseg cannot be imported here: the export must stand alone
import numpy as np, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

export, job = sys.argv[1], json.load(open(sys.argv[2]))
sys.path.insert(0, export)
from coreseg_segmenter import apply_token_rows, load_segmenter

policy = export + "/policy"
processor = AutoProcessor.from_pretrained(policy)
base = json.load(open(policy + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), policy)
assert apply_token_rows(model, policy)  # the run trained the `<seg>` rows
model.eval()
prompt = json.load(open(policy + "/coreseg_prompt.json"))
messages = [{"role": "system", "content": [{"type": "text", "text": prompt["system"]}]},
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": prompt["user"].format(question=job["question"])}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
image = np.asarray(Image.open(job["image"]).convert("RGB"))
inputs = processor(text=[text + job["completion"]], images=[Image.fromarray(image)], return_tensors="pt")
with torch.no_grad():
    out = model(**inputs, output_hidden_states=True)
seg_id = processor.tokenizer.convert_tokens_to_ids("<seg>")
pos = (inputs["input_ids"][0] == seg_id).nonzero()[-1].item()
state = out.hidden_states[-1][0, pos]
segmenter = load_segmenter(export + "/segmenter")
mask = segmenter.masks([image], torch.as_tensor(np.load(job["learner_state"]))[None])[0]
prompt_inputs = processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
gen = model.generate(**prompt_inputs, max_new_tokens=4, do_sample=False)
np.savez(job["out"], prompt=np.array(text), logits=out.logits[0].numpy(), state=state.numpy(), mask=mask,
         input_ids=inputs["input_ids"][0].numpy(), generated=gen[0].numpy(),
         prompt_len=prompt_inputs["input_ids"].shape[1])
'''


@pytest.fixture(scope="module")
def trained(tiny_policy_dir, synth_samples, tmp_path_factory):
    """A run folder with one checkpoint of the tiny model after two SFT steps, its export, and the learner."""
    from coreseg.deploy.cli import main
    from tests.test_learner import make_core

    tmp = tmp_path_factory.mktemp("trained")
    core = make_core(tiny_policy_dir)
    batch = synth_samples[:4]
    for k in range(2):  # weights away from their initial values
        core.sft_step(batch, core.sft_norm(batch), step=k)
    run = tmp / "run"
    ckpt = run / "checkpoints" / "grpo_000000_sft_000002"
    core.save_checkpoint(str(ckpt / "learner"))
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    cfg = with_absolute_paths(core.cfg)
    cfg.model.assets_dir = str(tiny_policy_dir.parent)
    save_config(cfg, run / "config.yaml")
    before = _stamps(run)
    main(["export", str(run), "--base", str(tiny_policy_dir), "--out", str(tmp / "export"), "--merged"])
    assert _stamps(run) == before  # the run folder is only read
    return {"core": core, "run": run, "export": tmp / "export", "cfg": cfg}


def _stamps(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _learner_reference(core, sample, completion):
    """The learner's in-memory model on the processor's encoding of prompt + completion: its inputs, output, the
    `<seg>` state and the reward worker's mask for it."""
    from PIL import Image

    from coreseg.reward.worker import LocalRewardWorker

    family = core.module.info.family
    inputs = core.module.processor(text=[family.prompt(sample.question) + completion],
                                   images=[Image.fromarray(sample.image)], return_tensors="pt")
    with torch.no_grad():
        ref = core.module.policy(**inputs, output_hidden_states=True)
    pos = (inputs["input_ids"][0] == core.module.info.seg_token_id).nonzero()[-1].item()
    state = ref.hidden_states[-1][0, pos].float()
    worker = LocalRewardWorker(core.cfg, state.shape[0])
    worker.load_weights(core.export_weights())
    return inputs, ref, state, worker.masks_for([sample.id], [sample.image], state[None])[0]


def test_export_loads_without_coreseg_and_matches_the_learner(trained, tiny_policy_dir, synth_samples, tmp_path):
    from coreseg.common.prompts import build_completion

    core, export = trained["core"], trained["export"]
    adapter_config = json.loads((export / "policy" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_policy_dir.resolve())
    sample = synth_samples[0]
    (tmp_path / "image.png").write_bytes(encode_png(sample.image))
    completion = build_completion(sample.reasoning, sample.category, sample.boxes)
    family = core.module.info.family
    inputs, ref, ref_state, ref_mask = _learner_reference(core, sample, completion)
    np.save(tmp_path / "state.npy", ref_state.numpy())

    job = {"image": str(tmp_path / "image.png"), "question": sample.question, "completion": completion,
           "learner_state": str(tmp_path / "state.npy"), "out": str(tmp_path / "out.npz")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "standalone.py").write_text(STANDALONE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, str(tmp_path / "standalone.py"), str(export), str(tmp_path / "job.json")],
                          cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert str(got["prompt"]) == family.prompt(sample.question)  # the chat template renders the trained prompt
    np.testing.assert_array_equal(got["input_ids"], inputs["input_ids"][0].numpy())
    np.testing.assert_allclose(got["logits"], ref.logits[0].float().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["state"], ref_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got["mask"], ref_mask)
    assert got["mask"].shape == sample.image.shape[:2]
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(str(export / "merged"), dtype=torch.float32)
    with torch.no_grad():  # base + LoRA merged: the learner's logits without peft
        np.testing.assert_allclose(merged(**inputs).logits[0].numpy(), ref.logits[0].float().numpy(), atol=1e-4,
                                   rtol=1e-4)
    assert int(got["prompt_len"]) < len(got["generated"]) <= int(got["prompt_len"]) + 4  # greedy generation runs


def test_export_refuses_what_it_cannot_export(tmp_path, tiny_policy_dir):
    from coreseg.deploy.export import ExportError, export_run

    with pytest.raises(ExportError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "out", str(tiny_policy_dir))
    (tmp_path / "run").mkdir()
    save_config(with_absolute_paths(load_config("tiny_cpu")), tmp_path / "run" / "config.yaml")
    with pytest.raises(ExportError, match="no checkpoints/latest"):
        export_run(tmp_path / "run", tmp_path / "out", str(tiny_policy_dir))
    with pytest.raises(ExportError, match="already exists"):
        export_run(tmp_path / "run", tmp_path / "run", str(tiny_policy_dir))
    assert not (tmp_path / "out").exists()


def test_predict_in_process_from_an_export_and_a_run_touches_nothing(trained, synth_samples, tmp_path):
    from PIL import Image

    from coreseg.common.prompts import build_completion
    from coreseg.deploy.cli import main
    from coreseg.deploy.infer import Predictor

    run, export = trained["run"], trained["export"]
    images = tmp_path / "images"
    images.mkdir()
    for s in synth_samples[:2]:
        (images / f"{s.id}.png").write_bytes(encode_png(s.image))
    before = _stamps(run), _stamps(export)
    main(["predict", "--export", str(export), "--image", str(images), "--question", synth_samples[0].question,
          "--out", str(tmp_path / "from_export")])
    main(["predict", "--run-dir", str(run), "--image", str(images / f"{synth_samples[0].id}.png"),
          "--question", synth_samples[0].question, "--out", str(tmp_path / "from_run")])
    assert (_stamps(run), _stamps(export)) == before
    from_export = [json.loads(line) for line in (tmp_path / "from_export" / "predictions.jsonl").open()]
    (from_run,) = [json.loads(line) for line in (tmp_path / "from_run" / "predictions.jsonl").open()]
    assert [Path(r["image"]).stem for r in from_export] == [s.id for s in synth_samples[:2]]
    for r, s in zip(from_export, synth_samples[:2]):
        assert np.asarray(Image.open(r["mask_path"])).shape == s.image.shape[:2]
        assert Path(r["mask_path"]).parent.name == s.id
    assert (tmp_path / "from_run" / "mask.png").exists() and (tmp_path / "from_run" / "overlay.png").exists()
    # greedy answers: the run folder and its export give the same one
    assert from_run["text"] == from_export[0]["text"] and from_run["mask_pixels"] == from_export[0]["mask_pixels"]

    # the `<seg>` path on an answer that has one: the learner's state and the reward worker's mask
    core, sample = trained["core"], synth_samples[1]
    completion = build_completion(sample.reasoning, sample.category, sample.boxes)
    inputs, _, _, ref_mask = _learner_reference(core, sample, completion)
    predictor = Predictor.from_run(trained["cfg"], run)
    enc = predictor.processor(text=[predictor.prompt(sample.question)], images=[Image.fromarray(sample.image)],
                              return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][:, :prompt_len], enc["input_ids"])  # the chat template's prompt
    mask = predictor.seg_mask(sample.image, enc, inputs["input_ids"])
    np.testing.assert_array_equal(mask, ref_mask)
    assert predictor.seg_mask(sample.image, enc, inputs["input_ids"][:, :prompt_len + 3]) is None  # no <seg>
