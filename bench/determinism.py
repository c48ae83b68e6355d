"""Are runs of one seed the same? Two checks:

    .venv/bin/python bench/determinism.py --learner --record            # learner processes, learner.deterministic off/on
    .venv/bin/python bench/determinism.py --compare RUN_A RUN_B --record   # two finished runs' eval files

--learner: for each setting of `learner.deterministic`, three learner processes (tiny policy, CPU) run the same 8 SFT
steps; each first allocates a differently sized scratch tensor, which moves where the allocator puts what follows.
Reported: the digests of their trainable weights at the end, the number of distinct digests, the last loss and
the median time of an SFT step after the first two (6 steps: a rough figure).
--compare: per eval file both runs hold (eval/<tag>.json) and split, how many samples have the same answer text and
the same Dice in both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LEARNER_SCRIPT = """
import hashlib, sys, time, torch
from coreseg.common.config import load_config
from coreseg.common.models.policy import ensure_policy_dir
from coreseg.common.synth import generate
from coreseg.learner.worker import LearnerCore, free_port
shift = [torch.empty(int(sys.argv[2]) * 17 + 3) for _ in range(5)]  # moves where the allocator puts what follows
cfg = load_config("tiny_cpu", ["learner.micro_batch_size=4", "learner.deterministic=" + sys.argv[3]])
core = LearnerCore(cfg, str(ensure_policy_dir("tiny", sys.argv[1])), master_port=free_port())
samples = generate(4 * int(sys.argv[4]), seed=0, progress=False)
times = []
for step in range(int(sys.argv[4])):
    batch = samples[4 * step:4 * step + 4]
    start = time.perf_counter()
    loss = core.sft_step(batch, core.sft_norm(batch))["ce"]
    times.append(time.perf_counter() - start)
digest = hashlib.sha256()
for module in (core.module.policy, core.module.adapter, core.module.sam.mask_decoder):
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            digest.update(p.detach().numpy().tobytes())
print("DIGEST", digest.hexdigest()[:16], repr(loss), sorted(times[2:])[len(times[2:]) // 2])
"""


def learner_digest(assets: Path, shift: int, deterministic: bool, steps: int = 8) -> tuple:
    """(weight digest, last SFT loss, median seconds of an SFT step after the first two) of one learner process
    after `steps` SFT steps."""
    out = subprocess.run([sys.executable, "-c", LEARNER_SCRIPT, str(assets), str(shift), str(deterministic).lower(),
                          str(steps)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"determinism: the learner process failed:\n{out.stderr[-3000:]}")
    _, digest, loss, step_s = [line for line in out.stdout.splitlines() if line.startswith("DIGEST")][-1].split()
    return digest, float(loss), float(step_s)


def learner_table(assets: Path, shifts=(1, 2, 3)) -> str:
    lines = ["| learner.deterministic | weight digests after 8 SFT steps (3 processes) | distinct | last SFT loss "
             "| median SFT step ms per process |", "|---|---|---|---|---|"]
    for det in (False, True):
        got = [learner_digest(assets, s, det) for s in shifts]
        lines.append(f"| {str(det).lower()} | {' '.join(g[0] for g in got)} | {len({g[0] for g in got})} | "
                     f"{' / '.join(f'{g[1]:.9f}' for g in got)} | {' / '.join(f'{1000 * g[2]:.0f}' for g in got)} |")
    return "\n".join(lines)


def compare_runs(a: Path, b: Path) -> str:
    lines = ["| eval file | split | samples | same answer text | same Dice | mDice A | mDice B |",
             "|---|---|---|---|---|---|---|"]
    for file in sorted((a / "eval").glob("*.json")):
        other = b / "eval" / file.name
        if not other.exists():
            continue
        ra, rb = json.loads(file.read_text()), json.loads(other.read_text())
        for split in ra:
            if split not in rb:
                continue
            by_id = {r["id"]: r for r in rb[split]["records"]}
            pairs = [(r, by_id[r["id"]]) for r in ra[split]["records"] if r["id"] in by_id]
            lines.append(f"| {file.stem} | {split} | {len(pairs)} | {sum(x['text'] == y['text'] for x, y in pairs)} | "
                         f"{sum(x['dice'] == y['dice'] for x, y in pairs)} | {ra[split]['overall']['mDice']:.6f} | "
                         f"{rb[split]['overall']['mDice']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--learner", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"))
    p.add_argument("--assets", default=str(ROOT / ".cache" / "coreseg"))
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    if not args.learner and not args.compare:
        p.error("nothing to do: --learner and/or --compare RUN_A RUN_B")
    parts = []
    if args.learner:
        parts.append(learner_table(Path(args.assets)))
    if args.compare:
        parts.append(f"Runs: A = `{args.compare[0]}`, B = `{args.compare[1]}`\n\n" +
                     compare_runs(Path(args.compare[0]), Path(args.compare[1])))
    body = "\n\n".join(parts)
    print(body)
    if args.record:
        from bench.recording import record

        record("Runs of one seed: the same weights and answers? (bench/determinism.py)", body)


if __name__ == "__main__":
    main()
