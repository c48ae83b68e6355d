"""`coreseg export`: the folder loads in a process without coreseg (plain transformers + peft + segment-anything)
and gives the learner's logits, `<seg>` state and the reward worker's mask."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.config import load_config, save_config, with_absolute_paths
from common.images import encode_png

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
from coreseg_segmenter import load_segmenter

policy = export + "/policy"
processor = AutoProcessor.from_pretrained(policy)
base = json.load(open(policy + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), policy)
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


def test_export_loads_without_coreseg_and_matches_the_learner(tiny_policy_dir, synth_samples, tmp_path):
    from PIL import Image

    from common.prompts import build_completion
    from deploy.cli import main
    from reward.worker import LocalRewardWorker
    from tests.test_learner import make_core

    core = make_core(tiny_policy_dir)
    batch = synth_samples[:4]
    for k in range(2):  # weights away from their initial values
        core.sft_step(batch, core.sft_norm(batch), step=k)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "grpo_000000_sft_000002"
    core.save_checkpoint(str(ckpt / "learner"))
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    cfg = with_absolute_paths(core.cfg)
    cfg.model.assets_dir = str(tiny_policy_dir.parent)
    save_config(cfg, run / "config.yaml")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    main(["export", str(run), "--base", str(tiny_policy_dir), "--out", str(tmp_path / "export")])
    export = tmp_path / "export"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run folder is only read
    adapter_config = json.loads((export / "policy" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_policy_dir.resolve())

    sample = synth_samples[0]
    (tmp_path / "image.png").write_bytes(encode_png(sample.image))
    completion = build_completion(sample.reasoning, sample.category, sample.boxes)
    family = core.module.info.family
    # the learner's view of the same text: its in-memory peft model on the processor's inputs
    inputs = core.module.processor(text=[family.prompt(sample.question) + completion],
                                   images=[Image.fromarray(sample.image)], return_tensors="pt")
    with torch.no_grad():
        ref = core.module.policy(**inputs, output_hidden_states=True)
    pos = (inputs["input_ids"][0] == core.module.info.seg_token_id).nonzero()[-1].item()
    ref_state = ref.hidden_states[-1][0, pos].float()
    np.save(tmp_path / "state.npy", ref_state.numpy())
    worker = LocalRewardWorker(core.cfg, ref_state.shape[0])
    worker.load_weights(core.export_weights())
    ref_mask = worker.masks_for([sample.id], [sample.image], ref_state[None])[0]

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
    assert int(got["prompt_len"]) < len(got["generated"]) <= int(got["prompt_len"]) + 4  # greedy generation runs


def test_export_refuses_what_it_cannot_export(tmp_path, tiny_policy_dir):
    from deploy.export import ExportError, export_run

    with pytest.raises(ExportError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "out", str(tiny_policy_dir))
    (tmp_path / "run").mkdir()
    save_config(with_absolute_paths(load_config("tiny_cpu")), tmp_path / "run" / "config.yaml")
    with pytest.raises(ExportError, match="no checkpoints/latest"):
        export_run(tmp_path / "run", tmp_path / "out", str(tiny_policy_dir))
    with pytest.raises(ExportError, match="already exists"):
        export_run(tmp_path / "run", tmp_path / "run", str(tiny_policy_dir))
    assert not (tmp_path / "out").exists()
