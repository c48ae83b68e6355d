"""Which failures the recovery paths treat as a lost actor (no Ray cluster needed): the pools re-send a call whose
actor died, is restarting or was killed by Ray's memory monitor; a learner rebuild is retried on Ray's system
errors, never on an error raised by the learner's own code."""
from __future__ import annotations

from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, OutOfMemoryError, RayTaskError

from coreseg.common.actor_pool import ActorPoolError, StaleWeightsError, _lost_cause
from coreseg.deploy.recovery import _retried


def test_the_pool_recovers_dead_restarting_and_oom_killed_actors():
    assert _lost_cause(ActorDiedError()) == "actor_died"
    assert _lost_cause(ActorUnavailableError("restarting", None)) == "actor_died"
    assert _lost_cause(OutOfMemoryError("killed by the memory monitor")) == "actor_died"
    assert _lost_cause(StaleWeightsError("serves version 3")) == "stale_weights"
    assert _lost_cause(ValueError("bad input")) is None


def test_a_learner_rebuild_is_retried_on_system_errors_only():
    for err in (ActorDiedError(), OutOfMemoryError("oom"), ActorPoolError("learner actor 0 failed"),
                TimeoutError("bundles still RESCHEDULING"), ObjectLostError("00" * 28, "owner", "call site")):
        assert _retried(err), err
    own = RayTaskError("LearnerWorker.load_checkpoint", "Traceback ...", ValueError("checkpoint is corrupted"))
    for err in (own, ValueError("checkpoint is corrupted"), FileNotFoundError("latest")):
        assert not _retried(err), err
