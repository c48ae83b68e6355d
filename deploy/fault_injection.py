"""Real faults for the fault tests and bench/faults.py: SIGKILL of an actor's process (by the PID Ray gives it) at
a chosen call, of a process and the processes it started, and of a simulated node (deploy/local_cluster.py).
Nothing here is used by a training run."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List

import psutil


def actor_pid(handle) -> int:
    """The PID of the process that runs a Ray actor."""
    import ray

    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid())))


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Returns once process `pid` has exited (a SIGKILL is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still alive {timeout_s:g} s after SIGKILL")
        time.sleep(0.05)


@dataclass
class Kill:
    """SIGKILL actor `actor` of pool `pool` right after its `nth` call of `method` was sent (so the call is in
    flight when the process dies). `killed` holds the PIDs killed, `at` the monotonic times of the kills."""
    pool: str
    method: str
    actor: int = 0
    nth: int = 1
    seen: int = 0
    killed: List[int] = field(default_factory=list)
    at: List[float] = field(default_factory=list)


@contextmanager
def kill_on_call(*kills: Kill) -> Iterator[tuple]:
    """While active, every ActorPool.submit is watched; each `Kill` fires once, when its call is sent."""
    from coreseg.common.actor_pool import ActorPool

    original = ActorPool.submit

    def submit(pool, i, method, *args, **kwargs):
        firing = []
        for k in kills:
            if k.pool == pool.name and k.method == method and k.actor == i and not k.killed:
                k.seen += 1
                if k.seen == k.nth:
                    if pool.local:
                        raise ValueError(f"{pool.name} runs in this process: nothing to kill")
                    firing.append(k)
        pid = actor_pid(pool.actors[i]) if firing else None  # asked before the call: the actor serves in order
        call = original(pool, i, method, *args, **kwargs)
        for k in firing:
            os.kill(pid, signal.SIGKILL)
            k.killed.append(pid)
            k.at.append(time.monotonic())
        return call

    ActorPool.submit = submit
    try:
        yield kills
    finally:
        ActorPool.submit = original


def process_tree(pid: int) -> List[psutil.Process]:
    """Process `pid` and every process it started (recursively), as they are now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(procs: List[psutil.Process], timeout_s: float = 30.0) -> None:
    """SIGKILL each of `procs` (a `process_tree` taken before) and wait for them."""
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)
