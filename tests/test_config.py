from pathlib import Path

import pytest

from coreseg.common.config import ConfigError, TrainConfig, load_config, save_config, load_saved_config


def test_defaults_preset_and_overrides():
    cfg = load_config("tiny_cpu", ["learner.lr=1e-5", "rollout.group_size=4", "data.eval_splits=[val]"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.learner.lr == pytest.approx(1e-5)
    assert cfg.rollout.group_size == 4
    assert cfg.data.eval_splits == ["val"]
    assert cfg.model.policy == "tiny"


@pytest.mark.parametrize("override, key", [
    ("learner.lrr=1", "learner.lrr"),  # unknown key
    ("nosection.x=1", "nosection"),
    ("rollout.group_size=eight", "rollout.group_size"),  # wrong type
    ("reward.density_aware=maybe", "reward.density_aware"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", [override])
    assert key in str(err.value)


def test_semantic_validation_names_the_key():
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config("tiny_cpu", ["rollout.engine=tensorrt"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config("tiny_cpu", ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny_cpu", ["learner.lr"])
    for extra in ([], ["learner.reference=base"], ["learner.kl_beta=0"]):  # refused whatever the reference
        with pytest.raises(ConfigError, match="learner.zero_stage' = 3 is not supported"):
            load_config("tiny_cpu", ["learner.zero_stage=3"] + extra)
    with pytest.raises(ConfigError, match="must be 0, 1 or 2"):
        load_config("tiny_cpu", ["learner.zero_stage=4"])
    with pytest.raises(ConfigError, match="data.synth_reasoning"):
        load_config("tiny_cpu", ["data.synth_reasoning=long"])
    with pytest.raises(ConfigError, match="data.synth_task"):
        load_config("tiny_cpu", ["data.synth_task=every"])
    with pytest.raises(ConfigError, match="learner.kl_beta"):
        load_config("tiny_cpu", ["learner.kl_beta=-0.1"])


@pytest.mark.parametrize("override, key, why", [
    ("rollout.group_size=1", "rollout.group_size", "a group of 1 has advantage 0"),
    ("learner.lr=0", "learner.lr", "> 0"),
    ("learner.lr=-1e-4", "learner.lr", "> 0"),
    ("learner.sft_lr=-1e-3", "learner.sft_lr", "> 0"),
    ("learner.adapter_lr=0", "learner.adapter_lr", "> 0"),
    ("rollout.temperature=-0.5", "rollout.temperature", ">= 0"),
    ("run.save_every=-1", "run.save_every", ">= 0"),
    ("run.eval_every=-5", "run.eval_every", ">= 0"),
    ("run.steps=-1", "run.steps", ">= 0"),
    ("run.sft_steps=-2", "run.sft_steps", ">= 0"),
    ("run.eval_samples=-1", "run.eval_samples", ">= 0"),
    ("data.max_image_pixels=0", "data.max_image_pixels", "> 0"),
    ("cluster.recover_wait_s=0", "cluster.recover_wait_s", "> 0"),
])
def test_out_of_range_values_are_refused_with_the_key_named(override, key, why):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", [override])
    assert f"'{key}'" in str(err.value) and why in str(err.value)


def test_edge_values_that_mean_something_are_accepted():
    cfg = load_config("tiny_cpu", ["rollout.temperature=0", "run.save_every=0", "run.eval_every=0", "run.sft_steps=0"])
    assert cfg.rollout.temperature == 0 and cfg.run.save_every == 0  # greedy; never save/eval during the run
    # group_size is a GRPO value: an SFT-only run (no GRPO steps) does not use it
    assert load_config("tiny_cpu", ["rollout.group_size=1", "run.steps=0"]).rollout.group_size == 1
    assert load_config("tiny_cpu", ["rollout.group_size=2"]).rollout.group_size == 2
    assert load_config("qwen25vl_3b").data.max_image_pixels == 4096 * 4096


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("nope")


def test_bad_yaml_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  not_a_key: 3\n")
    with pytest.raises(ConfigError, match="not_a_key"):
        load_config(str(path))


def test_saved_config_round_trip(tmp_path):
    cfg = load_config("tiny_cpu", ["reward.w_box=0.5", "run.steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml")
    assert again == cfg


def test_cpu_threads_split_the_node_only_in_async_mode():
    from coreseg.common.config import cpu_threads

    sync = load_config("tiny_cpu")
    assert (cpu_threads(sync, "learner", 16), cpu_threads(sync, "rollout", 16)) == (16, 16)
    both = load_config("tiny_cpu", ["rollout.async_generation=true"])
    assert [(cpu_threads(both, "learner", n), cpu_threads(both, "rollout", n)) for n in (1, 2, 3, 16)] == \
        [(1, 1), (1, 1), (2, 1), (8, 8)]
    pinned = load_config("tiny_cpu", ["rollout.async_generation=true", "rollout.cpu_threads=3",
                                      "cluster.learner_cpu_threads=5"])
    assert (cpu_threads(pinned, "learner", 16), cpu_threads(pinned, "rollout", 16)) == (5, 3)


def test_dynamic_sampling_needs_the_zero_variance_filter_and_dead_knobs_are_gone():
    with pytest.raises(ConfigError, match="dynamic_sampling_max_draws"):
        load_config("tiny_cpu", ["learner.dynamic_sampling_max_draws=2"])
    cfg = load_config("tiny_cpu", ["learner.dynamic_sampling_max_draws=2", "learner.drop_zero_variance=true"])
    assert cfg.learner.dynamic_sampling_max_draws == 2
    for dead in ("run.log_every=5", "rollout.enable_sleep_mode=true"):  # knobs that did nothing are gone
        with pytest.raises(ConfigError, match=dead.split("=")[0].split(".")[1]):
            load_config("tiny_cpu", [dead])


def test_paths_are_made_absolute_against_the_start_directory(tmp_path):
    from coreseg.common.config import with_absolute_paths

    cfg = load_config("tiny_cpu", ["data.path=data/isic", "model.sam_checkpoint=~/medsam.pth", "run.output_dir=runs",
                                   "model.policy=tiny", "reward.embed_cache_path=s3://bucket/emb.safetensors"])
    out = with_absolute_paths(cfg, tmp_path)
    assert out.data.path == str(tmp_path / "data" / "isic") and out.run.output_dir == str(tmp_path / "runs")
    assert out.model.assets_dir == str(tmp_path / ".cache" / "coreseg")
    assert out.model.sam_checkpoint == str(Path("~/medsam.pth").expanduser())
    assert out.model.policy == "tiny" and out.reward.embed_cache_path == "s3://bucket/emb.safetensors"
    assert cfg.data.path == "data/isic"  # the input is left as it was
    assert with_absolute_paths(out, "/elsewhere").data.path == out.data.path  # idempotent


def test_submit_entrypoint_carries_absolute_paths_and_quotes_every_word(tmp_path, monkeypatch):
    import shlex

    from coreseg.common.config import with_absolute_paths
    from coreseg.deploy.submit import submit_command, train_entrypoint

    monkeypatch.chdir(tmp_path)
    hostile = ["run.name=$(touch pwned)", "data.shuffle_seed=1;rm -rf /", "run.output_dir=`id`"]
    cfg = with_absolute_paths(load_config("tiny_cpu", ["data.path=data/x"]))
    cmd = submit_command("http://head:8265", train_entrypoint("tiny_cpu", hostile, cfg), tmp_path / "env.json")
    assert cmd[:5] == ["ray", "job", "submit", "--runtime-env", str(tmp_path / "env.json")]
    entry = cmd[cmd.index("--") + 1:]
    words = shlex.split(" ".join(entry))  # what the job's shell sees after Ray joins the entrypoint
    assert words[:6] == ["python", "-m", "coreseg.deploy.cli", "train", "--config", "tiny_cpu"]
    assert all(h in words for h in hostile) and f"data.path={tmp_path / 'data' / 'x'}" in words
    assert f"run.output_dir={tmp_path / 'runs'}" in words and "cluster.mode=cluster" in words


def test_submit_ships_the_installed_code_as_one_package_and_the_working_dir(tmp_path):
    """The job's code is a `coreseg` folder with the five subpackages (no bytecode, nothing else), sent as
    py_modules; the working dir is the folder given; the runtime env keeps deploy/runtime_env.yaml's excludes."""
    import json

    import coreseg.learner.grpo
    from coreseg.deploy.submit import job_runtime_env

    (tmp_path / "work").mkdir()
    env = json.loads(job_runtime_env(tmp_path / "stage", str(tmp_path / "work")).read_text())
    package = Path(env["py_modules"][0])
    assert package == tmp_path / "stage" / "coreseg" and env["working_dir"] == str(tmp_path / "work")
    assert sorted(p.name for p in package.iterdir()) == ["common", "deploy", "learner", "reward", "rollout"]
    shipped = package / "learner" / "grpo.py"
    assert shipped.read_bytes() == Path(coreseg.learner.grpo.__file__).read_bytes()
    assert not list(package.rglob("__pycache__")) and (package / "deploy" / "configs" / "tiny_cpu.yaml").exists()
    assert ".venv" in env["excludes"] and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "working_dir" not in json.loads(job_runtime_env(tmp_path / "stage2", "").read_text())
    with pytest.raises(FileNotFoundError, match="--working-dir"):
        job_runtime_env(tmp_path / "stage3", str(tmp_path / "missing"))
