"""RolloutPool with 2 workers in local Ray (HF engine: cheap to start): order kept, versions reported after a
broadcast, one bad request isolated."""
import os

import pytest
import ray

from coreseg.common.config import load_config
from coreseg.common.models.family import family_for_type
from coreseg.common.protocol import RolloutRequest

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM


def test_pool_order_versions_and_isolation(ray_session, tiny_policy_dir, synth_samples):
    from coreseg.rollout.worker import RolloutPool
    from tests.test_rollout_engines import random_bundle

    cfg = load_config("tiny_cpu", ["rollout.engine=hf", "rollout.max_new_tokens=8", "rollout.max_model_len=512"])
    pool = RolloutPool(cfg, tiny_policy_dir, num_workers=2, num_cpus_per_worker=1)
    try:
        reqs = [RolloutRequest(s.id, family_for_type("qwen2_5_vl").prompt(s.question), s.image) for s in synth_samples[:5]]
        reqs[3] = RolloutRequest("broken", reqs[3].prompt, b"\x89PNG broken")
        groups = pool.generate(reqs, n=2, seed=1)
        assert [g.sample_id for g in groups] == [r.sample_id for r in reqs]
        assert groups[3].error and not groups[3].completions
        assert all(len(g.completions) == 2 for i, g in enumerate(groups) if i != 3)
        assert pool.errors() == 1
        bundle, _ = random_bundle(tiny_policy_dir, version=3, seed=0)
        pool.load_weights(ray.put(bundle))
        assert pool.versions() == [3, 3]
        groups = pool.generate(reqs[:2], n=1)
        assert all(c.version == 3 for g in groups for c in g.completions)
        # the two engines share one node: each is pinned to its own cores, with one thread per core
        (_, a), (_, b) = ray.get([w.placement.remote() for w in pool.workers])
        assert a and b and (not set(a) & set(b) or len(os.sched_getaffinity(0)) < 2)
        assert ray.get([w.num_threads.remote() for w in pool.workers]) == [len(a), len(b)]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("cores, workers, per_worker, want", [
    ([0, 1], 2, 1, [[0], [1]]),  # two engines on two cores: one each, never the same one
    ([0, 1], 1, 2, [[0, 1]]),  # sync mode, one engine: every core
    ([0, 1], 1, 1, [[1]]),  # async mode: the rollout half, from the end
    (list(range(16)), 2, 4, [[8, 9, 10, 11], [12, 13, 14, 15]]),
    (list(range(16)), 3, 8, [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]),  # capped at 16 // 3
    ([0, 1], 4, 1, [[0], [1], [0], [1]]),  # more engines than cores: shared round-robin
])
def test_core_slices(cores, workers, per_worker, want):
    from coreseg.rollout.worker import core_slices

    assert core_slices(cores, workers, per_worker) == want


def _cfg():
    return load_config("tiny_cpu", ["rollout.engine=hf", "rollout.max_new_tokens=8", "rollout.max_model_len=512"])


def _requests(samples):
    return [RolloutRequest(s.id, family_for_type("qwen2_5_vl").prompt(s.question), s.image) for s in samples]


def test_pool_recovers_a_killed_worker_with_its_cores_and_weights(ray_session, tiny_policy_dir, synth_samples):
    """A worker killed between or during generate calls is restarted by Ray; the pool starts it on its cores,
    reloads the weights the call expects, and re-sends its shard."""
    from coreseg.rollout.worker import RolloutPool
    from tests.test_rollout_engines import random_bundle

    pool = RolloutPool(_cfg(), tiny_policy_dir, num_workers=2, num_cpus_per_worker=1)
    try:
        reqs = _requests(synth_samples[:4])
        v3, _ = random_bundle(tiny_policy_dir, version=3, seed=0)
        v4, _ = random_bundle(tiny_policy_dir, version=4, seed=1)
        assert pool.load_weights(ray.put(v3)) == [3, 3]
        cores = list(pool._worker_cores)
        # between calls
        ray.kill(pool.workers[0], no_restart=False)
        groups = pool.generate(reqs, n=2, seed=7)
        assert [g.sample_id for g in groups] == [r.sample_id for r in reqs]
        assert all(len(g.completions) == 2 and c.version == 3 for g in groups for c in g.completions)
        assert pool.pool.restarts == 1 and pool.versions() == [3, 3]
        (_, a), _ = ray.get([w.placement.remote() for w in pool.workers])
        assert a == cores[0] and ray.get(pool.workers[0].num_threads.remote()) == len(cores[0])
        # during a generation, with the next version's load queued behind it (async generation): the re-sent
        # shard is sampled with the version it was submitted for, then the queued load is re-sent too
        futures = pool.submit(reqs, n=2, seed=8)
        loading = pool.submit_load(v4)
        ray.kill(pool.workers[1], no_restart=False)
        groups = pool.gather(futures)
        assert [g.sample_id for g in groups] == [r.sample_id for r in reqs]
        assert all(c.version == 3 for g in groups for c in g.completions)
        assert pool.gather_versions(loading) == [4, 4] and pool.versions() == [4, 4]
        assert pool.pool.restarts == 2
        assert all(c.version == 4 for g in pool.generate(reqs[:2], n=1) for c in g.completions)
    finally:
        pool.shutdown()


def test_in_process_pool_matches_the_ray_pool(ray_session, tiny_policy_dir, synth_samples):
    from coreseg.rollout.worker import RolloutPool
    from tests.test_rollout_engines import random_bundle

    reqs = _requests(synth_samples[:3])
    bundle, _ = random_bundle(tiny_policy_dir, version=2, seed=0)
    got = {}
    for local in (True, False):
        pool = RolloutPool(_cfg(), tiny_policy_dir, num_workers=2, local=local)
        try:
            assert pool.load_weights(bundle) == [2, 2] and pool.versions() == [2, 2]
            groups = pool.generate(reqs, n=1, greedy=True)
            got[local] = [(g.sample_id, [c.token_ids for c in g.completions], [c.version for c in g.completions])
                          for g in groups]
            assert pool.errors() == 0
        finally:
            pool.shutdown()
    assert [sid for sid, _, _ in got[True]] == [r.sample_id for r in reqs]
    assert got[True] == got[False]
