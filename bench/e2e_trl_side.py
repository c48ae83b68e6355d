"""The TRL side of bench/e2e_vs_trl.py: TRL's GRPOTrainer (HF generate, float32 on CPU, LoRA through
`peft_config`) on the same policy folder, image budget, samples, reward and settings as our driver.

Phase times (instrumentation only, nothing in TRL's computation changes): generation by wrapping the trainer's
`_generate_single_turn`; the reward inside our reward function; the log-prob passes by wrapping
`_get_per_token_logps_and_entropies` (no-grad = the reference pass, with grad = the loss's forward). What is
left of a step after generation and reward is TRL's learner (reference pass, loss forward, backward, optimizer).
"""
from __future__ import annotations

import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}


class SegReward:
    """TRL reward function: `<seg>` states from the trained model, then our segmenter and reward functions."""
    __name__ = "coreseg_reward"

    def __init__(self, cfg, policy_dir, processor, samples):
        import torch

        from coreseg.common.models.policy import policy_info
        from coreseg.deploy.driver import llm_hidden_size
        from coreseg.learner.batch import PromptEncoder
        from coreseg.reward.worker import LocalRewardWorker

        info = policy_info(policy_dir)
        self.cfg, self.samples, self.model = cfg, {s.id: s for s in samples}, None
        self.encoder, self.tokenizer = PromptEncoder(processor, info.family), processor.tokenizer
        self.seg_id = info.seg_token_id
        # num_threads = the current count: LocalRewardWorker sets torch's thread count for the process
        self.worker = LocalRewardWorker(cfg, llm_hidden_size(policy_dir), num_threads=torch.get_num_threads())
        self.log = []

    def __call__(self, prompts, completions, completion_ids, sample_id, **_):
        import numpy as np
        import torch

        from coreseg.common.models.policy import gather_seg_states
        from coreseg.common.protocol import ScoreItem
        from coreseg.learner.batch import build_batch

        t0 = time.perf_counter()
        samples = [self.samples[i] for i in sample_id]
        mb, states, found = self.cfg.learner.micro_batch_size, [], []
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for a in range(0, len(samples), mb):
                batch = build_batch(self.encoder, samples[a:a + mb], completion_ids[a:a + mb],
                                    self.tokenizer.pad_token_id)
                out = self.model(**batch.model_inputs("cpu"), output_hidden_states=True, use_cache=False,
                                 logits_to_keep=1)
                st, fd = gather_seg_states(out.hidden_states[-1], batch.input_ids, self.seg_id, batch.completion_mask)
                states.append(st.float().numpy())
                found.append(fd.numpy())
        self.model.train(training)
        states, found = np.concatenate(states), np.concatenate(found)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # as our rollout engines
        items = [ScoreItem(s.id, t, states[k] if found[k] else None, s.image, s.masks, s.boxes)
                 for k, (s, t) in enumerate(zip(samples, texts))]
        scores = self.worker.score(items)
        self.log.append({"found": float(found.mean()), "reward": float(np.mean([s.total for s in scores])),
                         "tokens": float(np.mean([len(c) for c in completion_ids])),
                         "reward_s": time.perf_counter() - t0})
        return [s.total for s in scores]


def trl_phases(step_s, gen_s, reward_s, ref_s, loss_fwd_s) -> dict:
    """Mean seconds per step of TRL's phases from per-step lists (same steps, same order). learner = what is
    left of the step after generation and reward; ref_forward and loss_forward are parts of it, and
    backward_optimizer is the learner's rest."""
    n = len(step_s)
    if not n or any(len(x) != n for x in (gen_s, reward_s, ref_s, loss_fwd_s)):
        raise ValueError(f"per-step lists differ in length: step {n}, generate {len(gen_s)}, reward "
                         f"{len(reward_s)}, ref {len(ref_s)}, loss forward {len(loss_fwd_s)}")
    learner = [s - g - r for s, g, r in zip(step_s, gen_s, reward_s)]
    return {"generate": statistics.mean(gen_s), "reward": statistics.mean(reward_s),
            "learner": statistics.mean(learner), "ref_forward": statistics.mean(ref_s),
            "loss_forward": statistics.mean(loss_fwd_s),
            "backward_optimizer": statistics.mean(l - a - b for l, a, b in zip(learner, ref_s, loss_fwd_s))}


def run_trl(cfg, args, samples) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from coreseg.common.models.family import model_family
    from coreseg.common.models.lora import make_lora_config
    from coreseg.common.models.policy import default_dtype, ensure_policy_dir, load_policy
    from coreseg.common.prompts import SYSTEM_PROMPT, build_user_text

    torch.set_num_threads(args.trl_threads or torch.get_num_threads())
    B, G, L = cfg.data.batch_size, cfg.rollout.group_size, cfg.learner
    total = args.warmup + args.steps
    prompts = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": build_user_text(s.question)}]
               for s in samples]
    images = [Image.fromarray(s.image) for s in samples]
    policy_dir = ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    shutil.rmtree(run_dir, ignore_errors=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())

    t0 = time.perf_counter()
    # the same image budget as our learner and rollout engines (model.min_pixels / model.max_pixels)
    model, processor = load_policy(policy_dir, default_dtype(cfg.model.dtype, "cpu"), "cpu",
                                   cfg.model.min_pixels, cfg.model.max_pixels)
    rendered = processor.apply_chat_template(prepare_multimodal_messages(prompts[0], images=images[:1]),
                                             add_generation_prompt=True, tokenize=False)
    family = model_family(policy_dir)
    assert rendered == family.prompt(samples[0].question), f"prompt differs:\n{rendered!r}"
    reward = SegReward(cfg, policy_dir, processor, samples)
    config = GRPOConfig(
        output_dir=str(run_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=cfg.run.seed, max_steps=total, shuffle_dataset=False,
        per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, use_vllm=False, learning_rate=L.lr, lr_scheduler_type="constant",
        weight_decay=L.weight_decay, adam_epsilon=L.adam_eps, max_grad_norm=L.grad_clip, beta=L.kl_beta,
        epsilon=L.clip_low, epsilon_high=L.clip_high, loss_type=LOSS_TYPE[L.loss_agg], use_bias_correction_kl=False,
        scale_rewards="none" if L.advantage == "dr_grpo" else "group",
        gradient_checkpointing=L.gradient_checkpointing, remove_unused_columns=False, dataloader_num_workers=0)
    data = Dataset.from_dict({"prompt": prompts, "image": images, "sample_id": [s.id for s in samples]})
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=processor, peft_config=make_lora_config(cfg.model, family), callbacks=[timer])
    reward.model = trainer.model
    gen_s, prompt_tokens, generate = [], [], trainer._generate_single_turn
    logps_s = {False: defaultdict(float), True: defaultdict(float)}  # grad enabled -> step -> seconds
    logps = trainer._get_per_token_logps_and_entropies

    def timed_generate(prompt_ids, *a, **k):  # instrumentation only: generation seconds and prompt lengths
        g0 = time.perf_counter()
        out = generate(prompt_ids, *a, **k)
        gen_s.append(time.perf_counter() - g0)
        prompt_tokens.extend(len(p) for p in prompt_ids)
        return out

    def timed_logps(*a, **k):  # instrumentation only: reference pass (no grad) and loss forward (grad)
        g0 = time.perf_counter()
        out = logps(*a, **k)
        logps_s[torch.is_grad_enabled()][trainer.state.global_step] += time.perf_counter() - g0
        return out

    trainer._generate_single_turn = timed_generate
    trainer._get_per_token_logps_and_entropies = timed_logps
    startup = time.perf_counter() - t0
    trainer.train()
    ends = timer.end
    step_s = [ends[k] - (ends[k - 1] if k else timer.begin[0]) for k in range(len(ends))][args.warmup:]
    log = reward.log[args.warmup:]
    timed = range(args.warmup, total)
    return {"startup_s": startup, "step_s": step_s, "completions": [B * G] * len(step_s),
            "seg_found": statistics.mean(x["found"] for x in log), "reward": statistics.mean(x["reward"] for x in log),
            "mean_tokens": statistics.mean(x["tokens"] for x in log), "threads": torch.get_num_threads(),
            "trl": trl.__version__, "prompt_tokens": statistics.mean(prompt_tokens),
            "phases": trl_phases(step_s, gen_s[args.warmup:], [x["reward_s"] for x in log],
                                 [logps_s[False][k] for k in timed], [logps_s[True][k] for k in timed])}
