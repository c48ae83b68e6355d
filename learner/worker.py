"""LearnerCore (a DeepSpeed engine around the trainable module) and LearnerWorker, its Ray actor. Losses are
normalised by global counts computed before the batch is split (learner/group.py), so any number of ranks
and micro-batches gives the same update. A rank trains the rows of its `RankLayout` (learner/balance.py): every
rank runs as many micro-batches, and every backward reaches every trainable parameter, so the ranks' gradient
reductions match whatever their data."""
from __future__ import annotations

import importlib
import os
import socket
import zlib
from datetime import timedelta
from typing import Dict, List, Sequence, Tuple

import numpy as np
import ray
import torch

from coreseg.common.actor_pool import current_node_id
from coreseg.common.config import TrainConfig, cpu_threads
from coreseg.common.data import LesionSample
from coreseg.common.devices import check_device, role_device
from coreseg.common.policy_store import stage_policy
from coreseg.common.protocol import Completion, ForwardResult, RolloutGroup, WeightBundle
from coreseg.common.seeding import use_deterministic_kernels
from coreseg.learner.balance import (RankLayout, completion_costs, flatten_rows, merge_forward, prompt_groups,
                             rank_layouts)
from coreseg.learner.batch import PromptEncoder, build_batch, per_completion, zero_padding_rows
from coreseg.learner.packed import build_packed
from coreseg.learner.grpo import LossNorm, combine_stats, grpo_loss, loss_norm
from coreseg.learner.losses import dice_ce_loss
from coreseg.learner.schedule import heads_lr, lr_factor
from coreseg.learner.sft import sft_loss, sft_target_ids


def _place(values: Sequence[np.ndarray], batch, device, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Per-completion arrays -> [B, T] tensor at the completion positions of `batch` (rows: which rows the
    arrays belong to, default all in order; the other rows stay 0)."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32)
    for i, v in zip(range(len(values)) if rows is None else rows, values):
        p = batch.prompt_lens[i]
        if len(v) != batch.completion_lens[i]:
            raise ValueError(f"completion {i}: {len(v)} log-probs for {batch.completion_lens[i]} tokens")
        out[i, p:p + len(v)] = torch.as_tensor(np.asarray(v, dtype=np.float32))
    return out.to(device)


def _forget_destroyed_world_clone() -> None:
    """DeepSpeed caches a clone of the world process group (deepspeed.utils.groups._WORLD_GROUP) the first time a
    process initialises an engine. An in-process vLLM engine destroys every process group when it shuts down, so
    a learner built later in the same process (a local Driver after another one) would find that clone
    unregistered ("Group ... is not registered"); forget it, and DeepSpeed clones the new world group."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    clone = getattr(groups, "_WORLD_GROUP", None)
    if clone is None:
        return
    try:
        dist.get_process_group_ranks(clone)
    except (KeyError, ValueError, RuntimeError):
        groups._WORLD_GROUP = None


class LearnerCore:
    def __init__(self, cfg: TrainConfig, policy_dir: str, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        import deepspeed

        from coreseg.learner.model import CoreSegModule

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.cfg, self.rank, self.world = cfg, rank, world_size
        # the configured device (Ray makes the rank's assigned GPU cuda:0), never whatever the process can see
        device = check_device("learner", role_device(cfg.cluster.learner_gpus), "cluster.learner_gpus")
        on_gpu = device == "cuda"
        if cfg.learner.deterministic:
            use_deterministic_kernels(on_gpu)
        if not on_gpu:
            torch.set_num_threads(cpu_threads(cfg, "learner", len(os.sched_getaffinity(0))))
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU here (minutes, under a file lock that a
            # killed process leaves behind); gloo's own collectives are all the learner needs.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # a rank whose peer died waits in a collective at most this long (the driver then rebuilds the group)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=cfg.learner.collective_timeout_s))
        _forget_destroyed_world_clone()
        self.module = CoreSegModule(cfg, stage_policy(policy_dir), device)  # on this node's disk
        lora, heads = self.module.param_groups()
        L = cfg.learner
        optimizer = torch.optim.AdamW([{"params": lora, "lr": L.lr}, {"params": heads, "lr": L.adapter_lr}],
                                      weight_decay=L.weight_decay, eps=L.adam_eps)
        ds_config = {"train_micro_batch_size_per_gpu": L.micro_batch_size, "gradient_accumulation_steps": 1,
                     "train_batch_size": L.micro_batch_size * world_size, "gradient_clipping": L.grad_clip,
                     "zero_optimization": {"stage": L.zero_stage}, "bf16": {"enabled": on_gpu},
                     "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=ds_config)
        self.device = device
        self.encoder = PromptEncoder(self.module.processor, self.module.info.family, cfg.model.system_prompt)
        self.pad_id = self.module.processor.tokenizer.pad_token_id
        self.version = 0

    # -- helpers ------------------------------------------------------------------------------------
    def _set_lr(self, stage: str, step: int) -> float:
        """Both optimizer groups' learning rates at 0-based `step` of `stage` (sft | grpo): the stage's base rates
        (LoRA: learner.sft_lr or learner.lr; adapter and mask decoder: `heads_lr`) times the stage's
        schedule factor. Returns the LoRA group's rate."""
        L = self.cfg.learner
        if stage == "sft":
            factor = lr_factor(step, self.cfg.run.sft_steps, L.sft_lr_schedule, L.sft_lr_warmup_steps, L.lr_min_ratio)
            base = L.sft_lr
        else:
            factor = lr_factor(step, self.cfg.run.steps, L.lr_schedule, L.lr_warmup_steps, L.lr_min_ratio)
            base = L.lr
        for group, lr in zip(self.optimizer.param_groups, (base, heads_lr(L))):
            group["lr"] = lr * factor
        return base * factor

    def _layout(self, costs: Sequence[float], groups=None) -> RankLayout:
        """This rank alone on a whole batch (the in-process API: `forward`, `update`, `sft_step`)."""
        return rank_layouts(costs, 1, self.cfg.learner.micro_batch_size, groups)[0]

    def _grpo_layout(self, rows: Sequence[LesionSample], comps: Sequence[Completion]) -> RankLayout:
        labels = prompt_groups(rows, comps) if self.module.packed else None
        return self._layout(completion_costs(comps, self.module.packed, labels), labels)

    def packs(self) -> bool:
        """Whether this rank runs packed batches (learner.packed and a family that supports them)."""
        return self.module.packed

    def _batch(self, samples: Sequence[LesionSample], completions: Sequence[Completion], real=None):
        """The policy batch of these completions, on the prompt ids their rollout engine returned; `real`: False
        for a padding row, whose completion mask is zeroed (loss weight 0, no `<seg>` found)."""
        return self._rows_batch(samples, [c.token_ids for c in completions], [c.prompt_token_ids for c in completions],
                                real)

    def _rows_batch(self, samples, completions, prompt_ids=None, real=None):
        """A packed batch (learner/packed.py) when the module packs and every completion has a token (an empty
        one has nothing to pack; the padded batch then computes the same values), else the padded batch."""
        if self.module.packed and all(len(c) for c in completions):
            batch = build_packed(self.encoder, samples, completions, self.module.prompt_positions, prompt_ids)
        else:
            batch = build_batch(self.encoder, samples, completions, self.pad_id, prompt_ids)
        return zero_padding_rows(batch, real)

    def _dice_sum(self, states: torch.Tensor, found: torch.Tensor, samples: Sequence[LesionSample]) -> torch.Tensor:
        """Summed DiceCE over the completions that produced a `<seg>` (the others are excluded). The term always
        runs through the adapter and mask decoder, so every rank reduces the same gradients in every backward
        (ZeRO): with no `<seg>` in the micro-batch, or the mask loss off, it is the first row's DiceCE times 0."""
        L = self.cfg.learner
        used = bool(found.any()) and L.mask_loss_weight > 0
        idx = found.nonzero(as_tuple=True)[0] if used else torch.zeros(1, dtype=torch.long, device=found.device)
        total = torch.zeros((), device=self.device)
        for logits, target in self.module.mask_loss_pair(states[idx], [samples[int(i)] for i in idx]):
            mean_loss, _ = dice_ce_loss(logits, target, L.dice_weight, L.bce_weight)
            total = total + mean_loss * (logits.shape[0] if used else 0.0)
        return total

    def _behaviour_logprobs(self, logp: torch.Tensor, batch, completions: Sequence[Completion]) -> torch.Tensor:
        """The log-probs the importance ratio is taken against, [B, T]. A completion sampled by the current
        version is on-policy: its old log-probs are the update's own, detached, so the ratio is exactly 1 (the
        same dropout mask, the same kernels). One sampled by an older version (async generation) uses the
        sampling log-probs its engine returned."""
        old = logp.detach().clone()
        stale = [i for i, c in enumerate(completions) if c.version != self.version]
        if stale:
            sampled = _place([completions[i].logprobs for i in stale], batch, self.device, rows=stale)
            rows = torch.as_tensor(stale, device=self.device)
            old[rows] = torch.where(batch.completion_mask[stale].to(self.device).bool(), sampled[rows], old[rows])
        return old

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)  # DeepSpeed averages over ranks

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, groups: List[RolloutGroup], samples: List[LesionSample]) -> ForwardResult:
        """`forward_rows` of this rank alone on the whole batch."""
        rows, comps = flatten_rows(groups, samples)
        layout = self._grpo_layout(rows, comps)
        out = self.forward_rows([rows[i] for i in layout.rows], [comps[i] for i in layout.rows], layout)
        return merge_forward([layout], [out])

    @torch.no_grad()
    def forward_rows(self, samples: List[LesionSample], completions: List[Completion],
                     layout: RankLayout) -> ForwardResult:
        """The policy's log-probs and `<seg>` states of each row of `layout` (padding rows included; the caller
        drops them) + reference log-probs when kl_beta > 0, in eval mode (no dropout). The update does not use
        these log-probs as its old log-probs (see `_behaviour_logprobs`): with LoRA dropout, eval-mode old
        log-probs would make the on-policy ratio != 1."""
        logps, ref, states, found = [], [], [], []
        with_ref = self.cfg.learner.kl_beta > 0  # at beta = 0 the reference pass is skipped: ref stays []
        if with_ref and self.cfg.learner.reference == "grpo_start" and self.module.reference_lora is None:
            self.module.snapshot_reference()  # the first GRPO pass: the policy as SFT left it
        self.engine.eval()
        batches = [self._batch(samples[a:b], completions[a:b]) for a, b in layout.micro]
        for batch in batches:
            logp, st, fd = self.module.policy_pass(batch)
            logps += [x.float().cpu().numpy() for x in per_completion(logp, batch)]
            states.append(st.float().cpu().numpy())
            found.append(fd.cpu().numpy())
        if with_ref:
            with self.module.reference_policy():
                for batch in batches:
                    logp = self.module.policy_pass(batch, with_hidden=False)[0]
                    ref += [x.float().cpu().numpy() for x in per_completion(logp, batch)]
        return ForwardResult(logps, ref, np.concatenate(states), np.concatenate(found))

    # -- GRPO update --------------------------------------------------------------------------------
    def update(self, groups, samples, advantages: np.ndarray, ref: List[np.ndarray], norm: LossNorm,
               step: int = 0) -> Dict[str, float]:
        """`update_rows` of this rank alone on the whole batch, at 0-based GRPO `step` (the lr schedule's)."""
        rows, comps = flatten_rows(groups, samples)
        if len(advantages) != len(comps):
            raise ValueError(f"{len(advantages)} advantages for {len(comps)} completions")
        layout = self._grpo_layout(rows, comps)
        pick = list(layout.rows)
        return self.update_rows([rows[i] for i in pick], [comps[i] for i in pick], np.asarray(advantages)[pick],
                                [ref[i] for i in pick] if len(ref) else [], layout, norm, step)

    def update_rows(self, samples: List[LesionSample], completions: List[Completion], advantages: np.ndarray,
                    ref: List[np.ndarray], layout: RankLayout, norm: LossNorm, step: int = 0) -> Dict[str, float]:
        """One optimizer step on this rank's rows (one entry per row of `layout`, padding rows included); `norm`
        holds the whole batch's normalisers. The loss is `learner.grpo.grpo_loss`, per micro-batch; a padding row
        has its completion mask zeroed, so it adds nothing but keeps the step's collectives the same on every rank."""
        L = self.cfg.learner
        if not len(advantages) == len(completions) == len(samples) == len(layout.rows):
            raise ValueError(f"{len(samples)} samples, {len(completions)} completions and {len(advantages)} "
                             f"advantages for a layout of {len(layout.rows)} rows")
        lr = self._set_lr("grpo", step)
        self.engine.train()
        with_kl = L.kl_beta > 0
        if with_kl and len(ref) != len(completions):
            raise ValueError(f"kl_beta={L.kl_beta} needs reference log-probs for all {len(completions)} completions, "
                             f"got {len(ref)}")
        shards = []
        for k, (a, b) in enumerate(layout.micro):
            batch = self._batch(samples[a:b], completions[a:b], layout.real[a:b])
            logp, states, found = self.module.policy_pass(batch)
            adv = torch.as_tensor(advantages[a:b], dtype=torch.float32, device=self.device)
            loss, stats = grpo_loss(logp, self._behaviour_logprobs(logp, batch, completions[a:b]),
                                    _place(ref[a:b], batch, self.device) if with_kl else None, adv,
                                    batch.completion_mask.to(self.device), cfg=L,
                                    max_len=self.cfg.rollout.max_new_tokens,
                                    dice_sum=self._dice_sum(states, found, samples[a:b]), norm=norm)
            self._backward(loss, k == len(layout.micro) - 1)
            shards.append(stats)
        return {**combine_stats(shards), **self._finish_step(lr)}

    def _finish_step(self, lr: float) -> Dict[str, float]:
        """The optimizer step; its grad norm and lr, and every `learner.sync_check_every` versions (several ranks,
        ZeRO <= 2, where every rank holds all trainable weights) the digest the group compares across ranks."""
        self.engine.step()
        self.version += 1
        out = {"grad_norm": float(self.engine.get_global_grad_norm() or 0.0), "lr": lr}
        every = self.cfg.learner.sync_check_every
        if self.world > 1 and every and self.version % every == 0 and self.cfg.learner.zero_stage < 3:
            out["weights_digest"] = float(self.weights_digest())
        return out

    def weights_digest(self) -> int:
        """CRC32 of every trainable tensor's bytes, in name order: equal on two ranks iff their weights are."""
        digest = 0
        for name, p in sorted(self.module.named_parameters()):
            if p.requires_grad:
                digest = zlib.crc32(p.detach().float().cpu().contiguous().numpy().tobytes(), digest)
        return digest

    # -- SFT ----------------------------------------------------------------------------------------
    def sft_step(self, samples: List[LesionSample], norm: LossNorm, step: int = 0) -> Dict[str, float]:
        """`sft_rows` of this rank alone on the whole batch, at 0-based SFT `step` (the lr schedule's)."""
        layout = self._layout([p + t for p, t in self.sft_lengths(samples)])
        return self.sft_rows([samples[i] for i in layout.rows], layout, norm, step)

    def sft_rows(self, samples: List[LesionSample], layout: RankLayout, norm: LossNorm,
                 step: int = 0) -> Dict[str, float]:
        """One SFT optimizer step on this rank's rows (padding rows included, as in `update_rows`) at 0-based SFT
        `step`."""
        L = self.cfg.learner
        if len(samples) != len(layout.rows):
            raise ValueError(f"{len(samples)} samples for a layout of {len(layout.rows)} rows")
        tok = self.module.processor.tokenizer
        comps = [sft_target_ids(tok, s, self.module.info.family) for s in samples]
        lr = self._set_lr("sft", step)
        self.engine.train()
        shards = []
        for k, (a, b) in enumerate(layout.micro):
            batch = self._rows_batch(samples[a:b], comps[a:b], real=layout.real[a:b])
            logp, states, found = self.module.policy_pass(batch)
            loss, stats = sft_loss(logp, batch.completion_mask, self._dice_sum(states, found, samples[a:b]), norm,
                                   L.mask_loss_weight)
            self._backward(loss, k == len(layout.micro) - 1)
            shards.append(stats)
        return {**combine_stats(shards), **self._finish_step(lr)}

    def sft_lengths(self, samples: List[LesionSample]) -> List[Tuple[int, int]]:
        """(prompt tokens, target tokens) of each SFT sample: the target tokens normalise the loss, their sum with
        the prompt's is the row's cost when the batch is balanced over ranks."""
        tok = self.module.processor.tokenizer
        return [(int(self.encoder.encode(s)["input_ids"].shape[1]),
                 len(sft_target_ids(tok, s, self.module.info.family))) for s in samples]

    def sft_norm(self, samples: List[LesionSample]) -> LossNorm:
        """The SFT batch's normalisers: its target tokens, and one mask target per sample."""
        tok = self.module.processor.tokenizer
        return loss_norm([len(sft_target_ids(tok, s, self.module.info.family)) for s in samples], len(samples),
                         "token_mean")

    # -- weights / checkpoints ----------------------------------------------------------------------
    def export_weights(self) -> WeightBundle:
        return self.module.bundle(self.version)

    def set_version(self, version: int) -> int:
        """Renumber the current weights (after a recovery, so versions keep increasing for the workers)."""
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def save_checkpoint(self, path: str) -> None:
        """This rank's part of a checkpoint into `path` (a folder every node sees, or a URI: written on local
        disk, then uploaded by this rank)."""
        from coreseg.common.storage import writable_folder
        from coreseg.learner.checkpoint import save_learner
        with writable_folder(path) as folder:
            save_learner(self, str(folder))

    def load_checkpoint(self, path: str) -> None:
        from coreseg.common.storage import staged_copy
        from coreseg.learner.checkpoint import load_learner
        load_learner(self, str(staged_copy(path)))  # a URI: downloaded once to this node's staging folder


class LearnerWorker(LearnerCore):
    """Built in two steps so that rank 0's own node supplies the rendezvous address: the group asks rank 0
    for its IP and a free port there, then every rank joins (an address picked on the driver's node can be
    unreachable, or taken, on the learners' nodes)."""

    def __init__(self, cfg: TrainConfig, policy_dir: str, rank: int, world_size: int):
        self._args = (cfg, policy_dir, rank, world_size)

    def node_id(self) -> str:
        return current_node_id()

    def rendezvous_address(self):
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        LearnerCore.__init__(self, *self._args, master_addr=master_addr, master_port=master_port)
        return self.version

    @ray.method(num_returns=3)
    def export_parts(self):
        """(sizes, rollout part, reward part) as three objects, so each pool fetches only its part straight from
        this actor's object store, without a round trip through the driver."""
        bundle = self.export_weights()
        rollout, reward = bundle.rollout_part(), bundle.reward_part()
        return ({"version": bundle.version, "rollout_bytes": rollout.num_bytes(), "reward_bytes": reward.num_bytes()},
                rollout, reward)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
