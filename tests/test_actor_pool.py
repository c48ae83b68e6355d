"""ActorPool with a small test actor: sharding and order, put-once broadcast with its version, recovery of a killed
actor (re-initialised, weights reloaded, call re-sent), bounded waits and retries with clear errors, and the
in-process mode giving what Ray mode gives."""
import os
import time

import pytest

from coreseg.common.actor_pool import ActorPool, ActorPoolError, ActorStateLost, StaleWeightsError, balanced_shards

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM


class Echo:
    """Test actor: state a restart loses (`started`, the weights version); `work` tags each item with who
    answered and with which version."""

    def __init__(self, index: int, needs_start: bool = True):
        self.index, self.version, self.started, self.loads = index, 0, not needs_start, []

    def start(self) -> int:
        self.started = True
        return self.index

    def load_weights(self, payload) -> int:
        self.version = int(payload["version"])
        self.loads.append(self.version)
        return self.version

    def work(self, shard, scale=1, seed=None, expected_version=None, sleep_s=0.0):
        if not self.started:
            raise ActorStateLost(f"echo {self.index} not started")
        if expected_version is not None and expected_version != self.version:
            raise StaleWeightsError(f"echo {self.index} serves {self.version}, expected {expected_version}")
        time.sleep(sleep_s)
        return [(x * scale, self.index, self.version, seed) for x in shard]

    def state(self):
        return {"index": self.index, "version": self.version, "started": self.started, "loads": list(self.loads)}

    def pid(self) -> int:
        return os.getpid()

    def fail(self):
        raise ValueError("bad input for echo")

    def die(self):
        os._exit(1)


def _pool(local, n=2, restarts=-1, reinit=True, needs_start=True, **kw):
    holder = {}

    def restart(i):  # re-initialise hook: calls the handle directly, as the pool requires
        import ray
        ray.get(holder["pool"].actors[i].start.remote())

    pool = ActorPool("echo", Echo, n, lambda i: ((i,), {"needs_start": needs_start}), local=local,
                     options=dict(num_cpus=0.5, max_restarts=restarts), reinit=restart if reinit else None, **kw)
    holder["pool"] = pool
    pool.call_all("start")
    return pool


@pytest.mark.parametrize("n, k, sizes", [(5, 2, [3, 2]), (5, 4, [2, 1, 1, 1]), (8, 4, [2, 2, 2, 2]),
                                         (2, 4, [1, 1, 0, 0]), (0, 3, [0, 0, 0]), (7, 1, [7])])
def test_balanced_shards_by_hand(n, k, sizes):
    shards = balanced_shards(n, k)
    assert [len(s) for s in shards] == sizes
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in order


def test_balanced_shards_sizes_differ_by_at_most_one():
    for n in range(0, 30):
        for k in range(1, 7):
            sizes = [len(s) for s in balanced_shards(n, k)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert (0 in sizes) == (n < k)
    with pytest.raises(ValueError, match="at least one actor"):
        balanced_shards(3, 0)


def _script(pool):
    """The same calls, run on a pool in either mode; returns everything they answered."""
    out = {"load": pool.gather(pool.broadcast({"version": 3})), "version": pool.version}
    items = list(range(10, 17))
    calls = pool.scatter("work", items, scale=2, expected_version=pool.version, per_shard=lambda i: {"seed": 100 + i})
    out["contiguous"] = pool.gather_rows(calls)
    calls = pool.scatter("work", items, shards=[[6, 0, 3], [5, 1, 2, 4]])
    out["custom"] = pool.gather_rows(calls)
    out["states"] = pool.call_all("state")
    out["one"] = pool.call(1, "work", [1])
    return out


def test_in_process_mode_gives_what_ray_mode_gives(ray_session):
    local, remote = _pool(local=True, n=3), _pool(local=False, n=3)
    try:
        got_local, got_ray = _script(local), _script(remote)
        with pytest.raises(ValueError, match="bad input for echo"):
            local.call(0, "fail")
        with pytest.raises(ValueError, match="bad input for echo"):  # Ray's task error is also a ValueError
            remote.call(0, "fail")
    finally:
        local.shutdown()
        remote.shutdown()
    assert got_local == got_ray
    # by hand: 7 items over 3 actors -> shards [10,11,12] [13,14] [15,16]; x2; version 3; seed 100 + actor
    assert got_local["contiguous"] == [(20, 0, 3, 100), (22, 0, 3, 100), (24, 0, 3, 100), (26, 1, 3, 101),
                                       (28, 1, 3, 101), (30, 2, 3, 102), (32, 2, 3, 102)]
    # custom shards: item k answered by the actor whose shard holds k, results back in item order
    owner = {6: 0, 0: 0, 3: 0, 5: 1, 1: 1, 2: 1, 4: 1}
    assert got_local["custom"] == [(10 + k, owner[k], 3, None) for k in range(7)]
    assert got_local["load"] == [3, 3, 3] and got_local["version"] == 3
    assert got_local["states"] == [{"index": i, "version": 3, "started": True, "loads": [3]} for i in range(3)]


def test_broadcast_puts_once_and_tracks_the_version(ray_session, monkeypatch):
    ray = ray_session
    pool = _pool(local=False, n=3)
    puts = []
    real_put = ray.put

    def counting_put(value, **kw):
        puts.append(value)
        return real_put(value, **kw)

    monkeypatch.setattr(ray, "put", counting_put)
    try:
        assert pool.version == 0  # nothing broadcast yet
        calls = pool.broadcast({"version": 5})
        assert len(puts) == 1
        assert len({c.args[0] for c in calls}) == 1 and isinstance(calls[0].args[0], ray.ObjectRef)
        assert pool.version is None  # loads sent, not answered yet
        assert pool.gather(calls) == [5, 5, 5] and pool.version == 5
        ref = real_put({"version": 6})
        assert pool.gather(pool.broadcast(ref)) == [6, 6, 6] and len(puts) == 1  # a ref is not put again
        assert pool.weights.payload == ref and pool.version == 6
    finally:
        pool.shutdown()


def _wait_restarted(ray, pool, i, old_pid, timeout=60.0):
    """Waits until actor i answers from a new process (Ray restarted it) without going through the pool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.get(pool.actors[i].pid.remote(), timeout=5) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"actor {i} was not restarted")


def test_recovery_after_a_kill_between_and_during_calls(ray_session):
    ray = ray_session
    pool = _pool(local=False, n=2)
    try:
        pool.gather(pool.broadcast({"version": 4}))
        # between calls: actor 0 restarts silently (not started, version 0); the next call notices and recovers
        pid0 = pool.call(0, "pid")
        ray.kill(pool.actors[0], no_restart=False)
        _wait_restarted(ray, pool, 0, pid0)
        got = pool.gather_rows(pool.scatter("work", [1, 2, 3, 4], expected_version=pool.version))
        assert got == [(1, 0, 4, None), (2, 0, 4, None), (3, 1, 4, None), (4, 1, 4, None)]
        assert pool.restarts == 1 and pool.restart_causes["state_lost"] == 1
        state = pool.call(0, "state")
        assert state == {"index": 0, "version": 4, "started": True, "loads": [4]}  # the restarted process's own
        # during a call: actor 1 is killed while it works on its shard; the shard is re-sent after recovery
        pid1 = pool.call(1, "pid")
        calls = pool.scatter("work", [5, 6, 7, 8], expected_version=pool.version, sleep_s=1.0)
        time.sleep(0.3)
        ray.kill(pool.actors[1], no_restart=False)
        assert pool.gather_rows(calls) == [(5, 0, 4, None), (6, 0, 4, None), (7, 1, 4, None), (8, 1, 4, None)]
        assert pool.restarts == 2 and pool.restart_causes["actor_died"] == 1
        assert pool.call(1, "pid") != pid1 and pool.call(1, "state")["loads"] == [4]
    finally:
        pool.shutdown()


def test_silent_restart_is_caught_by_the_version_check(ray_session):
    ray = ray_session
    pool = _pool(local=False, n=1, reinit=False, needs_start=False)
    try:
        pool.gather(pool.broadcast({"version": 2}))
        pid = pool.call(0, "pid")
        ray.kill(pool.actors[0], no_restart=False)
        _wait_restarted(ray, pool, 0, pid)
        assert pool.call(0, "work", [9], expected_version=pool.version) == [(9, 0, 2, None)]
        assert dict(pool.restart_causes) == {"stale_weights": 1}
    finally:
        pool.shutdown()


def _wait_until_alive(ray, actor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.state.remote())
            return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_retries_are_bounded_with_a_clear_error(ray_session):
    pool = _pool(local=False, n=1, max_retries=2)
    try:
        with pytest.raises(ActorPoolError, match=r"echo actor 0 \(die\) still failing \(actor_died\) after 2"):
            pool.call(0, "die")  # every attempt kills the actor again
        assert pool.restarts == 2
        _wait_until_alive(ray_session, pool.actors[0])  # the last `die` left it restarting: not a failure to count
        with pytest.raises(ValueError, match="bad input"):  # an ordinary error is raised at once, not retried
            pool.call(0, "fail")
        assert pool.restarts == 2
    finally:
        pool.shutdown()


def _kill_and_wait_dead(ray, actor, timeout_s: float = 30.0) -> None:
    """ray.kill is asynchronous: a call sent right after it may still be served. Wait until calls fail."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.state.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.1)
    raise AssertionError("killed actor still answers")


def test_an_actor_that_does_not_come_back_is_named(ray_session):
    ray = ray_session
    pool = _pool(local=False, n=2, recover_wait_s=1.0)
    try:
        _kill_and_wait_dead(ray, pool.actors[1])
        with pytest.raises(ActorPoolError, match=r"echo actor 1 did not come back within 1 s after actor_died"):
            pool.call_all("state")
    finally:
        pool.shutdown()


def test_a_pool_without_restarts_fails_at_once(ray_session):
    ray = ray_session
    pool = _pool(local=False, n=2, restarts=0)
    try:
        _kill_and_wait_dead(ray, pool.actors[0])
        start = time.monotonic()
        with pytest.raises(ActorPoolError, match=r"echo actor 0 \(state\) failed \(actor_died\); this pool does not"):
            pool.call(0, "state")
        assert time.monotonic() - start < 10 and pool.restarts == 0
    finally:
        pool.shutdown()


@pytest.mark.parametrize("local", [True, False])
def test_shutdown_is_idempotent(local, request):
    if not local:
        request.getfixturevalue("ray_session")
    pool = _pool(local=local, n=2)
    actors = list(pool.actors)
    pool.shutdown()
    pool.shutdown()
    assert pool.actors == []
    with pytest.raises(ActorPoolError, match="echo pool is shut down"):
        pool.call(0, "state")
    if not local:  # ray.kill is asynchronous: a call sent right after it may still be served, then none is
        import ray
        deadline = time.monotonic() + 30
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(actors[0].state.remote())
                time.sleep(0.1)
