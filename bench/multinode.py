"""GRPO step time and bytes moved per weight push on a simulated 3-node cluster vs one node, same preset, same run.

    .venv/bin/python bench/multinode.py --steps 4 --record

Both runs go through `ray job submit` of `coreseg train` (the cluster path users take) to a cluster started on this
machine (deploy/local_cluster.py): one node with 6 CPUs, then a head and two worker nodes with 2 CPUs each
(placement SPREAD, so the 2 learner ranks, 2 rollout and 2 reward workers land on different nodes). Same tiny
preset, data and seeds. Reported: the median `time/step` and `time/push` over the steps after the first, and
`push/bytes_moved` per push, from each run's metrics.jsonl; where the actors ran, from its placement.json. On one
machine the "nodes" share cores and memory: the difference measures the cross-node object transfers and
placement, not network bandwidth.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recording import record  # noqa: E402


def overrides(data: Path, runs: Path, name: str, steps: int) -> list:
    return [f"data.path={data}", f"run.output_dir={runs}", f"run.name={name}", "run.sft_steps=0", f"run.steps={steps}",
            "run.save_every=0", "run.eval_every=0", "data.batch_size=4", "rollout.group_size=4",
            "rollout.max_new_tokens=32", "cluster.learner_workers=2", "cluster.rollout_workers=2",
            "cluster.reward_workers=2", "cluster.placement_strategy=SPREAD"]


def submit(cluster, entry: list, timeout_s: float) -> float:
    from coreseg.deploy.cli import submit_command

    cmd = submit_command(cluster.dashboard, entry)
    cmd[0] = cluster.ray_bin
    start = time.perf_counter()
    for _ in range(60):  # a fresh head's job agent takes a few seconds to register
        result = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    if result.returncode != 0:
        raise RuntimeError(f"job failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def summarize(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("phase") == "grpo" and "time/step" in r][1:]  # the first step warms up
    placement = json.loads((run_dir / "placement.json").read_text())
    return {"step_s": statistics.median(r["time/step"] for r in steps),
            "push_s": statistics.median(r["time/push"] for r in steps),
            "bytes_moved": statistics.median(r["push/bytes_moved"] for r in steps),
            "nodes": len({n for ids in placement.values() for n in ids}), "steps": len(steps)}


def main() -> None:
    from coreseg.common.synth import write_synth
    from coreseg.deploy.local_cluster import start_local_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coreseg-multinode-"))
    data = write_synth(work / "data", 24, 112, 0).parent
    results = {}
    for label, workers, cpus in (("1 node x 6 CPUs", 0, 6), ("3 nodes x 2 CPUs", 2, 2)):
        cluster = start_local_cluster(workers=workers, cpus_per_node=cpus)
        try:
            name = f"n{workers + 1}"
            entry = ["coreseg", "train", "--config", "tiny_cpu", "cluster.mode=cluster",
                     *overrides(data, work / "runs", name, args.steps)]
            wall = submit(cluster, entry, args.timeout)
            results[label] = {**summarize(work / "runs" / name), "wall_s": wall}
        finally:
            cluster.stop()
        print(label, results[label], flush=True)
    one, three = results["1 node x 6 CPUs"], results["3 nodes x 2 CPUs"]
    rows = ["| cluster | nodes used | steps timed | median step s | median push s | bytes moved per push | job wall s |",
            "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['nodes']} | {r['steps']} | {r['step_s']:.2f} | {r['push_s']:.3f} | "
                    f"{r['bytes_moved']:.0f} | {r['wall_s']:.0f} |")
    body = ("\n".join(rows) + f"\n\n3 nodes / 1 node: step time {three['step_s'] / one['step_s']:.2f}x, push time "
            f"{three['push_s'] / one['push_s']:.2f}x (one run each, medians over its steps after the first; the "
            "simulated nodes share this machine's 2 cores).\n")
    print(body)
    if args.record:
        record("Simulated 3-node cluster vs one node (bench/multinode.py)", body)


if __name__ == "__main__":
    main()
