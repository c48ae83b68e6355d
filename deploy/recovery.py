"""What the driver does when a role is lost mid-run: the restarts of every role as metrics, and the rebuild of a
lost learner group from the latest checkpoint, retried while Ray brings the lost bundles back.

Rollout and reward workers are restarted by Ray and brought back by their pools (common/actor_pool.py); a
learner rank cannot rejoin DeepSpeed's process group, so the whole group is rebuilt and the run goes on from the
latest complete checkpoint (the steps after it are redone, and logged once)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict

from coreseg.common.actor_pool import ACTOR_GONE, ActorPoolError

if TYPE_CHECKING:  # pragma: no cover
    from coreseg.deploy.driver import Driver

RETRY_PAUSE_S = 2.0


def _retried(err: Exception) -> bool:
    """Whether a rebuild that failed with `err` is tried again: a lost actor or node, an actor killed by Ray's
    memory monitor, bundles still being placed; not an error raised by the learner's own code."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(err, (ActorPoolError, TimeoutError, *ACTOR_GONE)):
        return True
    return isinstance(err, RayError) and not isinstance(err, RayTaskError)


def restart_counts(driver: "Driver") -> Dict[str, float]:
    """Restarts so far in this driver, per role: `restarts/learner` (group rebuilds), `restarts/rollout` and
    `restarts/reward` (workers recovered by their pools, whatever the cause)."""
    out = {"restarts/learner": float(driver.learner_restarts)}
    for role, pool in (("rollout", driver.rollout), ("reward", driver.reward)):
        if pool is not None:
            out[f"restarts/{role}"] = float(pool.pool.restarts)
    return out


def wait_for_bundles(group, deadline: float) -> None:
    """Waits until every bundle of the placement group is placed again (Ray reschedules the bundles of a dead
    node onto the nodes left, or onto a node that joins); TimeoutError at `deadline` (time.monotonic())."""
    from ray.util import placement_group_table

    while True:
        state = placement_group_table(group).get("state")
        if state == "CREATED":
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the run's placement group is still {state}: the bundles of the lost node found no "
                               f"room in the cluster")
        time.sleep(0.5)


def recover_learner(driver: "Driver", err: Exception) -> None:
    """A learner rank (or its node) is lost: rebuild the group in its bundles, load the latest checkpoint, push
    its weights and go on from there, at most `run.max_failures` times. The rebuild is retried until
    `cluster.placement_timeout_s` while the lost bundles are being placed again."""
    from coreseg.learner.group import LearnerGroup

    cfg = driver.cfg
    driver.learner_restarts += 1
    if driver.learner_restarts > cfg.run.max_failures:
        raise RuntimeError(f"learner lost {driver.learner_restarts} times (run.max_failures="
                           f"{cfg.run.max_failures}); last failure: {err}") from err
    latest = driver.run.latest_checkpoint()
    if latest is None:
        raise RuntimeError(f"learner lost before the first checkpoint ({err}); nothing to resume from") from err
    print(f"[coreseg] learner lost ({type(err).__name__}: {str(err).splitlines()[0][:200]}); rebuilding it "
          f"from {latest} (restart {driver.learner_restarts}/{cfg.run.max_failures})")
    lost_at = driver.step["grpo"]
    start = time.monotonic()
    deadline = start + cfg.cluster.placement_timeout_s
    while True:
        driver.learner.shutdown()
        try:
            if driver.reservation is not None:
                wait_for_bundles(driver.reservation.group, deadline)
            driver.learner = LearnerGroup(cfg, driver.policy_source, **driver._learner_args)
            driver.restore(version_after=driver.version)
            break
        except Exception as again:  # noqa: BLE001 - retried while Ray brings resources back, else re-raised
            if not _retried(again):
                raise
            if time.monotonic() >= deadline:
                raise RuntimeError(f"learner could not be rebuilt within cluster.placement_timeout_s="
                                   f"{cfg.cluster.placement_timeout_s:g} s: {again}") from again
            print(f"[coreseg] rebuilding the learner failed ({type(again).__name__}: "
                  f"{str(again).splitlines()[0][:200]}); retrying in {RETRY_PAUSE_S:g} s")
            time.sleep(RETRY_PAUSE_S)
    driver.logger.log("fault", driver.step["grpo"], {
        "learner_restarts": float(driver.learner_restarts), "lost_after_step": float(lost_at),
        "recover_s": time.monotonic() - start, "error": f"{type(err).__name__}: {str(err)[:500]}"})


def resume(driver: "Driver") -> None:
    """`coreseg train --resume`: go on from the run's latest complete checkpoint. A run killed before its first
    checkpoint was complete (a kill during the only save) starts over from step 0: its metrics are cleared, as
    every step will be redone."""
    if driver.run.latest_checkpoint() is not None:
        driver.restore()
        return
    print(f"[coreseg] {driver.run} holds no complete checkpoint: the run starts over from step 0")
    driver.logger.clear()
