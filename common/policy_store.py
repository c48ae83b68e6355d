"""The policy folder every node loads: prepared once by the driver, published where every node can read it, and
staged to local disk on each node (transformers and vLLM load model folders from local disk).

A built preset (`tiny`, `small`) or a mirror of a model whose tokenizer lacks `<seg>` is made on the driver
(`ensure_policy_dir`, under `model.assets_dir`, which may be local to the driver's node) and published to the run
folder's `policy/`, a local path or a URI. The mirror's weights are not copied: `policy/coreseg-weights.json`
names where each weights file is (the base model's local path, which every node must see, or its URI); each
node links or downloads them into its staging folder. A user's model folder that already has `<seg>` is used
where it is (a shared path, or a URI each node downloads once).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Dict, Tuple

from coreseg.common import storage

MANIFEST = "coreseg-weights.json"
POLICY_FOLDER = "policy"
# files of a model folder that are not weights: what the driver needs to read the model's config and tokenizer
SMALL_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


def _local_model_source(policy: str) -> Tuple[str, Dict[str, str]]:
    """(a local folder with the model's config and tokenizer files, {weights file name: its URI}) for a URI
    model; (the path, {}) for a local one or a preset name."""
    if not storage.is_uri(policy):
        return policy, {}
    names = storage.list_dir(policy)
    if "config.json" not in names:
        from coreseg.common.models.policy import ModelPathError
        raise ModelPathError(f"model.policy={policy!r}: no model folder with config.json there")
    local = storage.stage_dir() / "model-meta" / hashlib.sha1(policy.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name in names:
        if name.endswith(SMALL_SUFFIXES):
            storage.copy_file(storage.join(policy, name), local / name)
        elif storage.kind(storage.join(policy, name)) == "file":
            weights[name] = storage.join(policy, name)
    return str(local), weights


def publish_folder(prepared: Path, dest: str, extra_weights: Dict[str, str]) -> str:
    """Writes `prepared` to `dest` once (into `dest.tmp`, then moved): config and tokenizer files copied (a
    mirror's links to them followed); a mirror's links to weights files and `extra_weights` listed in the manifest
    instead. Returns `dest`."""
    if storage.exists(storage.join(dest, "config.json")):
        return dest  # published by an earlier start of this run (resume)
    weights = dict(extra_weights)
    staging = Path(tempfile.mkdtemp(prefix="policy-", dir=storage.stage_dir()))
    try:
        for f in sorted(prepared.iterdir()):
            if f.is_symlink() and not f.name.endswith(SMALL_SUFFIXES):  # a mirror's link to a weights file
                weights[f.name] = str(f.resolve())
            elif f.is_file():
                shutil.copy2(f, staging / f.name)
            elif f.is_dir():
                shutil.copytree(f, staging / f.name, symlinks=False)
        if weights:
            (staging / MANIFEST).write_text(json.dumps({"weights": weights}, indent=1))
        tmp = dest.rstrip("/") + storage.TMP_SUFFIX
        storage.delete_dir(tmp)
        storage.copy_dir(staging, tmp)
        storage.move_dir(tmp, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def publish_policy(model_policy: str, assets_dir: str, seed: int, run_location: str) -> Tuple[Path, str]:
    """Driver side: (the prepared folder on this node, the location every actor is given). A preset or a
    `<seg>` mirror is published under `run_location/policy`."""
    from coreseg.common.models.policy import ensure_policy_dir

    source, uri_weights = _local_model_source(model_policy)
    prepared = Path(ensure_policy_dir(source, assets_dir, seed))
    if prepared == Path(source):  # the user's model has <seg>: used where it is (a URI: each node downloads it)
        return prepared, model_policy
    return prepared, publish_folder(prepared, storage.join(run_location, POLICY_FOLDER), uri_weights)


def stage_policy(location: str) -> str:
    """Actor side: a local folder transformers and vLLM can load, for a location `publish_policy` returned.
    Without a manifest: the folder itself (local) or its download (URI). With one: the published files are
    staged on this node and each weights file linked from its local path or from its download (once per node)."""
    location = str(location)
    if not storage.exists(storage.join(location, MANIFEST)):
        return str(storage.staged_copy(location))
    key = location + storage.fingerprint(location)  # a policy published again at the same place is staged again
    out = storage.stage_dir() / "policy" / hashlib.sha1(key.encode()).hexdigest()[:16]
    if (out / "config.json").exists():
        return str(out)
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}{storage.TMP_SUFFIX}")
    try:
        storage.copy_dir(location, tmp)
        for name, source in json.loads((tmp / MANIFEST).read_text())["weights"].items():
            target = storage.staged_copy(source) if storage.is_uri(source) else Path(source)
            if not target.exists():
                from coreseg.common.models.policy import ModelPathError
                raise ModelPathError(f"{source}: weights file {name} of the policy published at {location} is not "
                                     f"on this node (a local model path must be on storage every node sees)")
            (tmp / name).symlink_to(target)
        try:
            tmp.rename(out)
        except OSError:  # another actor on this node staged it first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
