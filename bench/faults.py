"""Fault table: each fault injected into tiny GRPO runs, with what the run kept.

    .venv/bin/python bench/faults.py --repeats 1 --record

Every fault is a SIGKILL of real processes by PID (deploy/fault_injection.py) at a chosen point of a tiny run
(tiny_cpu preset, hf engine, 2 prompts x 3 completions per step):

- rollout worker mid-generation, reward worker during the weight push, learner mid-update, learner during a
  periodic save: one in-process driver on a local Ray, the kill at a chosen actor call;
- the driver during its final save: `coreseg train` in a process of its own, SIGKILLed (with its Ray) while
  the final checkpoint is being written, then `coreseg train --resume`;
- a worker node: a simulated 3-node cluster (deploy/local_cluster.py), every process of the worker node with the
  most actors SIGKILLed after step 1, the run (`coreseg train`, joined to the cluster) left to finish.

Reported per fault, from each run's metrics.jsonl: runs that completed their planned steps; samples lost (planned
prompts that no step record accounts for: missing steps, failed generations, prompts neither kept nor dropped by
the advantage filter); steps duplicated (step records beyond one per step); time to recover: seconds from the kill
until the run logs a step beyond the last one logged before the kill, so it includes the rest of the interrupted
step (and, for the learner, the steps redone from its checkpoint); for the driver kill: until the resumed process
logs the redone last step again (its start, Ray's and the actors' included). A run that fails before its fault
is injected (on a shared machine: an actor killed for memory while starting) is started again, at most twice, and
the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recording import record  # noqa: E402

STEPS, BATCH = 3, 2
RESTARTS = 2  # times a run that failed before its fault (not the fault's doing) is started again
TINY = ["run.sft_steps=0", "run.eval_every=0", f"data.batch_size={BATCH}", "rollout.group_size=3",
        "rollout.max_new_tokens=16", "rollout.engine=hf", f"run.steps={STEPS}"]


class NotInjected(RuntimeError):
    """The run failed before its fault was injected (on a shared machine: a worker killed for memory): it says
    nothing about the fault and is started again."""


def step_records(run: Path) -> list:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if r.get("phase") == "grpo" and "reward/total" in r:
            out.append(r)
    return out


class StepWatch:
    """Polls a run's metrics.jsonl and notes when each GRPO step is first logged (time.monotonic())."""

    def __init__(self, run: Path):
        self.run, self.first_seen, self._stop = run, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for r in step_records(self.run):
                self.first_seen.setdefault(r["step"], now)
            time.sleep(0.05)

    def recovered_after(self, kill_at: float, done_before: int) -> float | None:
        """Seconds from the kill to the first step newer than `done_before`, the last step logged when the kill
        came (None if none came)."""
        later = [t for s, t in self.first_seen.items() if s > done_before]
        return min(later) - kill_at if later else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def account(run: Path, steps: int) -> dict:
    """Completed, samples lost and steps duplicated, from the run's metrics."""
    recs = step_records(run)
    by_step = {}
    for r in recs:
        by_step.setdefault(r["step"], r)
    lost = BATCH * sum(1 for s in range(1, steps + 1) if s not in by_step)
    for r in by_step.values():  # a failed generation is neither kept nor dropped
        lost += BATCH - int(r["adv/kept_groups"] + r["adv/dropped_groups"])
    return {"completed": sorted(by_step) == list(range(1, steps + 1)), "lost": lost,
            "duplicated": len(recs) - len(by_step)}


def in_process(data: Path, out: Path, name: str, kills: list, extra: list) -> dict:
    """A driver in this process on the local Ray, the `kills` armed from the start."""
    from coreseg.common.config import load_config
    from coreseg.deploy.cluster import shutdown_ray

    cfg = load_config("tiny_cpu", [f"data.path={data}", f"run.output_dir={out}", f"run.name={name}", *TINY, *extra])
    run = out / name
    try:
        return _in_process(cfg, run, kills)
    finally:
        shutdown_ray()  # each run on a Ray of its own: nothing a failed run left behind holds the next one


def _in_process(cfg, run: Path, kills: list) -> dict:
    from coreseg.deploy.driver import Driver
    from coreseg.deploy.fault_injection import kill_on_call

    try:
        driver = Driver(cfg, run)
    except Exception as err:  # noqa: BLE001 - before any kill
        raise NotInjected(f"{type(err).__name__}: {err}") from err
    logged = {}  # step -> when its record was first written (exact: the logger is in this process)
    original_log = driver.logger.log

    def log(phase, step, values):
        original_log(phase, step, values)
        if phase == "grpo" and "reward/total" in values:
            logged.setdefault(step, time.monotonic())

    driver.logger.log = log
    try:
        with kill_on_call(*kills):
            driver.train(STEPS, save_at_end=True)
    except Exception as err:  # noqa: BLE001 - a failure before the first kill is not the fault's
        if not kills[0].killed:
            raise NotInjected(f"{type(err).__name__}: {err}") from err
        raise
    finally:
        driver.close()
    kill_at = kills[0].at[0]
    done = max([s for s, t in logged.items() if t < kill_at], default=0)
    later = [t for s, t in logged.items() if s > done]
    return {**account(run, STEPS), "recover_s": min(later) - kill_at if later else None}


def driver_final_save(data: Path, out: Path, name: str) -> dict:
    from coreseg.deploy.fault_injection import kill_tree, process_tree

    run = out / name
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "coreseg.deploy.cli", "train", "--config", "tiny_cpu", f"data.path={data}",
           f"run.output_dir={out}", f"run.name={name}", "run.save_every=2", "cluster.reward_workers=1", *TINY]
    partial = run / "checkpoints" / f"grpo_{STEPS:06d}_sft_000000.tmp"
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):
        if proc.poll() is not None:
            raise NotInjected(f"the run ended before its final save: {(out / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.01)
    kill_tree(process_tree(proc.pid))
    kill_at = time.monotonic()
    if (run / "checkpoints" / f"grpo_{STEPS:06d}_sft_000000").exists():
        raise NotInjected("the kill came after the final save had finished")
    with (out / f"{name}.resume.log").open("w") as log:
        resumed = subprocess.Popen([sys.executable, "-m", "coreseg.deploy.cli", "train", "--resume", str(run)], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    # every step was logged before the kill; the resume truncates the metrics to its checkpoint (step 2) and
    # redoes the last step: recovered when that step is logged again
    truncated, back = False, None
    while resumed.poll() is None:
        has_last = any(r["step"] == STEPS for r in step_records(run))
        truncated = truncated or not has_last
        if truncated and has_last and back is None:
            back = time.monotonic() - kill_at
        time.sleep(0.05)
    if resumed.returncode != 0:
        raise RuntimeError(f"the resumed run failed: {(out / f'{name}.resume.log').read_text()[-2000:]}")
    return {**account(run, STEPS), "recover_s": back}


def worker_node(data: Path, out: Path, name: str) -> dict:
    from coreseg.deploy.fault_injection import kill_tree, process_tree
    from coreseg.deploy.local_cluster import start_local_cluster

    run = out / name
    steps = 4
    cmd = [sys.executable, "-m", "coreseg.deploy.cli", "train", "--config", "tiny_cpu", "cluster.mode=cluster",
           f"data.path={data}", f"run.output_dir={out}", f"run.name={name}", *TINY, f"run.steps={steps}",
           "run.save_every=1", "cluster.learner_workers=1", "cluster.rollout_workers=2", "cluster.reward_workers=2",
           "cluster.placement_strategy=SPREAD"]
    # the head declares a silent node dead after ~3 s instead of the default ~30 s
    health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "3"}
    saved = {k: os.environ.get(k) for k in health}
    os.environ.update(health)
    try:
        cluster = start_local_cluster(workers=2, cpus_per_node=3)
    except Exception as err:  # noqa: BLE001 - e.g. a `ray start` that failed on a loaded machine
        raise NotInjected(f"the cluster did not start: {type(err).__name__}: {err}") from err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    proc = None
    try:
        with (out / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(cluster.env, RAY_ADDRESS=cluster.address), stdout=log,
                                    stderr=subprocess.STDOUT)
        watch = StepWatch(run)
        while not ((run / "checkpoints" / "latest").exists() and step_records(run)):
            if proc.poll() is not None:
                raise NotInjected(f"the run ended before step 1: {(out / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        placement = json.loads((run / "placement.json").read_text())
        dirs = cluster.node_ids()
        hosted: dict = {}
        for role, nodes in placement.items():
            for node in nodes:
                if dirs[node] != cluster.temp_dirs[0]:
                    hosted.setdefault(node, []).append(role)
        victim = max(hosted, key=lambda n: ("learner" in hosted[n], len(hosted[n])))
        done = max(r["step"] for r in step_records(run))
        kill_at = time.monotonic()
        cluster.kill_node(dirs[victim])
        proc.wait(timeout=1800)
        watch.stop()
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(process_tree(proc.pid))
        cluster.stop()
    return {**account(run, steps), "recover_s": watch.recovered_after(kill_at, done),
            "note": "node held " + " + ".join(sorted(hosted[victim]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs per fault")
    ap.add_argument("--only", nargs="*", help="fault keys to run (default: all)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    from coreseg.common.synth import write_synth
    from coreseg.deploy.fault_injection import Kill

    work = Path(tempfile.mkdtemp(prefix="coreseg-faults-"))
    data = write_synth(work / "data", 16, 112, 0).parent
    faults = {
        "rollout": ("rollout worker SIGKILLed mid-generation (step 2)",
                    lambda n: in_process(data, work, n, [Kill("rollout", "generate", nth=2)], ["run.save_every=0"])),
        "reward": ("reward worker SIGKILLed during the weight push after step 1",
                   lambda n: in_process(data, work, n, [Kill("reward", "load_weights", actor=1, nth=2)],
                                        ["run.save_every=0", "cluster.reward_workers=2"])),
        "learner": ("learner SIGKILLed mid-update (step 2; checkpoint at 1)",
                    lambda n: in_process(data, work, n, [Kill("learner", "update_rows", nth=2)],
                                         ["run.save_every=1", "cluster.reward_workers=1"])),
        "learner_save": ("learner SIGKILLed during the periodic save of step 2",
                         lambda n: in_process(data, work, n, [Kill("learner", "save_checkpoint", nth=2)],
                                              ["run.save_every=1", "cluster.reward_workers=1"])),
        "driver": ("driver (coreseg train) SIGKILLed during its final save, then --resume",
                   lambda n: driver_final_save(data, work, n)),
        "node": ("worker node of a 3-node cluster SIGKILLed after step 1 (4 steps)",
                 lambda n: worker_node(data, work, n)),
    }
    rows = []
    for key, (title, run) in faults.items():
        if args.only and key not in args.only:
            continue
        results, restarted = [], 0
        for k in range(args.repeats):
            for attempt in range(1 + RESTARTS):
                try:
                    results.append(run(f"{key}-{k}-{attempt}"))
                except NotInjected as err:
                    print(f"[faults] {key} run {k} failed before its fault: {err}")
                    restarted += 1
                    if attempt < RESTARTS:
                        continue
                    results.append({"completed": False, "lost": None, "duplicated": None, "recover_s": None})
                except Exception as err:  # noqa: BLE001 - a run that did not complete is a row of the table
                    print(f"[faults] {key} run {k} failed: {type(err).__name__}: {err}")
                    results.append({"completed": False, "lost": None, "duplicated": None, "recover_s": None})
                break
            print(f"[faults] {key} run {k}: {results[-1]}")
        if restarted:
            results[-1]["note"] = "; ".join(filter(None, [results[-1].get("note"), f"{restarted} start(s) failed "
                                                          f"before the fault was injected, started again"]))
        recover = [r["recover_s"] for r in results if r.get("recover_s") is not None]
        counted = [r for r in results if r["lost"] is not None]  # runs that got as far as their metrics
        rows.append((title, f"{sum(r['completed'] for r in results)}/{len(results)}",
                     sum(r["lost"] for r in counted) if counted else "-",
                     sum(r["duplicated"] for r in counted) if counted else "-",
                     f"{statistics.median(recover):.1f}" if recover else "-",
                     "; ".join(r["note"] for r in results if r.get("note"))))
    table = ["| fault | runs completed | samples lost | steps duplicated | time to recover (s, median) | note |",
             "|---|---|---|---|---|---|"]
    table += [f"| {t} | {c} | {lost} | {dup} | {rec} | {note} |" for t, c, lost, dup, rec, note in rows]
    body = "\n".join(table)
    print(body)
    print(f"[faults] runs and their logs: {work}")
    if args.record:
        record("Faults: SIGKILL of each role, the driver and a node in tiny runs",
               "Machine: 2-core CPU, shared with other jobs (times include waiting for the cores)  \n"
               f"Tiny runs of {STEPS} GRPO steps (the node run: 4) of {BATCH} prompts x 3 completions; samples lost "
               "and steps duplicated are summed over the runs. Time to recover: from the kill until the run logs a "
               "step beyond the last one logged before the kill (the rest of the interrupted step included; the "
               "learner also redoes the steps after its checkpoint; the driver: until the resumed process logs the "
               "redone last step).\n\n" + body,
               machine_line=None)


if __name__ == "__main__":
    main()
