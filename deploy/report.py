"""`report.md` with PNG plots from a run's metrics.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from coreseg.common.metrics import markdown_deltas, paired_deltas
from coreseg.deploy.metrics_log import read_metrics


def _series(records: List[dict], phase: str, key: str):
    pts = [(r["step"], r[key]) for r in records if r["phase"] == phase and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, title: str, curves: Dict[str, tuple]) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    sections = []
    grpo = [r for r in records if r["phase"] == "grpo" and "reward/total" in r]
    reward_keys = sorted({k for r in grpo for k in r if k.startswith("reward/") and k != "reward/format_ok"})
    specs = [
        ("rewards.png", "GRPO rewards (mean over rollouts)", "grpo", reward_keys),
        ("eval.png", "Evaluation", "eval", sorted({k for r in records if r["phase"] == "eval" for k in r
                                                    if k.endswith(("mDice", "failure_rate"))})),
        ("timings.png", "Phase timings (s)", "grpo", ["time/rollout", "time/forward", "time/reward",
                                                      "time/update", "time/push", "time/step"]),
        ("policy.png", "Clip fraction and KL", "grpo", ["learner/clip_frac", "learner/kl"]),
        ("learning.png", "Learning signals", "grpo", ["policy/entropy", "rollout/truncation_ratio",
                                                      "adv/group_reward_std", "adv/zero_variance_share"]),
        ("sft.png", "SFT loss", "sft", ["loss", "ce", "dice_ce"]),
    ]
    for name, title, phase, keys in specs:
        if _plot(plots / name, title, {k: _series(records, phase, k) for k in keys}):
            sections.append(f"## {title}\n\n![{title}](plots/{name})\n")
    summary = []
    if grpo:
        first, last = grpo[0], grpo[-1]
        k = max(1, len(grpo) // 3)
        head = sum(r["reward/total"] for r in grpo[:k]) / k
        tail = sum(r["reward/total"] for r in grpo[-k:]) / k
        summary.append(f"- GRPO steps: {len(grpo)}; mean total reward {first['reward/total']:.3f} (step "
                       f"{first['step']}) -> {last['reward/total']:.3f} (step {last['step']}); mean of first "
                       f"{k} steps {head:.3f}, of last {k} steps {tail:.3f}.")
        timing = {k: sum(r.get(k, 0) for r in grpo) / len(grpo) for k in
                  ("time/rollout", "time/forward", "time/reward", "time/update", "time/push", "time/step")}
        summary.append("- Mean phase time per step: " + ", ".join(f"{k[5:]} {v:.2f}s" for k, v in timing.items()))
    sections += eval_sections(run_dir / "eval")
    text = "# CORE-Seg run report\n\n" + f"Run: `{run_dir}`\n\n" + "\n".join(summary) + "\n\n" + "\n".join(sections)
    out = run_dir / "report.md"
    out.write_text(text)
    return out


def eval_sections(folder: Path) -> List[str]:
    """The start (step 0: the SFT result) and final eval tables with their intervals, and the paired
    start -> final deltas per split; then the same for answers sampled as in training (run.eval_sampled)."""
    import json

    from coreseg.deploy.evaluation import SAMPLED, START_TAG

    out = []
    for kind, suffix in (("", ""), (", answers sampled as in training", SAMPLED)):
        start_tag, end_tag = f"{START_TAG}{suffix}", f"final{suffix}"
        for tag, title in ((start_tag, "Evaluation at the start of GRPO (step 0)"), (end_tag, "Evaluation at the end")):
            md = folder / f"{tag}.md"
            if md.exists():
                out.append(md.read_text().replace(f"# Evaluation ({tag})", f"## {title}{kind}", 1)
                           .replace("\n## ", "\n### "))
        if (folder / f"{start_tag}.json").exists() and (folder / f"{end_tag}.json").exists():
            start, end = (json.loads((folder / f"{t}.json").read_text()) for t in (start_tag, end_tag))
            deltas = {split: paired_deltas(start[split]["records"], end[split]["records"])
                      for split in end if split in start}
            out.append(f"## Start -> end of GRPO{kind}\n\n" + markdown_deltas(deltas, "step 0", "final") + "\n")
    return out
