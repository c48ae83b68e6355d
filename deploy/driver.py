"""The driver: the only place that knows the order of a training step (docs/architecture.md).

GRPO step: rollout -> learner forward (old/ref log-probs, `<seg>` states) -> reward -> advantages ->
update -> weight push. SFT runs through the same driver (learner step + push). Every phase is timed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from coreseg.common import storage
from coreseg.common.actor_pool import StaleWeightsError
from coreseg.common.config import TrainConfig, save_config, with_absolute_paths
from coreseg.common.data import LesionDataset, LesionSample
from coreseg.common.models.family import PromptRenderer
from coreseg.common.policy_store import publish_policy
from coreseg.common.protocol import RolloutGroup, RolloutRequest, Score
from coreseg.common.seeding import derive_seed
from coreseg.deploy.learning_metrics import dump_rollouts
from coreseg.deploy.metrics_log import MetricsLogger
from coreseg.deploy.run_folder import RunFolder, read_driver_state, record_placement, write_driver_state
from coreseg.deploy.recovery import recover_learner, restart_counts
from coreseg.deploy.step import Answered, TrainBatch, reward_stats, score_items, timed


@dataclass
class Prefetch:
    """A batch whose generation was submitted ahead (async generation), with the data cursor before it."""
    step: int
    samples: List[LesionSample]
    futures: list
    cursor: dict


def llm_hidden_size(policy_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(policy_dir)).get_text_config().hidden_size)


class Driver:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, with_rollout: bool = True, local: bool = False,
                 read_only: bool = False):
        """local=True: every pool in this process, no Ray (one learner rank, one rollout engine); for tests of the
        step logic and single-process use. read_only=True (eval, predict): the run's config.yaml and metrics.jsonl
        are neither written nor truncated; results go to eval/ files only."""
        from coreseg.deploy.cluster import init_ray, placement_summary, reserve
        from coreseg.learner.group import LearnerGroup
        from coreseg.reward.worker import RewardPool

        cfg = with_absolute_paths(cfg)  # every node, and a job's copy of the code, must see the same files
        self.cfg = cfg
        self.run = RunFolder(run_dir)  # a path every node sees, or a URI
        self.run_dir = self.run.local  # where the driver writes: the folder, or a URI run folder's working copy
        self.read_only = read_only
        if not read_only:
            save_config(cfg, self.run_dir / "config.yaml")
            self.run.publish("config.yaml")
        # before any actor starts: a tracker that cannot start (not installed, bad URI) fails the run at once
        self.logger = None if read_only else MetricsLogger(self.run_dir, config=cfg, on_write=lambda: self.run.publish(
            "metrics.jsonl", "tb"), run_name=Path(self.run.location).name)
        # policy_dir: the prepared model on this node; policy_source: where every actor stages it from (a preset
        # or `<seg>` mirror is published once under the run folder)
        self.policy_dir, self.policy_source = publish_policy(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed,
                                                             self.run.location)
        self.prompts = PromptRenderer(self.policy_dir, cfg.model.system_prompt)  # the rollout requests' prompts
        c = cfg.cluster
        self.reservation = None  # the run's placement group (Ray mode): every actor in its planned bundle
        if local:
            print(f"[coreseg] run dir {self.run}; all pools in this process")
        else:
            init_ray(cfg)
            print(f"[coreseg] run dir {self.run}; actors: {placement_summary(cfg)}")
            self.reservation = reserve(cfg, with_rollout=with_rollout)
        where = (lambda role: None) if local else self.reservation.role
        self._learner_args = dict(num_workers=1 if local else c.learner_workers, num_gpus_per_worker=c.learner_gpus,
                                  local=local, placement=where("learner"))
        self.learner = LearnerGroup(cfg, self.policy_source, **self._learner_args)
        self.learner_restarts = 0
        self.reward = RewardPool(cfg, llm_hidden_size(self.policy_dir), num_workers=c.reward_workers,
                                 num_gpus_per_worker=c.reward_gpus_per_worker, local=local, placement=where("reward"))
        self.rollout = None
        if with_rollout:
            from coreseg.rollout.worker import RolloutPool
            self.rollout = RolloutPool(cfg, self.policy_source, num_workers=1 if local else c.rollout_workers,
                                       num_gpus_per_worker=c.rollout_gpus_per_worker, local=local,
                                       placement=where("rollout"))
        # colocated mode: the rollout engines sleep while the learner works and wake before they generate
        self.colocated = c.colocate and self.rollout is not None
        self.data = LesionDataset(cfg.data.path, cfg.data.train_split, cfg.data.batch_size,
                                  seed=cfg.data.shuffle_seed, skip_invalid=cfg.data.skip_invalid,
                                  max_image_pixels=cfg.data.max_image_pixels)
        if not read_only:
            record_placement(self.run, {"learner": self.learner, "reward": self.reward, "rollout": self.rollout})
        self.step = {"sft": 0, "grpo": 0}
        self.version = 0
        # async generation: the next step's batch, drawn and submitted while this step trains, and the rollout
        # workers' weight load queued behind that generation (awaited when its rollouts are gathered)
        self._prefetched: Optional[Prefetch] = None
        self._rollout_loading: list = []

    # ---- colocated turns -------------------------------------------------------------------------
    def _learner_turn(self) -> None:
        """Colocated mode: the rollout engines free the GPUs before the learner's forward, update or SFT step."""
        if self.colocated:
            self.rollout.sleep()

    def _rollout_turn(self) -> None:
        """Colocated mode: the engines take weights and KV cache back before they load weights or generate."""
        if self.colocated:
            self.rollout.wake_up()

    # ---- weights -------------------------------------------------------------------------------
    def push_weights(self) -> Dict[str, float]:
        """The learner puts the rollout part (LoRA) and the reward part (adapter + mask decoder) in the object
        store once each; every rollout / reward worker loads its part concurrently; versions are checked."""
        stats: Dict[str, float] = {}
        with timed(stats, "push"):
            sizes, rollout_ref, reward_ref = self.learner.export_refs()
            self._rollout_turn()
            pools = [("rollout", self.rollout, rollout_ref), ("reward", self.reward, reward_ref)]
            if self.rollout is not None and self._prefetched is not None:
                # the rollout workers are generating the next batch: their load is queued behind it, and
                # waited for when that batch is gathered, so the push does not wait for the generation
                self._rollout_loading = self.rollout.submit_load(rollout_ref)
                pools = pools[1:]
            loads = [(n, p, r) for n, p, r in pools if p is not None]

            def load(item):  # each pool's load, timed on its own (they overlap); returns the versions served
                name, pool_, ref = item
                with timed(stats, f"push_{name}"):
                    return name, pool_.load_weights(ref)

            with ThreadPoolExecutor(len(loads)) as pool:
                served = dict(pool.map(load, loads))
        self.version = int(sizes["version"])
        self._check_served(served)
        receivers = {"rollout": len(self.rollout.workers) if self.rollout is not None else 0,
                     "reward": len(self.reward.workers)}
        stats["push/bytes"] = float(sizes["rollout_bytes"] + sizes["reward_bytes"])
        stats["push/lora_bytes"] = float(sizes["rollout_bytes"])
        stats["push/bytes_moved"] = float(sum(sizes[f"{k}_bytes"] * n for k, n in receivers.items()))
        stats["version"] = float(self.version)
        return stats

    def _check_served(self, served: Dict[str, List[int]]) -> None:
        """Every worker of every pool named in `served` must serve the learner's version."""
        stale = {k: v for k, v in served.items() if any(x != self.version for x in v)}
        if stale:
            raise StaleWeightsError(f"learner is at version {self.version} but workers serve {stale}")

    # ---- SFT -----------------------------------------------------------------------------------
    def sft(self, steps: int) -> None:
        if self.read_only:
            raise RuntimeError("this driver is read-only (eval, predict): it does not train")
        for _ in tqdm(range(steps), desc="sft", unit="step"):
            timings: Dict[str, float] = {}
            with timed(timings, "step"):
                samples = self.data.next_batch()
                self._learner_turn()
                with timed(timings, "update"):
                    stats = self.learner.sft_step(samples, step=self.step["sft"])
                self.step["sft"] += 1
            self.logger.log("sft", self.step["sft"], {**stats, **timings, "batch_ids": ",".join(s.id for s in samples)})
        self.logger.log("sft", self.step["sft"], self.push_weights())

    # ---- GRPO ----------------------------------------------------------------------------------
    def _submit_rollout(self, step: int) -> "Prefetch":
        """Draws step's batch and submits its generation (returns at once)."""
        cursor = self.data.state_dict()
        samples = self.data.next_batch()
        requests = [RolloutRequest(s.id, self.prompts(s.question), s.image) for s in samples]
        self._rollout_turn()
        futures = self.rollout.submit(requests, n=self.cfg.rollout.group_size,
                                      seed=derive_seed(self.cfg.rollout.seed, step))
        return Prefetch(step, samples, futures, cursor)

    def _gather_rollout(self, pending: "Prefetch") -> List[RolloutGroup]:
        groups = self.rollout.gather(pending.futures)
        if self._rollout_loading:
            served = {"rollout": self.rollout.gather_versions(self._rollout_loading)}
            self._rollout_loading = []
            self._check_served(served)
        return groups

    def _check_policy_lag(self, groups: List[RolloutGroup]) -> int:
        """How many versions behind the learner the rollouts are: 0 in sync mode, at most 1 in async mode."""
        versions = [c.version for g in groups for c in g.completions]
        lag = self.version - min(versions)
        allowed = 1 if self.cfg.rollout.async_generation else 0
        if not 0 <= lag <= allowed or max(versions) > self.version:
            raise StaleWeightsError(f"rollouts from policy versions {sorted(set(versions))} while the learner is at "
                                    f"version {self.version} (allowed lag {allowed})")
        return lag

    def answer(self, samples: List[LesionSample], groups: List[RolloutGroup], timings: Optional[Dict[str, float]] = None,
               score: bool = True) -> Answered:
        """The one path from generated groups to scores, shared by the GRPO step, `evaluate` and `predict`:
        groups whose generation failed are set aside, the learner's forward gives the `<seg>` states (and
        reference log-probs), the reward pool scores every completion (`score=False`: no ground truth)."""
        timings = {} if timings is None else timings
        failed = [(s, g.error) for s, g in zip(samples, groups) if g.error]
        ok = [(s, g) for s, g in zip(samples, groups) if not g.error]
        samples, groups = [s for s, _ in ok], [g for _, g in ok]
        if not ok:
            return Answered([], [], None, [], failed)
        self._learner_turn()
        with timed(timings, "forward"):
            forward = self.learner.forward(groups, samples)
        scores: List[Score] = []
        if score:
            with timed(timings, "reward"):
                scores = self.reward.score(score_items(samples, groups, forward))
        return Answered(samples, groups, forward, scores, failed)

    def generate(self, samples: List[LesionSample], n: int, seed: Optional[int] = None,
                  greedy: bool = False) -> List[RolloutGroup]:
        requests = [RolloutRequest(s.id, self.prompts(s.question), s.image) for s in samples]
        self._rollout_turn()
        return self.rollout.generate(requests, n=n, seed=seed, greedy=greedy)

    def _collect(self, step: int, samples: List[LesionSample], groups: List[RolloutGroup],
                 timings: Dict[str, float]) -> TrainBatch:
        """The step's training batch: the answered groups minus those the learner's advantages drop (no reward
        variance, with learner.drop_zero_variance). With learner.dynamic_sampling_max_draws > 0 (DAPO dynamic
        sampling), up to that many further batches of prompts are drawn, generated and scored until
        data.batch_size groups remain; extra groups beyond that are not trained on."""
        cfg = self.cfg
        batch = TrainBatch()
        while True:
            answered = self.answer(samples, groups, timings)
            batch.failed += answered.failed
            if answered.samples:
                batch.lag = max(batch.lag, self._check_policy_lag(answered.groups))
                batch.scores += answered.scores
                G = len(answered.groups[0].completions)
                rewards = np.array([s.total for s in answered.scores], np.float64).reshape(len(answered.samples), G)
                adv = self.learner.advantages(rewards)
                keep = np.flatnonzero(adv.keep)
                batch.dropped += len(answered.samples) - len(keep)
                batch.add(answered, keep, adv.values)
            if len(batch.samples) >= cfg.data.batch_size or batch.extra_draws >= cfg.learner.dynamic_sampling_max_draws:
                break
            batch.extra_draws += 1
            samples = self.data.next_batch()
            with timed(timings, "rollout_extra"):
                groups = self.generate(samples, cfg.rollout.group_size,
                                        seed=derive_seed(cfg.rollout.seed, step, batch.extra_draws))
        if not batch.scores:
            raise RuntimeError(f"every rollout request failed at step {step}: {batch.failed[0][1]}")
        if cfg.learner.dynamic_sampling_max_draws > 0:
            batch.truncate(cfg.data.batch_size)
        return batch

    def grpo_step(self, prefetch_next: bool = True) -> Dict[str, float]:
        """One GRPO step. With `rollout.async_generation`, the next batch is generated while this one trains
        (unless `prefetch_next` is False, as on a run's last step)."""
        cfg = self.cfg
        timings: Dict[str, float] = {}
        step = self.step["grpo"] + 1
        # with dynamic sampling the extra draws read the data first, so the prefetch (and the cursor a
        # checkpoint saves before it) comes after them
        prefetch = cfg.rollout.async_generation and prefetch_next
        early_prefetch = prefetch and cfg.learner.dynamic_sampling_max_draws == 0
        with timed(timings, "step"):
            with timed(timings, "rollout"):  # in async mode: only the part not hidden behind the last step
                pending, self._prefetched = self._prefetched or self._submit_rollout(step), None
                if pending.step != step:
                    raise RuntimeError(f"prefetched batch is for step {pending.step}, the driver is at step {step}")
                groups = self._gather_rollout(pending)
            if early_prefetch:
                self._prefetched = self._submit_rollout(step + 1)
            batch = self._collect(step, pending.samples, groups, timings)
            if prefetch and not early_prefetch:
                self._prefetched = self._submit_rollout(step + 1)
            stats: Dict[str, float] = {}
            push: Dict[str, float] = {}
            if batch.samples:  # every group dropped (no reward variance anywhere): nothing to learn from
                self._learner_turn()
                with timed(timings, "update"):
                    stats = self.learner.update(batch.groups, batch.samples, batch.advantages, batch.forward, step - 1)
                push = self.push_weights()
        self.step["grpo"] = step
        record = {**reward_stats(batch.scores), **{f"learner/{k}": v for k, v in stats.items()}, **timings, **push,
                  **batch.stats(), "batch_ids": ",".join(s.id for s in batch.samples)}
        record.update({f"reward_pool/{k}": float(v) for k, v in self.reward.stats().items()
                       if isinstance(v, (int, float))})
        record.update(restart_counts(self))
        self.logger.log("grpo", step, record)
        dump_rollouts(self.logger, cfg.run.dump_rollouts, step, batch)
        return record

    def train(self, steps: int, save_at_end: bool = False) -> None:
        """`steps` GRPO steps, saving every `run.save_every` (and after the last with `save_at_end`). A learner
        lost in a step, a save or an evaluation is rebuilt from the latest checkpoint (deploy/recovery.py)."""
        if self.read_only:
            raise RuntimeError("this driver is read-only (eval, predict): it does not train")
        if self.rollout is None:
            raise RuntimeError("driver was built without rollout workers")
        if self.version == 0:
            self.logger.log("grpo", self.step["grpo"], self.push_weights())
        target = self.step["grpo"] + steps
        bar = tqdm(total=steps, desc="grpo", unit="step")
        while self.step["grpo"] < target:
            try:
                rec = self.grpo_step(prefetch_next=self.step["grpo"] + 1 < target)
                step = self.step["grpo"]
                if (save_at_end and step == target) or (self.cfg.run.save_every and
                                                        step % self.cfg.run.save_every == 0):
                    self.save()
                if self.cfg.run.eval_every and step % self.cfg.run.eval_every == 0:
                    self.evaluate([self.cfg.data.eval_splits[0]], self.cfg.run.eval_samples, tag=f"step{step}")
            except Exception as err:  # noqa: BLE001 - a lost learner rank is recovered, anything else re-raised
                if self.learner.healthy():
                    raise
                recover_learner(self, err)
                bar.n = self.step["grpo"] - (target - steps)
                continue
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward/total']:.3f}", t=f"{rec['time/step']:.1f}s")

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, splits: List[str], limit: Optional[int] = None, tag: str = "final") -> Dict[str, dict]:
        """Greedy answer per sample -> `<seg>` mask -> mDice, mIoU, failure rate (+ per modality); see
        deploy/evaluation.py."""
        from coreseg.deploy.evaluation import evaluate_splits

        return evaluate_splits(self, splits, limit, tag)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> str:
        """Checkpoint of the current step, written atomically (deploy/checkpoints.py); a step already saved is
        not saved again; only the newest `run.keep_checkpoints` are kept (0 = all)."""
        # a batch drawn ahead (async generation) is not trained yet: the cursor saved is the one before it
        cursor = self._prefetched.cursor if self._prefetched is not None else self.data.state_dict()
        state = {"step": dict(self.step), "version": self.version, "data": cursor}

        def write(folder: str) -> None:  # each learner rank writes its own part; the driver, driver.json
            self.learner.save_checkpoint(storage.join(folder, "learner"))
            write_driver_state(folder, state)

        name = f"grpo_{self.step['grpo']:06d}_sft_{self.step['sft']:06d}"
        return self.run.save_checkpoint(name, write, keep=self.cfg.run.keep_checkpoints)

    def restore(self, path: str | Path | None = None, version_after: Optional[int] = None) -> None:
        """Resume from a checkpoint folder (default: the run's latest) and push its weights. version_after: the
        restored weights get the next version number after it (workers that served newer versions before a
        learner failure accept only newer ones)."""
        path = str(path) if path else self.run.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"run folder {self.run} has no checkpoint (checkpoints/latest) to resume from")
        state = read_driver_state(path)
        self._prefetched, self._rollout_loading = None, []
        self.learner.load_checkpoint(storage.join(path, "learner"))
        if version_after is not None:
            self.learner.pool.call_all("set_version", version_after + 1)
        self.step = {k: int(v) for k, v in state["step"].items()}
        self.data.load_state_dict(state["data"])
        if not self.read_only:
            self.logger.truncate_after("grpo", self.step["grpo"])
        self.push_weights()

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        for pool in (self.rollout, self.reward, self.learner):
            if pool is not None:
                pool.shutdown()
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None
