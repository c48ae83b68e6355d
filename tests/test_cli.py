"""CLI helpers that need no Ray."""
from common.config import load_config


def test_a_new_run_never_appends_to_an_old_one(tmp_path):
    from deploy.cli import fresh_run_dir

    cfg = load_config("tiny_cpu", [f"run.output_dir={tmp_path}", "run.name=demo"])
    assert fresh_run_dir(cfg, None) == tmp_path / "demo"  # nothing there yet
    (tmp_path / "demo").mkdir()
    assert fresh_run_dir(cfg, None) == tmp_path / "demo"  # an empty folder holds no run
    (tmp_path / "demo" / "metrics.jsonl").write_text("{}\n")
    assert fresh_run_dir(cfg, None) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "metrics.jsonl").write_text("{}\n")
    assert fresh_run_dir(cfg, None) == tmp_path / "demo-3"
    assert fresh_run_dir(cfg, str(tmp_path / "other")) == tmp_path / "other"
    assert (tmp_path / "demo" / "metrics.jsonl").read_text() == "{}\n"  # the old run is kept as it was
