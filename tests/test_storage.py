"""Storage through pyarrow.fs: `file://` URIs stand in for s3/gs/hdfs, and two staging folders stand in for the
local disks of two nodes. Run folders at a URI, checkpoints with one writer per part, the published policy."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coreseg.common import storage
from coreseg.common.storage import STAGE_ENV


def uri(path: Path) -> str:
    return "file://" + str(path)


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder (symlinks followed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def on_node(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv(STAGE_ENV, str(folder))


def test_uri_text_files_folders_and_moves(tmp_path):
    root = uri(tmp_path / "bucket")
    storage.write_text(storage.join(root, "a", "latest"), "step_2")
    assert (tmp_path / "bucket" / "a" / "latest").read_text() == "step_2"
    assert storage.read_text(storage.join(root, "a", "latest")) == "step_2"
    assert not (tmp_path / "bucket" / "a" / "latest.tmp").exists()
    assert storage.join(root + "/", "x", "y") == root + "/x/y"
    assert storage.kind(storage.join(root, "a")) == "dir" and storage.kind(storage.join(root, "nope")) == "missing"
    storage.move_dir(storage.join(root, "a"), storage.join(root, "b"))
    assert storage.list_dir(root) == ["b"] and storage.list_dir(storage.join(root, "nope")) == []
    with pytest.raises(storage.StorageError, match="nope"):
        storage.read_text(storage.join(root, "nope"))
    with pytest.raises(storage.StorageError, match="nope: no such folder"):
        storage.copy_dir(storage.join(root, "nope"), tmp_path / "x")


def test_staged_copy_downloads_once_per_node(tmp_path, monkeypatch):
    src = tmp_path / "remote" / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "s.json").write_text("{}")
    assert storage.staged_copy(src) == src  # a local path is used where it is
    copies = []
    for node in ("node_a", "node_b"):
        on_node(monkeypatch, tmp_path / node)
        local = storage.staged_copy(uri(src))
        assert local.is_relative_to(tmp_path / node) and tree(local) == tree(src)
        copies.append(local)
    (copies[1] / "marker").write_text("kept")  # a second call on the node reuses its copy
    assert storage.staged_copy(uri(src)) == copies[1] and (copies[1] / "marker").exists()
    assert [p.name for p in (tmp_path / "node_b" / "uri").iterdir()] == [copies[1].name]  # no .tmp left
    (src / "w.bin").write_bytes(os.urandom(999))  # the folder was written again: downloaded again
    fresh = storage.staged_copy(uri(src))
    assert fresh != copies[1] and tree(fresh) == tree(src)
    # a file named in the config (model.sam_checkpoint, reward.embed_cache_path)
    assert Path(storage.local_file(uri(src / "w.bin"))).read_bytes() == (src / "w.bin").read_bytes()
    assert storage.local_file("") == "" and storage.local_file(str(src / "w.bin")) == str(src / "w.bin")
    with pytest.raises(storage.StorageError, match="w2.bin does not exist"):
        storage.local_file(uri(src / "w2.bin"))


def test_writable_folder_uploads_on_success_only(tmp_path, monkeypatch):
    on_node(monkeypatch, tmp_path / "node")
    dest = uri(tmp_path / "remote" / "part")
    with storage.writable_folder(dest) as folder:
        (folder / "rank0.bin").write_bytes(b"abc")
    assert (tmp_path / "remote" / "part" / "rank0.bin").read_bytes() == b"abc"
    with pytest.raises(RuntimeError):
        with storage.writable_folder(uri(tmp_path / "remote" / "failed")) as folder:
            (folder / "x").write_text("partial")
            raise RuntimeError("writer died")
    assert not (tmp_path / "remote" / "failed").exists()
    assert list((tmp_path / "node" / "upload").iterdir()) == []  # staging folders removed either way


def test_uri_run_folder_checkpoints_one_writer_per_part(tmp_path, monkeypatch):
    from coreseg.deploy.run_folder import RunFolder, read_driver_state, write_driver_state

    on_node(monkeypatch, tmp_path / "driver_node")
    run = RunFolder(uri(tmp_path / "runs" / "r1"))
    assert run.remote and run.latest_checkpoint() is None

    def write_parts(step):
        def write(location):
            for rank, node in enumerate(("node_a", "node_b")):  # each rank uploads its own part from its node
                on_node(monkeypatch, tmp_path / node)
                with storage.writable_folder(storage.join(location, "learner")) as folder:
                    (folder / f"state_rank{rank}.json").write_text(json.dumps({"step": step}))
            on_node(monkeypatch, tmp_path / "driver_node")
            write_driver_state(location, {"step": step})
        return write

    for step in (1, 2, 3):
        run.save_checkpoint(f"grpo_{step:06d}", write_parts(step), keep=2)
    ckpts = tmp_path / "runs" / "r1" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["grpo_000002", "grpo_000003", "latest"]
    assert sorted(p.name for p in (ckpts / "grpo_000003" / "learner").iterdir()) == ["state_rank0.json",
                                                                                     "state_rank1.json"]
    assert run.latest_checkpoint() == run.join("checkpoints", "grpo_000003")
    assert read_driver_state(run.latest_checkpoint()) == {"step": 3}

    def dies(location):
        write_parts(4)(location)
        raise OSError("node lost")
    with pytest.raises(OSError, match="node lost"):
        run.save_checkpoint("grpo_000004", dies)
    assert (ckpts / "latest").read_text() == "grpo_000003"
    assert sorted(p.name for p in ckpts.iterdir()) == ["grpo_000002", "grpo_000003", "latest"]


def test_uri_run_folder_publishes_records_and_reads_them_back(tmp_path, monkeypatch):
    from coreseg.deploy.metrics_log import MetricsLogger, read_metrics
    from coreseg.deploy.run_folder import RunFolder

    on_node(monkeypatch, tmp_path / "node_a")
    run = RunFolder(uri(tmp_path / "runs" / "r"))
    logger = MetricsLogger(run.local, tensorboard=False, on_write=lambda: run.publish("metrics.jsonl"))
    logger.log("grpo", 1, {"reward/total": 0.5})
    logger.log("grpo", 2, {"reward/total": 0.25})
    remote = tmp_path / "runs" / "r" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(remote)] == [1, 2]
    logger.truncate_after("grpo", 1)
    assert [r["step"] for r in read_metrics(remote)] == [1]
    (run.local / "eval").mkdir()
    (run.local / "eval" / "final.md").write_text("# Evaluation")
    run.publish("eval", "not-written")  # a folder, and a name never written (skipped)
    assert (tmp_path / "runs" / "r" / "eval" / "final.md").read_text() == "# Evaluation"
    on_node(monkeypatch, tmp_path / "node_b")  # another node (a resumed driver) sees the same records
    again = RunFolder(uri(tmp_path / "runs" / "r"))
    assert again.local.is_relative_to(tmp_path / "node_b") and read_metrics(again.local)[0]["reward/total"] == 0.5
    assert (again.local / "eval" / "final.md").exists()


def test_published_policy_manifest_links_or_downloads_weights(tmp_path, monkeypatch):
    from coreseg.common.models.policy import ModelPathError
    from coreseg.common.policy_store import MANIFEST, publish_folder, stage_policy

    base = tmp_path / "shared" / "base"  # a base model folder every node sees at this path
    base.mkdir(parents=True)
    (base / "model-1.safetensors").write_bytes(os.urandom(64))
    remote_weights = tmp_path / "bucket" / "model-2.safetensors"
    remote_weights.parent.mkdir()
    remote_weights.write_bytes(os.urandom(64))
    mirror = tmp_path / "driver_cache" / "mirror"  # what ensure_policy_dir makes: tokenizer + symlinked weights
    mirror.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "x"}')
    (mirror / "config.json").symlink_to(base / "config.json")  # a mirror links the base's config too: copied
    (mirror / "tokenizer.json").write_text('{"seg": 1}')
    (mirror / "model-1.safetensors").symlink_to(base / "model-1.safetensors")
    on_node(monkeypatch, tmp_path / "driver_node")
    dest = publish_folder(mirror, uri(tmp_path / "run" / "policy"), {"model-2.safetensors": uri(remote_weights)})
    published = tmp_path / "run" / "policy"
    assert sorted(p.name for p in published.iterdir()) == ["config.json", MANIFEST, "tokenizer.json"]
    assert json.loads((published / MANIFEST).read_text())["weights"] == {
        "model-1.safetensors": str(base / "model-1.safetensors"), "model-2.safetensors": uri(remote_weights)}
    expected = {"config.json": b'{"model_type": "x"}', "tokenizer.json": b'{"seg": 1}',
                "model-1.safetensors": (base / "model-1.safetensors").read_bytes(),
                "model-2.safetensors": remote_weights.read_bytes()}
    assert not (published / "config.json").is_symlink()
    assert publish_folder(mirror, dest, {}) == dest and not (tmp_path / "run" / "policy.tmp").exists()  # once
    for node in ("node_a", "node_b"):
        on_node(monkeypatch, tmp_path / node)
        local = Path(stage_policy(dest))
        assert local.is_relative_to(tmp_path / node)
        assert {k: v for k, v in tree(local).items() if k != MANIFEST} == expected
    (base / "model-1.safetensors").unlink()  # the base model is not on this node
    on_node(monkeypatch, tmp_path / "node_c")
    with pytest.raises(ModelPathError, match="model-1.safetensors"):
        stage_policy(dest)


def test_preset_policy_is_published_under_the_run_folder(tmp_path, monkeypatch, tiny_policy_dir):
    from coreseg.common.policy_store import publish_policy, stage_policy

    on_node(monkeypatch, tmp_path / "driver_node")
    run = uri(tmp_path / "runs" / "r")
    prepared, source = publish_policy("tiny", str(tiny_policy_dir.parent), 0, run)
    assert prepared == tiny_policy_dir and source == run + "/policy"
    assert publish_policy("tiny", str(tiny_policy_dir.parent), 0, run)[1] == source  # published once
    on_node(monkeypatch, tmp_path / "node_b")  # another node: never reads the driver's assets folder
    local = Path(stage_policy(source))
    assert local.is_relative_to(tmp_path / "node_b") and tree(local) == tree(tiny_policy_dir)
    # a user's model folder that has <seg> is used where it is; at a URI, each node downloads it once
    assert publish_policy(str(tiny_policy_dir), str(tmp_path / "cache"), 0, run)[1] == str(tiny_policy_dir)
    model_uri = uri(tiny_policy_dir)
    prepared, source = publish_policy(model_uri, str(tmp_path / "cache"), 0, run)
    assert source == model_uri
    assert (prepared / "config.json").read_bytes() == (tiny_policy_dir / "config.json").read_bytes()
    assert not list(prepared.glob("*.safetensors"))  # the driver read only the config and tokenizer files
    assert tree(Path(stage_policy(source))) == tree(tiny_policy_dir)


def test_fresh_run_dir_at_a_uri_never_reuses_a_run(tmp_path):
    from coreseg.common.config import load_config
    from coreseg.deploy.cli import fresh_run_dir

    cfg = load_config("tiny_cpu", [f"run.output_dir={uri(tmp_path / 'runs')}", "run.name=job"])
    assert fresh_run_dir(cfg, None) == uri(tmp_path / "runs" / "job")
    storage.write_text(uri(tmp_path / "runs" / "job" / "metrics.jsonl"), "{}\n")
    assert fresh_run_dir(cfg, None) == uri(tmp_path / "runs" / "job-2")


def test_mirror_of_a_model_without_seg_is_published_without_its_weights(tmp_path, monkeypatch, tiny_policy_dir):
    import shutil

    from transformers import AutoTokenizer

    from coreseg.common.policy_store import MANIFEST, publish_policy, stage_policy

    base = tmp_path / "shared" / "model"  # a user's model folder whose tokenizer lacks <seg>
    shutil.copytree(tiny_policy_dir, base)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<seg>"]
    (base / "tokenizer.json").write_text(json.dumps(tok))
    assert "<seg>" not in AutoTokenizer.from_pretrained(str(base)).get_vocab()
    on_node(monkeypatch, tmp_path / "driver_node")
    run = uri(tmp_path / "runs" / "r")
    prepared, source = publish_policy(str(base), str(tmp_path / "driver_cache"), 0, run)
    assert prepared.is_relative_to(tmp_path / "driver_cache") and source == run + "/policy"
    published = tmp_path / "runs" / "r" / "policy"
    assert json.loads((published / MANIFEST).read_text())["weights"] == {
        "model.safetensors": str(base / "model.safetensors")}
    assert not (published / "model.safetensors").exists()  # the weights stay where they are
    on_node(monkeypatch, tmp_path / "node_b")
    local = Path(stage_policy(source))
    assert (local / "model.safetensors").resolve() == base / "model.safetensors"
    assert "<seg>" in AutoTokenizer.from_pretrained(str(local)).get_vocab()


def test_predict_and_export_read_a_uri_run_from_a_local_copy(tmp_path, monkeypatch):
    from coreseg.common.config import ConfigError
    from coreseg.deploy.run_folder import local_run_copy

    on_node(monkeypatch, tmp_path / "laptop")
    remote = tmp_path / "bucket" / "run"
    for name in ("grpo_000001", "grpo_000002"):
        (remote / "checkpoints" / name / "learner").mkdir(parents=True)
        (remote / "checkpoints" / name / "learner" / "adapter.safetensors").write_text(name)
    (remote / "config.yaml").write_text("run: {}\n")
    assert local_run_copy(str(remote), "grpo_000001") == (str(remote), "grpo_000001")  # local: as it is
    with pytest.raises(ConfigError, match="no checkpoints/latest"):
        local_run_copy(uri(remote))
    (remote / "checkpoints" / "latest").write_text("grpo_000002")
    local, name = local_run_copy(uri(remote))
    assert Path(local).is_relative_to(tmp_path / "laptop") and name == "grpo_000002"
    assert (Path(local) / "config.yaml").read_text() == "run: {}\n"
    assert (Path(local) / "checkpoints" / "latest").read_text() == "grpo_000002"
    assert (Path(local) / "checkpoints" / name / "learner" / "adapter.safetensors").read_text() == "grpo_000002"
    local, name = local_run_copy(uri(remote), uri(remote / "checkpoints" / "grpo_000001"))
    assert name == "grpo_000001" and (Path(local) / "checkpoints" / name / "learner").is_dir()
