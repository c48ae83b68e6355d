"""The config tree's schema: one dataclass per section, the allowed choices and the range rules.

`common.config` loads, validates and saves it; every key a user can set is declared here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from coreseg.common.images import DEFAULT_MAX_IMAGE_PIXELS
from coreseg.common.prompts import SYSTEM_PROMPT

class ConfigError(ValueError):
    """A config value is unknown, mistyped or out of range."""


@dataclass
class ModelConfig:
    # "tiny" / "small" build in-process (random weights, no download); "tiny-aligned" is "tiny" after a stand-in
    # alignment stage that trains all its weights on synthetic images of a seed no run's data uses
    # (common/models/align.py); anything else is a local folder.
    policy: str = "tiny"
    # tiny (in-process, random) | vit_b | vit_l | vit_h (SAM) | medsam (MedSAM vit_b); each with its own
    # preprocessing (common/models/sam.py)
    sam_type: str = "tiny"
    sam_checkpoint: str = ""  # local .pth or .safetensors; required by every type but tiny
    assets_dir: str = ".cache/coreseg"  # where tiny presets are built once and reused
    # Image budget of the policy's processor, in pixels: each image is resized (aspect kept) to at least
    # min_pixels and at most max_pixels before the vision tower; one vision token per 28x28 px for Qwen2.5-VL.
    # Passed identically to the vLLM engine, the transformers engine and the learner; 0 keeps the model
    # folder's own setting (a Qwen folder's default max_pixels is 12.8 MP, ~16k tokens).
    min_pixels: int = 0
    max_pixels: int = 0
    # The system turn of every prompt, rendered with the model folder's chat template (empty: no system turn,
    # the template's own default applies)
    system_prompt: str = SYSTEM_PROMPT
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter_queries: int = 4
    adapter_mlp_blocks: int = 2
    train_mask_decoder: bool = True
    # Train the embedding rows (input and output) of the tokens the project adds (`<seg>`): a real model keeps
    # them in spare rows pretraining never trained, which LoRA cannot move (common/models/token_rows.py).
    train_token_rows: bool = True


@dataclass
class DataConfig:
    path: str = "data/synth"  # folder of Parquet files (or one file)
    train_split: str = "train"
    eval_splits: List[str] = field(default_factory=lambda: ["val", "test_id", "test_ood"])
    batch_size: int = 4  # prompts per step
    shuffle_seed: int = 0
    skip_invalid: bool = False  # skip (and count) bad rows and unusable files instead of stopping
    # Images (and masks) above this many pixels are refused from their header, before decoding; see
    # common/images.py DEFAULT_MAX_IMAGE_PIXELS for why 4096*4096
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # `coreseg data synth`
    synth_samples: int = 240
    synth_image_size: int = 112
    synth_seed: int = 0
    synth_reasoning: str = "short"  # chain-of-thought style of the synthetic set: short | detailed
    # lesions: every lesion of an image is the target | referring: two lesions, the question asks for the larger
    # or the smaller one (the image alone does not say which mask is wanted; common/synth.py)
    synth_task: str = "lesions"


@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto (vllm when installed) | vllm | hf
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 200
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.5
    # Generate step t+1's rollouts while the learner trains step t (policy lag 1; the importance ratio is then
    # taken against the sampling log-probs). A step costs about max(rollout, learner) instead of their sum.
    async_generation: bool = False
    cpu_kv_cache_gb: int = 1  # CPU only: KV cache size of each vLLM engine
    # CPU only: cores vLLM keeps free of its OpenMP threads. vLLM's default reserves one per engine for a
    # separate scheduler process; ours runs in the actor's process, so 0 gives the model every core.
    cpu_reserved_cores: int = 0
    # CPU only: torch/OpenMP threads of each rollout worker; 0 = every core of its node (half with async_generation)
    cpu_threads: int = 0
    # vLLM KV-cache block size in tokens; 0 = 32 on CPU (see rollout/vllm_engine.py), vLLM's default on GPU
    block_size: int = 0
    # How vLLM serves the LoRA: `adapter` (a LoRA request per version), `merged` (W0 + scale*B@A written into
    # the engine's weights; CPU only, where vLLM's LoRA kernels are slow torch fallbacks), auto = merged on CPU
    lora_mode: str = "auto"
    # GPUs (one Ray bundle each) one vLLM engine shards its model over; > 1 runs vLLM's Ray executor in the
    # worker's bundles (cluster.rollout_gpus_per_worker must then equal it)
    tensor_parallel_size: int = 1
    seed: int = 0


@dataclass
class RewardConfig:
    # The terms summed into the reward (reward/terms.py): registered names (the paper's format, box, mask) or
    # import paths `package.module:function`, each logged as reward/<name>. Weights: w_format/w_box/w_mask for
    # the paper's terms, term_weights.<function name> (default 1) for the others.
    terms: List[str] = field(default_factory=lambda: ["format", "box", "mask"])
    term_weights: Dict[str, float] = field(default_factory=dict)
    w_format: float = 1.0
    w_box: float = 1.0
    w_mask: float = 1.0
    iou_threshold: float = 0.5  # tau: a matched box pair counts as a true positive at IoU >= tau
    dice_threshold: float = 0.05  # delta: below it the mask reward uses the GIoU of the boxes
    density_aware: bool = False  # delta grows for small lesions (see reward/rewards.py)
    density_ref_fraction: float = 0.05
    density_max_threshold: float = 0.3
    empty_mask_reward: float = -1.0
    cache_bytes: int = 256 * 1024 * 1024  # image-embedding LRU bound per worker
    embed_cache_path: str = ""  # optional safetensors file from `coreseg data embed`
    mask_threshold: float = 0.0  # logit threshold for binary masks


@dataclass
class LearnerConfig:
    # A registered estimator (grpo | dr_grpo) or an import path `package.module:function` (learner/registry.py)
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    # Remove groups whose G rewards are all equal from the batch before the update (they carry no gradient but
    # would still cost passes and count in the loss normalisers)
    drop_zero_variance: bool = False
    # DAPO dynamic sampling (needs drop_zero_variance): draw up to this many further prompt batches per step until
    # data.batch_size groups with reward variance remain; 0 = off
    dynamic_sampling_max_draws: int = 0
    # A registered policy loss (ppo_clip: the clipped surrogate with clip-higher) or an import path
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_beta: float = 0.01  # 0 switches the KL term off and skips the reference pass
    # KL reference: grpo_start = the policy when GRPO starts (after SFT; a LoRA-sized copy, ZeRO stage <= 2),
    # base = the base model with the LoRA switched off (no copy; right when GRPO starts from the base model)
    reference: str = "grpo_start"
    kl_estimator: str = "k3"  # k1 | k2 | k3
    mask_loss_weight: float = 1.0  # lambda for DiceCE
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    mask_loss_resolution: str = "low"  # low (SAM's low-res logits) | full (upsampled to the image)
    lr: float = 5e-4
    adapter_lr: float = 1e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    zero_stage: int = 2  # 0, 1 or 2 (ZeRO-3 is refused: see common/config.py)
    sft_lr: float = 1e-3
    # Learning-rate schedules (learner/schedule.py), over run.steps (GRPO) and run.sft_steps (SFT): constant |
    # linear | cosine after a linear warmup of N steps, decaying to lr_min_ratio x the base rate; the factor
    # scales both optimizer groups (LoRA and adapter/mask decoder)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    sft_lr_schedule: str = "constant"
    sft_lr_warmup_steps: int = 0
    lr_min_ratio: float = 0.0
    seed: int = 0
    # torch's deterministic kernels in the learner (common/seeding.py use_deterministic_kernels): runs of one seed
    # give the same weights bit for bit (on CPU they otherwise part from the second step); slower on some GPU ops
    deterministic: bool = False
    # Pack each micro-batch into one row without padding, a GRPO group's prompt (and image) once with its G
    # completions after it (learner/packed.py; same log-probs and gradients as one padded row per completion, at
    # P + G*C tokens per group instead of G*(P + C)); only for families that support it (Qwen2.5-VL), the others
    # keep the padded batch. false: one padded row per completion
    packed: bool = True
    gradient_checkpointing: bool = False  # recompute LM layer activations in backward (long sequences, big models)
    # LRU bound of the learner's SAM image embeddings (kept on the learner's device; a vit_b embedding of a 1024 px
    # image is 4 MiB in fp32): 1 GiB keeps 256 images, so a step's images are encoded once, not once per pass.
    # With learner.packed the frozen vision tower's outputs are kept in a second cache with the same bound
    embed_cache_bytes: int = 1 << 30
    # With several learner ranks, compare a digest of every rank's trainable weights after every N-th step and stop
    # with an error when they differ (a desync); 0 = never. Skipped under ZeRO-3 (ranks hold different partitions)
    sync_check_every: int = 1
    # How long a rank waits in a collective (gloo/NCCL) before failing, e.g. when a peer's host is lost; the driver
    # then rebuilds the learner group from the latest checkpoint (run.max_failures)
    collective_timeout_s: int = 600


@dataclass
class ClusterConfig:
    mode: str = "local"  # local (ray.init in-process) | cluster (address=auto)
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    learner_workers: int = 1
    learner_gpus: float = 0.0  # per learner worker
    # CPU only: torch threads of each learner worker; 0 = every core of its node (half with
    # rollout.async_generation, see `cpu_threads`)
    learner_cpu_threads: int = 0
    rollout_workers: int = 1
    rollout_gpus_per_worker: float = 0.0
    reward_workers: int = 2
    reward_gpus_per_worker: float = 0.0
    # One Ray placement group holds every actor (deploy/placement.py): how its bundles spread over nodes
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # How long to wait for the placement group; then the run fails naming what was asked and what the cluster has
    placement_timeout_s: float = 300.0
    # How long a pool waits for a dead rollout or reward worker that Ray restarts (a vLLM engine reloads its
    # weights on restart: minutes at real sizes or on a loaded node); then the run fails naming the worker
    recover_wait_s: float = 300.0
    # Rollout engines share the learner ranks' GPUs (engine w on ranks w*TP..w*TP+TP-1): vLLM sleeps (weights
    # to host memory, KV cache freed) while the learner works and wakes before generating. Needs
    # learner_gpus=1, rollout_gpus_per_worker=rollout.tensor_parallel_size, rollout_workers*TP=learner_workers.
    colocate: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = "tiny"
    sft_steps: int = 40
    steps: int = 10  # GRPO steps
    save_every: int = 5
    keep_checkpoints: int = 0  # only the newest N checkpoints stay in the run folder; 0 = all
    # Times a run rebuilds its learner group after losing a rank (or its node) and resumes from the latest
    # checkpoint before it gives up
    max_failures: int = 3
    eval_every: int = 5
    eval_samples: int = 32  # per split; 0 = the whole split
    # sampled completions written per GRPO step (with their rewards) to rollouts.jsonl and TensorBoard; 0 = none
    dump_rollouts: int = 4
    # samples per split whose predicted mask is drawn over the image at each eval (eval/<tag>_masks/, TensorBoard)
    eval_mask_images: int = 4
    # Eval answers are greedy; true: one answer per sample drawn as in training (rollout.temperature and top_p,
    # seeded by run.seed), written as eval/<tag>_sampled.*: what the rewards were optimised on, held out
    eval_sampled: bool = False
    seed: int = 0
    # Experiment trackers the driver also logs to (deploy/trackers.py; `pip install 'coreseg[tracking]'`): any of
    # "wandb", "mlflow". Each gets the metrics.jsonl scalars, the sampled completions, the eval masks and the config.
    trackers: List[str] = field(default_factory=list)
    tracker_project: str = "coreseg"  # the W&B project / the MLflow experiment
    tracker_run_name: str = ""  # "" = the run folder's name
    # "" = MLflow's own lookup (MLFLOW_TRACKING_URI, else its default)
    mlflow_tracking_uri: str = ""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)


_CHOICES = {
    "model.sam_type": ("tiny", "vit_b", "vit_l", "vit_h", "medsam"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.synth_reasoning": ("short", "detailed"),
    "data.synth_task": ("lesions", "referring"),
    "rollout.engine": ("auto", "vllm", "hf"),
    "rollout.lora_mode": ("auto", "adapter", "merged"),
    "learner.reference": ("grpo_start", "base"),
    "learner.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "learner.kl_estimator": ("k1", "k2", "k3"),
    "learner.mask_loss_resolution": ("low", "full"),
    "learner.lr_schedule": ("constant", "linear", "cosine"),
    "learner.sft_lr_schedule": ("constant", "linear", "cosine"),
    "cluster.mode": ("local", "cluster"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
TRACKERS = ("wandb", "mlflow")  # run.trackers: the experiment trackers deploy/trackers.py adapts
_POSITIVE = ("data.batch_size", "data.max_image_pixels", "rollout.group_size", "rollout.max_new_tokens",
             "rollout.max_model_len", "learner.micro_batch_size", "learner.lr", "learner.sft_lr",
             "learner.adapter_lr", "learner.adam_eps", "learner.collective_timeout_s", "cluster.learner_workers", "cluster.rollout_workers",
             "cluster.reward_workers", "model.lora_r", "model.adapter_queries", "reward.cache_bytes", "learner.embed_cache_bytes",
             "rollout.tensor_parallel_size", "cluster.placement_timeout_s",
             "cluster.recover_wait_s")
# 0 is meaningful for these (0 steps: skip the stage; 0 save/eval interval: never; 0 threads/block size: auto;
# temperature 0: greedy); a negative value is a mistake (save_every=-1 silently never saved)
_NON_NEGATIVE = ("run.sft_steps", "run.steps", "run.save_every", "run.keep_checkpoints", "run.max_failures", "run.eval_every",
                 "run.eval_samples", "run.dump_rollouts", "run.eval_mask_images",
                 "rollout.temperature", "rollout.cpu_threads", "rollout.cpu_reserved_cores", "rollout.block_size",
                 "rollout.cpu_kv_cache_gb", "learner.weight_decay", "learner.grad_clip", "learner.mask_loss_weight",
                 "learner.dice_weight", "learner.bce_weight", "cluster.learner_cpu_threads",
                 "data.synth_samples", "model.min_pixels", "model.max_pixels", "run.seed", "learner.seed", "rollout.seed", "data.shuffle_seed",
                 "data.synth_seed", "learner.sync_check_every", "learner.dynamic_sampling_max_draws",
                 "learner.lr_warmup_steps", "learner.sft_lr_warmup_steps")
