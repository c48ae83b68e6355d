"""The 3B preset: every value names its source, and the settings the code and README rely on hold."""
import re
from pathlib import Path

from coreseg.common.config import load_config
from coreseg.common.config_schema import LearnerConfig, ModelConfig, RewardConfig

PRESET = Path(__file__).resolve().parent.parent / "deploy" / "configs" / "qwen25vl_3b.yaml"
SOURCES = ("paper", "Seg-Zero", "own choice")


def test_every_value_of_the_3b_preset_names_its_source():
    for line in PRESET.read_text().splitlines():
        key_value = re.match(r"^\s+(\w+):\s*(\S.*)$", line)
        if not key_value:  # section headers and whole-line comments
            continue
        comment = line.split(" # ", 1)[1] if " # " in line else ""
        assert comment.strip().startswith(SOURCES), f"{PRESET.name}: no source for {key_value.group(1)!r}: {line!r}"


def test_3b_preset_values():
    cfg = load_config("qwen25vl_3b")
    # Seg-Zero's recipe where the paper is silent
    assert cfg.rollout.group_size == 8 and cfg.learner.lr == 1e-6 and cfg.learner.kl_beta == 5e-3
    assert cfg.rollout.temperature == 1.0 and cfg.data.batch_size == 16
    assert cfg.learner.gradient_checkpointing
    # as the code's defaults: no LoRA dropout, the README's fixed mask-reward threshold
    assert cfg.model.lora_dropout == ModelConfig().lora_dropout == 0.0
    assert cfg.reward.density_aware == RewardConfig().density_aware is False
    assert LearnerConfig().gradient_checkpointing is False  # the preset turns it on, not the default
    # MedSAM weights go with MedSAM's preprocessing
    assert cfg.model.sam_type == "medsam" and "medsam" in cfg.model.sam_checkpoint
