"""The same interface on transformers `generate`: for machines without vLLM and as the reference in tests.

LoRA versions are merged into the model's weights (W0 re-read from the checkpoint each time,
rollout/lora_merge.py) and the trained token rows written into the embeddings
(common/models/token_rows.py), so generation costs what the base model costs; peft's unmerged LoRA made it ~40%
slower on the small preset. Sampling log-probs are the raw (temperature-1, unprocessed) log-softmax of the
logits at each step, the same quantity vLLM reports and the learner recomputes."""
from __future__ import annotations

from typing import List, Sequence

import torch

from coreseg.common.devices import check_device
from coreseg.common.models.policy import default_dtype, load_policy
from coreseg.common.protocol import Completion, RolloutGroup, RolloutRequest, WeightBundle
from coreseg.common.seeding import derive_seed
from coreseg.rollout.engine import GenerationEngine, Sampling, as_sampling
from coreseg.common.models.token_rows import write_rows_torch
from coreseg.rollout.lora_merge import CheckpointReader, lora_deltas


class HFEngine(GenerationEngine):
    def __init__(self, cfg, policy_dir, device: str = "cpu"):
        super().__init__(cfg, policy_dir)
        self.device = check_device("rollout worker", device, "cluster.rollout_gpus_per_worker")
        self.model, _ = load_policy(self.policy_dir, default_dtype(cfg.model.dtype, self.device), self.device)
        self.model.eval()
        self.version = 0
        self.eos = self.info.end_of_turn_id
        self.pad = self.processor.tokenizer.pad_token_id
        self._checkpoint = CheckpointReader(self.policy_dir)

    def load_weights(self, bundle: WeightBundle) -> int:
        deltas = lora_deltas(bundle.lora, bundle.peft_config)
        params = dict(self.model.named_parameters())
        missing = [m for m in deltas if f"{m}.weight" not in params]
        if missing:
            raise KeyError(f"LoRA modules not in the policy: {missing[:3]}")
        with torch.no_grad():
            for module in deltas:  # one delta at a time (LoraDeltas computes each on read)
                weight = params[f"{module}.weight"]
                weight.copy_(self._checkpoint.merged(self._checkpoint.weight_key(module), deltas[module]).to(weight.dtype))
        if bundle.token_rows is not None:
            write_rows_torch(self.model, bundle.token_rows)
        self.version = bundle.version
        return self.version

    def sleep(self) -> None:
        """The model (with the current LoRA merged in) goes to host memory."""
        self.model.to("cpu")
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        self.model.to(self.device)

    @torch.no_grad()
    def _generate_one(self, image, prompt: str, n: int, sampling: Sampling):
        enc = self.processor(text=[prompt], images=[image], return_tensors="pt").to(self.device)
        greedy = sampling.temperature <= 0
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            **enc, do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None, max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n, eos_token_id=self.eos, pad_token_id=self.pad,
            suppress_tokens=list(self.info.vision_token_ids), output_logits=True, return_dict_in_generate=True)
        prompt_len = enc["input_ids"].shape[1]
        seqs = out.sequences[:, prompt_len:]
        logits = torch.stack(out.logits, dim=1).float()  # [n, steps, V] raw logits
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, :logits.shape[1]].unsqueeze(-1))[..., 0]
        return enc["input_ids"][0].tolist(), seqs.cpu(), logprobs.cpu()

    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling=None) -> List[RolloutGroup]:
        sampling = as_sampling(sampling, self.cfg)
        prepared = self.prepare(requests, sampling.max_new_tokens)
        groups = []
        for i, (req, prep) in enumerate(zip(requests, prepared)):
            if isinstance(prep, str):
                groups.append(RolloutGroup(req.sample_id, error=prep))
                continue
            seed = None if sampling.seed is None else derive_seed(sampling.seed, i)
            prompt_ids, seqs, logprobs = self._generate_one(
                prep[0], req.prompt, n, Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed))
            comps = []
            for row, lp in zip(seqs.tolist(), logprobs):
                if self.eos in row:  # generate pads a finished row after its end-of-turn token only
                    ids, reason = row[:row.index(self.eos) + 1], "stop"
                else:
                    ids, reason = row, "length"
                text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
                comps.append(Completion(text=text, prompt_token_ids=prompt_ids, token_ids=ids,
                                        logprobs=lp[:len(ids)].tolist(), finish_reason=reason, version=self.version))
            groups.append(RolloutGroup(req.sample_id, completions=comps))
        return groups
