"""`coreseg submit`: `ray job submit` of `coreseg train`.

The job imports the code from a copy shipped as a Ray `py_modules` entry: a `coreseg` folder holding the
installed subpackages (from a repository checkout or a wheel alike, and nothing else of site-packages). The user's
current folder is the job's working dir (minus data, runs and caches; deploy/runtime_env.yaml), so modules that a
config names by import path (a reward term, a loss) ship along.
"""
from __future__ import annotations

import importlib
import json
import shlex
import shutil
from pathlib import Path
from typing import List, Optional

import yaml

from coreseg.common.config import PATH_KEYS, TrainConfig, absolute_path, get_value

CODE_PACKAGES = ("common", "deploy", "learner", "reward", "rollout")
RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"


def train_entrypoint(config, overrides: list, cfg: TrainConfig) -> list:
    """`coreseg train` for the cluster: the user's overrides, then every path key as an absolute path (resolved
    here, where the user runs `coreseg submit`; a job runs in a copy of the code elsewhere). Run as
    `python -m coreseg.deploy.cli`, so the job needs no `coreseg` console script on the cluster."""
    configs = [config] if isinstance(config, str) else list(config)
    presets = []
    for name in configs:
        presets += ["--config", absolute_path(name, Path.cwd()) if Path(name).suffix in (".yaml", ".yml") else name]
    paths = [f"{key}={get_value(cfg, key)}" for key in PATH_KEYS if get_value(cfg, key)]
    return ["python", "-m", "coreseg.deploy.cli", "train", *presets, *overrides, "cluster.mode=cluster", *paths]


def stage_code(into: Path) -> Path:
    """`into/coreseg`: a copy of each installed `coreseg.*` subpackage (wherever it is installed from), without
    bytecode caches."""
    package = Path(into) / "coreseg"
    for name in CODE_PACKAGES:
        source = Path(importlib.import_module(f"coreseg.{name}").__file__).parent
        shutil.copytree(source, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def job_runtime_env(staging: Path, working_dir: Optional[str]) -> Path:
    """A runtime-env file in `staging` for the job: deploy/runtime_env.yaml's excludes and environment, the staged
    code as `py_modules`, and `working_dir` (None or "": no working dir)."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["py_modules"] = [str(stage_code(staging))]
    if working_dir:
        folder = Path(working_dir).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"--working-dir {working_dir}: no such folder")
        env["working_dir"] = str(folder)
    path = Path(staging) / "runtime_env.json"
    path.write_text(json.dumps(env))
    return path


def submit_command(address: Optional[str], entrypoint: List[str], runtime_env: Path, no_wait: bool = False) -> list:
    """`ray job submit` of `entrypoint` with the runtime env file of `job_runtime_env`. Ray joins the entrypoint
    into one shell command line, so every word is quoted here: nothing in an override (`$(...)`, backticks, `;`)
    reaches a shell unquoted."""
    cmd = ["ray", "job", "submit", "--runtime-env", str(runtime_env)]
    if address:
        cmd += ["--address", address]
    if no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", *(shlex.quote(word) for word in entrypoint)]
