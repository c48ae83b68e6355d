"""One typed config tree: dataclasses + OmegaConf structured configs.

`load_config(presets, overrides)` merges dataclass defaults <- YAML presets (in order; later wins) <- dotted
overrides; unknown keys and wrong types fail at start with a `ConfigError` naming the key and the file.

A YAML may extend others with a top-level `defaults:` (a preset name or a path relative to that YAML, or a list of
them): its parents are merged first, so a user file can hold only what it changes, e.g.

    defaults: qwen25vl_3b
    data: {path: /data/kvasir}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coreseg.common.config_schema import (  # noqa: F401  (re-exported: the config API is common.config)
    ConfigError, ModelConfig, DataConfig, RolloutConfig, RewardConfig,
    LearnerConfig, ClusterConfig, RunConfig, TrainConfig, TRACKERS, _CHOICES, _POSITIVE, _NON_NEGATIVE)

PRESET_DIR = Path(__file__).resolve().parent.parent / "deploy" / "configs"
DEFAULT_PRESET = "tiny_cpu"


def resolve_preset(preset: str, relative_to: Path | None = None) -> Path:
    """A preset name (`tiny_cpu`) or a path to a YAML file (relative paths against `relative_to`, default the
    current directory)."""
    path = Path(preset).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = PRESET_DIR / f"{preset}.yaml"
    if named.exists():
        return named
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config preset '{preset}' not found (a YAML path or one of {known})")


def _error_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    return str(key)


def preset_layers(preset: str, relative_to: Path | None = None, chain: tuple = ()) -> list:
    """[(path, tree)] of `preset` and, first, every YAML its `defaults:` names (depth first, in order); each
    tree without its `defaults` key. A cycle is a ConfigError naming the files."""
    path = resolve_preset(preset, relative_to).resolve()
    if path in chain:
        raise ConfigError("config 'defaults' cycle: " + " -> ".join(str(p) for p in (*chain, path)))
    try:
        tree = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: name the file
        raise ConfigError(f"config file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"config file {path}: must hold a mapping of sections (model:, data:, ...)")
    parents = tree.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, ListConfig | list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"config file {path}: 'defaults' must be a preset name, a YAML path or a list of them")
    layers = []
    for parent in parents:
        layers += preset_layers(parent, path.parent, (*chain, path))
    return layers + [(path, tree)]


def load_config(preset: str | Sequence[str] | None = DEFAULT_PRESET, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- preset YAML(s) (each after the presets its `defaults:` names; later ones win) <- `a.b=value`
    overrides, validated."""
    presets = [preset] if isinstance(preset, str) else list(preset or [])
    merged = OmegaConf.structured(TrainConfig)
    source = "override"
    try:
        for name in presets:
            for path, tree in preset_layers(name):
                source = str(path)
                merged = OmegaConf.merge(merged, tree)
        source = "override"
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} must look like section.key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        where = "" if source == "override" else f" (in {source})"
        raise ConfigError(f"config key '{_error_key(err)}'{where}: {reason}") from None
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for dotted, choices in _CHOICES.items():
        value = get_value(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}' = {value!r}: must be one of {choices}")
    for dotted in _POSITIVE:
        if get_value(cfg, dotted) <= 0:
            raise ConfigError(f"config key '{dotted}' = {get_value(cfg, dotted)!r}: must be > 0")
    for dotted in _NON_NEGATIVE:
        if get_value(cfg, dotted) < 0:
            raise ConfigError(f"config key '{dotted}' = {get_value(cfg, dotted)!r}: must be >= 0")
    if cfg.run.steps > 0 and cfg.rollout.group_size < 2:
        raise ConfigError(f"config key 'rollout.group_size' = {cfg.rollout.group_size}: GRPO needs >= 2 completions "
                          "per prompt (a group of 1 has advantage 0: the loss is 0 and nothing trains); "
                          "set run.steps=0 for SFT only")
    if not 0 <= cfg.learner.clip_low < 1 or cfg.learner.clip_high < 0:
        raise ConfigError("config keys 'learner.clip_low' in [0, 1) and 'learner.clip_high' >= 0")
    if cfg.learner.zero_stage == 3:
        raise ConfigError(
            "config key 'learner.zero_stage' = 3 is not supported: ZeRO-3 gathers each module's partitioned weights "
            "with collectives when the module runs, so every rank must run the same modules in the same order, but "
            "ranks run SAM's image encoder only for images missing from their embedding cache and the mask decoder "
            "once per distinct image (a 2-rank run fails with a gloo size mismatch; NCCL would hang), and "
            "exports read whole weights; use learner.zero_stage=2 (the LoRA model's frozen base is replicated)")
    if cfg.learner.zero_stage not in (0, 1, 2):
        raise ConfigError("config key 'learner.zero_stage' must be 0, 1 or 2")
    from coreseg.learner.registry import resolve  # here, not at the top: the registries import torch

    for kind, dotted in (("advantage", "learner.advantage"), ("policy_loss", "learner.policy_loss")):
        try:
            resolve(kind, get_value(cfg, dotted))
        except ValueError as err:
            raise ConfigError(f"config key '{dotted}': {err}") from None
    if cfg.learner.dynamic_sampling_max_draws > 0 and not cfg.learner.drop_zero_variance:
        raise ConfigError("config key 'learner.dynamic_sampling_max_draws' > 0 needs learner.drop_zero_variance=true "
                          "(dynamic sampling refills the groups that filter drops)")
    if not 0 <= cfg.learner.lr_min_ratio <= 1:
        raise ConfigError("config key 'learner.lr_min_ratio' must be in [0, 1] (the decayed fraction of the base lr)")
    if cfg.learner.kl_beta < 0:
        raise ConfigError("config key 'learner.kl_beta' must be >= 0 (0 skips the reference pass)")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError("config key 'rollout.top_p' must be in (0, 1]")
    if cfg.model.min_pixels and cfg.model.max_pixels and cfg.model.min_pixels > cfg.model.max_pixels:
        raise ConfigError(f"config keys 'model.min_pixels' = {cfg.model.min_pixels} > 'model.max_pixels' = "
                          f"{cfg.model.max_pixels}")
    if cfg.model.sam_type != "tiny" and not cfg.model.sam_checkpoint.strip():
        raise ConfigError(f"config key 'model.sam_checkpoint' is empty but model.sam_type={cfg.model.sam_type!r} "
                          "loads its weights from it (only 'tiny' is built in-process)")
    _check_gpus(cfg)
    _check_reward_terms(cfg)
    _check_trackers(cfg)


def _check_gpus(cfg: TrainConfig) -> None:
    """GPU requests that Ray would accept but that cannot work: NCCL cannot put two ranks on one GPU, vLLM's
    tensor-parallel ranks take one GPU each, and colocation pairs each learner GPU with one vLLM rank."""
    c, tp = cfg.cluster, cfg.rollout.tensor_parallel_size
    for key in ("learner_gpus", "rollout_gpus_per_worker", "reward_gpus_per_worker"):
        if getattr(c, key) < 0:
            raise ConfigError(f"config key 'cluster.{key}' must be >= 0")
    if c.learner_gpus > 1 or (c.learner_workers > 1 and 0 < c.learner_gpus < 1):
        raise ConfigError("config key 'cluster.learner_gpus' must be 0 or 1 with several learner ranks (one GPU "
                          "per rank; a fraction only for a single rank)")
    if (tp > 1 or c.rollout_gpus_per_worker > 1) and c.rollout_gpus_per_worker != tp:
        raise ConfigError(f"config key 'cluster.rollout_gpus_per_worker' = {c.rollout_gpus_per_worker:g} must equal "
                          f"rollout.tensor_parallel_size = {tp} (one GPU per tensor-parallel rank)")
    if tp > 1 and cfg.rollout.engine == "hf":
        raise ConfigError("config key 'rollout.tensor_parallel_size' > 1 needs rollout.engine=vllm (or auto)")
    if not c.colocate:
        return
    if cfg.rollout.async_generation:
        raise ConfigError("config keys 'cluster.colocate' and 'rollout.async_generation' exclude each other "
                          "(colocated rollout sleeps while the learner trains)")
    if c.learner_gpus != 1 or c.rollout_gpus_per_worker != tp or c.rollout_workers * tp != c.learner_workers:
        raise ConfigError(f"config key 'cluster.colocate' needs cluster.learner_gpus=1, cluster.rollout_gpus_per_"
                          f"worker=rollout.tensor_parallel_size ({tp}) and cluster.rollout_workers x {tp} = "
                          f"cluster.learner_workers ({c.learner_workers}): each learner GPU hosts one vLLM rank")


def _check_reward_terms(cfg: TrainConfig) -> None:
    """Every `reward.terms` entry resolves (import paths are imported now, not on the first scored batch)."""
    from coreseg.reward.terms import TermError, check_terms  # late: reward/ builds on common/, not the other way
    try:
        check_terms(cfg.reward)
    except TermError as err:
        raise ConfigError(str(err)) from None


def _check_trackers(cfg: TrainConfig) -> None:
    """Names only: whether each tracker's package is installed is checked when the driver starts it."""
    bad = [t for t in cfg.run.trackers if t not in TRACKERS]
    if bad or len(set(cfg.run.trackers)) != len(cfg.run.trackers):
        raise ConfigError(f"config key 'run.trackers' = {list(cfg.run.trackers)}: each entry must be one of "
                          f"{TRACKERS}, listed once" + (f" (unknown: {bad})" if bad else ""))
    if cfg.run.trackers and not cfg.run.tracker_project.strip():
        raise ConfigError("config key 'run.tracker_project' is empty: run.trackers needs a W&B project / MLflow "
                          "experiment name")


# Config keys holding paths: made absolute on the driver at start, so actors on other nodes (and a job's working
# dir copy) see the same files. Values with a URI scheme (s3://, gs://, file://) and built-in names stay as they are.
PATH_KEYS = ("data.path", "model.policy", "model.sam_checkpoint", "model.assets_dir", "run.output_dir",
             "reward.embed_cache_path")
BUILT_IN_POLICIES = ("tiny", "small", "tiny-aligned")  # common/models/policy.py PRESETS and ALIGNED_PRESETS


def absolute_path(value: str, base: Path) -> str:
    """`value` resolved against `base` when it is a relative local path; "", URIs and absolute paths unchanged."""
    if not value or "://" in value or value in BUILT_IN_POLICIES:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def with_absolute_paths(cfg: TrainConfig, base: str | os.PathLike | None = None) -> TrainConfig:
    """A copy of `cfg` whose path keys (PATH_KEYS) are absolute, relative ones resolved against `base` (default:
    the current directory, i.e. where the driver or `coreseg submit` was started)."""
    import copy

    base = Path(base or Path.cwd()).resolve()
    out = copy.deepcopy(cfg)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, absolute_path(get_value(out, dotted), base))
    return out


def cpu_threads(cfg: TrainConfig, role: str, cores: int) -> int:
    """Torch/OpenMP threads of a CPU `learner` or `rollout` worker on a node with `cores` cores. A set value
    (`cluster.learner_cpu_threads`, `rollout.cpu_threads`) wins. 0 means every core in sync mode, where the
    phases run one after another; with async generation both run at once and each takes half (OpenMP threads
    of two processes sharing cores slow both: on 2 cores, async with all cores each was 1.5x slower than
    sync, with one core each 1.55x faster)."""
    chosen = cfg.cluster.learner_cpu_threads if role == "learner" else cfg.rollout.cpu_threads
    if chosen:
        return chosen
    if not cfg.rollout.async_generation:
        return cores
    return max(1, (cores + 1) // 2 if role == "learner" else cores // 2)


def get_value(cfg: TrainConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(to_yaml(cfg))


def load_saved_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reload a run's resolved config (a YAML written by `save_config`)."""
    return load_config(str(path), overrides)
