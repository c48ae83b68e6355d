"""The project installs as one `coreseg` namespace: no file imports the folders as top-level packages (two copies of
a module under two names would hold two copies of every class), and a built wheel holds `coreseg/` only."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("common", "deploy", "learner", "reward", "rollout")
BARE = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s|$)", re.M)


def test_no_file_imports_a_folder_as_a_top_level_package():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {".venv", ".git", "build"} & set(path.relative_to(ROOT).parts):
            continue
        for match in BARE.finditer(path.read_text()):
            line = path.read_text()[:match.start()].count("\n") + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"import these as coreseg.<folder>: {offenders}"


def test_the_wheel_holds_the_coreseg_namespace_only(tmp_path):
    import shutil

    source = tmp_path / "src"  # setuptools writes build/ beside the sources: build a copy, not the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "build", "*.egg-info",
                                                                  "__pycache__", "data", "runs", "bench"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(source)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("coreseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"coreseg"}
    assert {n.split("/")[1] for n in names if n.startswith("coreseg/")} == set(FOLDERS)
    assert "coreseg/deploy/configs/tiny_cpu.yaml" in names and "coreseg/deploy/runtime_env.yaml" in names
    assert "coreseg/common/models/family/qwen2_5_vl.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "coreseg = coreseg.deploy.cli:main" in entry
