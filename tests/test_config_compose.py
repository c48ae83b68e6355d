"""Configs compose: `defaults:` in a YAML, repeated --config, `coreseg config show`, run-bound commands."""
import pytest
import yaml

from coreseg.common.config import PRESET_DIR, ConfigError, load_config


def _preset(name):
    return yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())


def test_a_yaml_extends_a_preset_and_changes_only_what_it_names(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("defaults: qwen25vl_3b\nmodel:\n  policy: /models/mine\ndata:\n  path: /data/kvasir\n")
    cfg = load_config(str(user))
    big = _preset("qwen25vl_3b")
    assert cfg.model.policy == "/models/mine" and cfg.data.path == "/data/kvasir"
    # everything else comes from the preset, not from the dataclass defaults (lora_r 8, lr 5e-4, tiny SAM)
    assert cfg.model.lora_r == big["model"]["lora_r"] == 64
    assert cfg.learner.lr == big["learner"]["lr"] and cfg.model.sam_type == big["model"]["sam_type"]
    assert cfg.cluster.learner_workers == big["cluster"]["learner_workers"]


def test_defaults_chain_through_relative_paths_and_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("defaults: tiny_cpu\nlearner:\n  lr: 0.25\nrun:\n  steps: 7\n")
    (tmp_path / "extra.yaml").write_text("run:\n  steps: 9\n  name: extra\n")
    top = tmp_path / "top.yaml"
    top.write_text("defaults: [sub/base.yaml, extra.yaml]\nrun:\n  name: top\n")
    cfg = load_config(str(top))
    tiny = _preset("tiny_cpu")
    assert cfg.learner.lr == 0.25  # from base.yaml
    assert cfg.run.steps == 9  # extra.yaml comes after base.yaml in the list
    assert cfg.run.name == "top"  # the file itself wins over its defaults
    assert cfg.run.sft_steps == tiny["run"]["sft_steps"] and cfg.rollout.temperature == tiny["rollout"]["temperature"]


def test_repeated_configs_layer_later_wins_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("learner:\n  lr: 0.1\n  sft_lr: 0.2\n")
    b.write_text("learner:\n  lr: 0.3\n")
    cfg = load_config(["tiny_cpu", str(a), str(b)], ["learner.adapter_lr=0.4"])
    assert (cfg.learner.lr, cfg.learner.sft_lr, cfg.learner.adapter_lr) == (0.3, 0.2, 0.4)
    assert cfg.rollout.temperature == _preset("tiny_cpu")["rollout"]["temperature"]


def test_cycles_and_bad_defaults_are_errors_naming_the_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: b.yaml\n")
    b.write_text("defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle.*a.yaml.*b.yaml"):
        load_config(str(a))
    c = tmp_path / "c.yaml"
    c.write_text("defaults: no_such_preset\n")
    with pytest.raises(ConfigError, match="no_such_preset.*not found"):
        load_config(str(c))
    d = tmp_path / "d.yaml"
    d.write_text("defaults: tiny_cpu\nlearner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"lrr.*d\.yaml"):
        load_config(str(d))


def test_config_show_prints_the_resolved_tree(tmp_path, capsys):
    from coreseg.deploy.cli import main

    user = tmp_path / "mine.yaml"
    user.write_text("defaults: qwen25vl_3b\nrun:\n  steps: 11\n")
    main(["config", "show", "--config", str(user), "learner.lr=3e-6"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"]["steps"] == 11 and shown["learner"]["lr"] == 3e-6
    assert shown["model"]["lora_r"] == 64 and shown["rollout"]["max_new_tokens"] == 512
    assert "defaults" not in shown


@pytest.mark.parametrize("command", [["eval", "--run-dir", "r"], ["predict", "--run-dir", "r", "--image", "x.png",
                                                                      "--question", "q"], ["train", "--resume", "r"]])
def test_run_bound_commands_refuse_config(command):
    from coreseg.deploy.cli import main

    with pytest.raises(SystemExit, match="reads the run's own config.yaml; --config does not apply"):
        main([*command, "--config", "qwen25vl_3b"])


def test_submit_carries_every_config_in_order(tmp_path, monkeypatch):
    from coreseg.common.config import with_absolute_paths
    from coreseg.deploy.cli import train_entrypoint

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config("tiny_cpu"))
    words = train_entrypoint(["qwen25vl_3b", "mine.yaml"], [], cfg)
    assert words[2:6] == ["--config", "qwen25vl_3b", "--config", str(tmp_path / "mine.yaml")]
