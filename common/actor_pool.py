"""ActorPool: N actors of one class, in Ray or in this process, with the plumbing the rollout, reward and learner
groups share: creation, contiguous balanced sharding (and the way back to input order), put-once broadcast of a
weight payload with its version, recovery of an actor that died or restarted, and shutdown.

In-process mode (`local=True`) instantiates the same class in the caller's process and runs every call at once,
so the same pool code (and the driver above it) runs without Ray; calls return `PoolCall`s in both modes.

With a `RolePlacement` (deploy/placement.py plans it, deploy/cluster.py reserves it), actor i is scheduled in
its bundle of a Ray placement group, asking that bundle for its slot's CPUs and GPUs; in-process mode ignores it."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import ray
from ray.exceptions import ActorUnavailableError, OutOfMemoryError, RayActorError

# a call fails with these when its actor's process is gone: died, restarting, or killed by Ray's memory monitor
ACTOR_GONE = (RayActorError, ActorUnavailableError, OutOfMemoryError)
MAX_RETRIES = 3  # re-sends of one call before the pool gives up
RECOVER_WAIT_S = 60.0  # how long a restarting actor may take to come back


class ActorStateLost(RuntimeError):
    """The actor answered but lacks the state the pool gave it (it was restarted): the pool re-initialises it
    and re-sends the call."""


class StaleWeightsError(ActorStateLost):
    """A worker serves another policy version than expected (a worker restarted, or a push went wrong)."""


class ActorPoolError(RuntimeError):
    """An actor of a pool failed for good: it did not come back after a restart, or its retries ran out."""


def current_node_id() -> str:
    """The Ray node this code runs on ("local" outside Ray): actors report it so a run can record its placement."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def balanced_shards(n_items: int, n_actors: int) -> List[range]:
    """Contiguous index ranges, one per actor, whose sizes differ by at most 1; empty ranges (at the end) only
    when there are fewer items than actors. Concatenated in order they are range(n_items)."""
    if n_actors < 1:
        raise ValueError(f"need at least one actor to shard over, got {n_actors}")
    base, extra = divmod(n_items, n_actors)
    bounds = [0]
    for i in range(n_actors):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(n_actors)]


@dataclass
class Broadcast:
    """One weight payload sent to every actor: its ObjectRef (the object itself in-process) and the version the
    actors reported serving once loaded (None until a load answered)."""
    payload: Any
    version: Optional[int] = None


class _Done:
    """An in-process call's outcome, held like a future: its value, or the exception it raised."""

    def __init__(self, fn: Callable[[], Any]):
        self.value, self.error = None, None
        try:
            self.value = fn()
        except Exception as err:  # re-raised by `get`, as ray.get re-raises an actor's error
            self.error = err

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class PoolCall:
    """One submitted call: what to re-send if the actor is lost, and the weights it expects the actor to hold."""
    actor: int
    method: str
    args: tuple
    kwargs: dict
    future: Any  # ObjectRef (Ray) or _Done (in-process)
    epoch: int  # the actor's recovery count at submission: a later failure of an older call needs no new recovery
    weights: Optional[Broadcast]
    rows: Sequence[int] = ()  # for `scatter`: the input indices this call's shard holds


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor runs: its bundle in the placement group and what it asks of it. `bundles` lists every
    bundle the actor's work uses (a tensor-parallel engine's ranks, each asking `rank_gpus` of its bundle;
    the actor itself sits in the first)."""
    bundle: int
    cpus: float
    gpus: float
    bundles: Tuple[int, ...] = ()
    rank_gpus: float = 0.0


@dataclass
class RolePlacement:
    """A role's actors in a reserved placement group: slot i is actor i's."""
    group: Any  # ray.util.placement_group.PlacementGroup
    slots: List[ActorSlot]

    def options(self, i: int) -> dict:
        """Ray actor options that put actor i in its bundle; its child tasks and actors (a vLLM Ray executor's
        workers) stay in the same placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        slot = self.slots[i]
        return dict(num_cpus=slot.cpus, num_gpus=slot.gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=slot.bundle,
            placement_group_capture_child_tasks=True))


_REMOTE_CLASSES: Dict[type, Any] = {}


def _remote_class(cls: type):
    if cls not in _REMOTE_CLASSES:
        _REMOTE_CLASSES[cls] = ray.remote(cls)
    return _REMOTE_CLASSES[cls]


def _lost_cause(err: Exception) -> Optional[str]:
    """Why a failed call may be re-sent after recovery ("actor_died", "stale_weights", "state_lost"), or None."""
    if isinstance(err, ACTOR_GONE):
        return "actor_died"
    for e in (err, getattr(err, "cause", None)):  # RayTaskError carries the actor's exception as `cause`
        if isinstance(e, StaleWeightsError):
            return "stale_weights"
        if isinstance(e, ActorStateLost):
            return "state_lost"
    return None


class ActorPool:
    """N actors of `cls` (a plain class: the pool makes it a Ray actor unless `local`).

    args(i) -> (args, kwargs) for actor i's constructor. options: Ray actor options (num_cpus, num_gpus,
    max_restarts, ...); with max_restarts != 0 a call that fails because its actor died, is restarting or lost its
    state waits for the actor (`recover_wait_s`), runs `reinit(i)` (which must call the actor's handle directly,
    not through the pool), reloads the weights the call expects with `load_method`, and re-sends the call, at most
    `max_retries` times. With max_restarts=0 such a failure raises ActorPoolError naming the pool and actor.
    placement: actor i goes to `placement.slots[i]` (its CPUs and GPUs replace options' num_cpus/num_gpus)."""

    def __init__(self, name: str, cls: type, n: int, args: Callable[[int], tuple], *, options: Optional[dict] = None,
                 local: bool = False, reinit: Optional[Callable[[int], None]] = None, load_method: str = "load_weights",
                 max_retries: int = MAX_RETRIES, recover_wait_s: float = RECOVER_WAIT_S,
                 placement: Optional[RolePlacement] = None):
        if n < 1:
            raise ValueError(f"{name} pool needs at least one actor, got {n}")
        if placement is not None and not local and len(placement.slots) != n:
            raise ValueError(f"{name} pool has {n} actors but its placement has {len(placement.slots)} slots")
        self.name, self.local, self.reinit, self.load_method = name, local, reinit, load_method
        self.max_retries, self.recover_wait_s = max_retries, recover_wait_s
        options = dict(options or {})
        self.recovers = not local and options.get("max_restarts", 0) != 0
        if self.recovers:
            options.setdefault("max_task_retries", 0)  # the pool re-sends itself, after re-initialising
        self.actors: List[Any] = []
        for i in range(n):
            a, kw = args(i)
            if local:
                self.actors.append(cls(*a, **kw))
                continue
            where = placement.options(i) if placement is not None else {}
            self.actors.append(_remote_class(cls).options(**{**options, **where}).remote(*a, **kw))
        self.epochs = [0] * n
        self.weights: Optional[Broadcast] = None
        self.restarts = 0
        self.restart_causes: Dict[str, int] = defaultdict(int)  # actor_died | stale_weights | state_lost

    def __len__(self) -> int:
        return len(self.actors)

    # ---- calls -------------------------------------------------------------------------------------------------
    def submit(self, i: int, method: str, *args, rows: Sequence[int] = (), weights: Optional[Broadcast] = None,
               **kwargs) -> PoolCall:
        """Sends one call to actor i and returns at once (in-process: runs it now). `weights`: what the actor must
        serve for this call (default: the last broadcast)."""
        if not self.actors:
            raise ActorPoolError(f"{self.name} pool is shut down")
        actor = self.actors[i]
        if self.local:
            future = _Done(lambda: getattr(actor, method)(*args, **kwargs))
        else:
            future = getattr(actor, method).remote(*args, **kwargs)
        return PoolCall(i, method, args, kwargs, future, self.epochs[i], weights or self.weights, rows)

    def gather(self, calls: Sequence[PoolCall]) -> list:
        """The calls' results in order; a call whose actor was lost is recovered and re-sent (see the class)."""
        calls = list(calls)
        if self.local:
            return [self._note(c, c.future.get()) for c in calls]
        out: list = [None] * len(calls)
        attempts = [0] * len(calls)
        pending = {c.future: k for k, c in enumerate(calls)}
        while pending:  # each failure is handled as soon as it is known, not after the slowest call
            (done,), _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done)
            try:
                out[k] = self._note(calls[k], ray.get(done))
            except Exception as err:
                calls[k] = self._resend(calls[k], err, attempts[k])
                attempts[k] += 1
                pending[calls[k].future] = k
        return out

    def call(self, i: int, method: str, *args, **kwargs):
        """One call on actor i, awaited."""
        return self.gather([self.submit(i, method, *args, **kwargs)])[0]

    def call_all(self, method: str, *args, **kwargs) -> list:
        """The same call on every actor (all submitted before any is awaited); results in actor order."""
        return self.gather([self.submit(i, method, *args, **kwargs) for i in range(len(self))])

    def scatter(self, method: str, items: Sequence, *args, shards: Optional[Sequence[Sequence[int]]] = None,
                per_shard: Optional[Callable[[int], dict]] = None, **kwargs) -> List[PoolCall]:
        """`method(shard, *args, **kwargs, **per_shard(i))` on actor i for each non-empty shard i (default: the
        contiguous `balanced_shards`); `gather_rows` puts the per-item results back in input order."""
        shards = balanced_shards(len(items), len(self)) if shards is None else shards
        return [self.submit(i, method, [items[k] for k in rows], *args, rows=list(rows), **kwargs,
                            **(per_shard(i) if per_shard else {}))
                for i, rows in enumerate(shards) if len(rows)]

    def gather_rows(self, calls: Sequence[PoolCall]) -> list:
        """The per-item results of a `scatter`, in the order of the items scattered."""
        out: Dict[int, Any] = {}
        for call, part in zip(calls, self.gather(calls)):
            if len(part) != len(call.rows):
                raise ActorPoolError(f"{self.name} actor {call.actor} answered {len(part)} results to {call.method} "
                                     f"for {len(call.rows)} items")
            out.update(zip(call.rows, part))
        return [out[k] for k in sorted(out)]

    def raw(self, i: int, method: str, *args, **kwargs):
        """The call's future(s) as Ray returns them (ObjectRefs; the value(s) in-process), not awaited and never
        re-sent: for results handed on to other actors without passing through the caller."""
        return self.submit(i, method, *args, **kwargs).future.get() if self.local else \
            getattr(self.actors[i], method).remote(*args, **kwargs)

    def fetch(self, future):
        """A `raw` future's value."""
        return future if self.local else ray.get(future)

    # ---- weights -----------------------------------------------------------------------------------------------
    def put(self, payload):
        """The payload in the object store once (an ObjectRef is kept as it is; in-process: the object)."""
        if self.local or isinstance(payload, ray.ObjectRef):
            return payload
        return ray.put(payload)

    def broadcast(self, payload) -> List[PoolCall]:
        """Every actor loads the same object (`load_method`, put once); remembered as the weights a recovered actor
        gets back. Gather the calls for the versions served (also recorded in `version`)."""
        self.weights = Broadcast(self.put(payload))
        return [self.submit(i, self.load_method, self.weights.payload) for i in range(len(self))]

    @property
    def version(self) -> Optional[int]:
        """The version the last broadcast left the actors serving; 0 before any; None while its loads are
        unanswered."""
        return 0 if self.weights is None else self.weights.version

    def _note(self, call: PoolCall, result):
        if call.method == self.load_method and call.weights is not None:
            call.weights.version = int(result)
        return result

    # ---- recovery ----------------------------------------------------------------------------------------------
    def _resend(self, call: PoolCall, err: Exception, attempts: int) -> PoolCall:
        cause = _lost_cause(err)
        where = f"{self.name} actor {call.actor} ({call.method})"
        if cause is None:
            raise err
        if not self.recovers:
            raise ActorPoolError(f"{where} failed ({cause}); this pool does not restart actors") from err
        if attempts >= self.max_retries:
            raise ActorPoolError(f"{where} still failing ({cause}) after {attempts} re-sends") from err
        if call.epoch == self.epochs[call.actor]:  # not yet recovered since this call was sent
            self._recover(call.actor, cause, call.weights)
        return self.submit(call.actor, call.method, *call.args, rows=call.rows, weights=call.weights, **call.kwargs)

    def _recover(self, i: int, cause: str, weights: Optional[Broadcast]) -> None:
        """Waits for Ray's restart of actor i, re-initialises it and gives it `weights` back."""
        self.restarts += 1
        self.restart_causes[cause] += 1
        actor = self.actors[i]
        deadline = time.monotonic() + self.recover_wait_s
        while True:
            try:
                ray.get(actor.__ray_ready__.remote())
                if self.reinit is not None:
                    self.reinit(i)
                if weights is not None:
                    ray.get(getattr(actor, self.load_method).remote(weights.payload))
                break
            except ACTOR_GONE:
                if time.monotonic() > deadline:
                    raise ActorPoolError(f"{self.name} actor {i} did not come back within {self.recover_wait_s:g} s "
                                         f"after {cause}") from None
                time.sleep(0.2)
        self.epochs[i] += 1

    # ---- shutdown ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kills every actor (in-process: drops them); safe to call again."""
        actors, self.actors = self.actors, []
        if not self.local:
            for a in actors:
                ray.kill(a)
