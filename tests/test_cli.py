"""CLI helpers that need no Ray."""
from coreseg.common.config import load_config


def test_a_new_run_never_appends_to_an_old_one(tmp_path):
    from coreseg.deploy.cli import fresh_run_dir

    cfg = load_config("tiny_cpu", [f"run.output_dir={tmp_path}", "run.name=demo"])
    assert fresh_run_dir(cfg, None) == str(tmp_path / "demo")  # nothing there yet
    (tmp_path / "demo").mkdir()
    assert fresh_run_dir(cfg, None) == str(tmp_path / "demo")  # an empty folder holds no run
    (tmp_path / "demo" / "metrics.jsonl").write_text("{}\n")
    assert fresh_run_dir(cfg, None) == str(tmp_path / "demo-2")
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "metrics.jsonl").write_text("{}\n")
    assert fresh_run_dir(cfg, None) == str(tmp_path / "demo-3")
    assert fresh_run_dir(cfg, str(tmp_path / "other")) == str(tmp_path / "other")
    assert (tmp_path / "demo" / "metrics.jsonl").read_text() == "{}\n"  # the old run is kept as it was


def test_a_missing_data_path_is_an_error_naming_it(tmp_path, capsys):
    import pytest

    from coreseg.deploy.cli import main

    missing = tmp_path / "no-such-data"
    for command in (["train"], ["sft"], ["submit", "--address", "http://127.0.0.1:1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, f"data.path={missing}", f"run.output_dir={tmp_path / 'runs'}"])
        assert str(missing) in str(exit_info.value) and "does not exist" in str(exit_info.value)
    assert not missing.exists() and not (tmp_path / "runs").exists()  # nothing generated, no run started


def test_a_missing_data_uri_is_an_error_naming_it(tmp_path):
    import pytest

    from coreseg.deploy.cli import main

    missing = f"file://{tmp_path / 'bucket' / 'no-such-data'}"
    for command in (["train"], ["submit", "--address", "http://127.0.0.1:1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, f"data.path={missing}", f"run.output_dir={tmp_path / 'runs'}"])
        assert missing in str(exit_info.value) and "does not exist" in str(exit_info.value)
    assert not (tmp_path / "runs").exists()


def test_overrides_after_splits_are_overrides_not_split_names():
    from coreseg.deploy.cli import build_parser, move_trailing_overrides

    args = build_parser().parse_args(["eval", "--run-dir", "r", "--splits", "test_id", "run.eval_sampled=true",
                                      "test_ood", "learner.lr=1e-5"])
    move_trailing_overrides(args)
    assert args.splits == ["test_id", "test_ood"]
    assert args.overrides == ["run.eval_sampled=true", "learner.lr=1e-5"]
    args = build_parser().parse_args(["eval", "--run-dir", "r", "run.seed=3", "--splits", "val"])
    move_trailing_overrides(args)
    assert args.splits == ["val"] and args.overrides == ["run.seed=3"]


def test_demo_runs_the_demo_preset_unless_told_otherwise():
    from coreseg.deploy.cli import build_parser

    demo, train = (build_parser().parse_args([c]) for c in ("demo", "train"))
    assert demo.default_preset == "demo" and train.default_preset == "tiny_cpu"
    cfg, base = load_config("demo", []), load_config("tiny_cpu", [])
    assert cfg.model.policy == "tiny-aligned" and base.model.policy == "tiny"
    assert (cfg.learner.sft_lr_schedule, cfg.learner.lr_schedule) == ("cosine", "cosine")
    assert (base.learner.sft_lr_schedule, base.learner.lr_schedule) == ("constant", "constant")
    cfg.model.policy = base.model.policy
    cfg.learner.sft_lr_schedule = cfg.learner.lr_schedule = "constant"
    assert cfg == base  # the rest is tiny_cpu's


def test_data_synth_writes_the_task_the_config_names(tmp_path):
    from coreseg.common.data import LesionDataset
    from coreseg.deploy.cli import main

    out = tmp_path / "ref"
    main(["data", "synth", "--out", str(out), "data.synth_samples=8", "data.synth_task=referring"])
    ds = LesionDataset(str(out), split="train", batch_size=8, shuffle=False)
    samples = [s for batch in ds.iter_all() for s in batch]
    assert samples and all(len(s.masks) == 1 and s.question.startswith(("Segment the larger", "Segment the smaller"))
                           for s in samples)
