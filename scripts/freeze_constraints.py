"""Write constraints.txt: the exact versions installed in this environment of every package that
`coreseg[cpu,dev,tracking]` needs (its dependency closure, followed through each package's own requirements, markers
and extras), so that `scripts/setup_env.sh` installs the set the tests last passed with.

torch and torchvision are left out: setup_env.sh installs them itself (CPU torch first, then a CPU-compatible
torchvision without its dependencies). Run with the environment's python: `.venv/bin/python scripts/freeze_constraints.py`.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"coreseg", "torch", "torchvision", "torchaudio", "torchcodec"}  # the project; handled by setup_env.sh
EXTRAS = ("cpu", "dev", "tracking")


def closure(root: str, extras: tuple) -> dict:
    """{canonical name: installed version} of `root[extras]` and everything it requires, recursively."""
    found: dict = {}
    todo = [(root, frozenset(extras))]
    seen = set()
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker matched but that is not installed (optional at run time)
        found[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def main() -> None:
    versions = closure("coreseg", EXTRAS)
    if "coreseg" not in versions:
        sys.exit("coreseg is not installed in this environment (run scripts/setup_env.sh first)")
    lines = [f"{name}=={version}" for name, version in sorted(versions.items()) if name not in SKIP]
    header = ("# Exact versions `make` installs (scripts/setup_env.sh passes this file to pip with -c): the dependency\n"
              "# closure of coreseg[cpu,dev,tracking] as installed when the tests last passed. torch and torchvision\n"
              "# are pinned in setup_env.sh. Regenerate: .venv/bin/python scripts/freeze_constraints.py\n")
    (ROOT / "constraints.txt").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {ROOT / 'constraints.txt'}")


if __name__ == "__main__":
    main()
