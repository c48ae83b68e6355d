"""Data parallelism: 2 LearnerWorkers (ZeRO-2, gloo) in local Ray make the same step as 1 learner on the same
global batch, whatever the batch: uneven, a rank without `<seg>`, fewer rows than ranks, SFT; and several GRPO
steps with default settings run without a collective mismatch (every rank runs the same collectives)."""
import numpy as np
import pytest
import torch

from coreseg.common.config import load_config
from coreseg.common.protocol import Completion, RolloutGroup
from coreseg.learner.balance import flatten_rows
from coreseg.learner.sft import sft_target_ids

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed

OVERRIDES = ["learner.micro_batch_size=2", "learner.lr=1e-2", "learner.adapter_lr=0.2", "learner.sft_lr=1e-2",
             "learner.zero_stage=2", "learner.kl_beta=0.05", "learner.mask_loss_weight=0.5",
             "learner.grad_clip=1000.0",
             # Adam's first step is ~lr*sign(g): gradients of float round-off size (summation order differs between
             # 1 and 2 ranks) would become steps of size lr. A large eps makes the step lr*g/(|g|+eps), about
             # linear in the gradient, so 1e-7-relative gradient differences stay far below the 1e-6 tolerance and
             # the comparison tests the data-parallel gradients themselves.
             "learner.adam_eps=1.0"]
TOL = 1e-6
PARTS = ("lora", "adapter", "mask_decoder", "token_rows")


class Batches:
    """Rollout groups built from the SFT targets: `seg` completions end with the target's `<seg>`, the others are
    target prefixes without it."""

    def __init__(self, policy_dir, samples):
        from transformers import AutoProcessor

        from coreseg.common.models.family import model_family

        processor, family = AutoProcessor.from_pretrained(str(policy_dir)), model_family(policy_dir)
        self.samples = samples
        self.seg_id = processor.tokenizer.convert_tokens_to_ids("<seg>")
        self.targets = [sft_target_ids(processor.tokenizer, s, family) for s in samples]
        self.prompts = [list(self._prompt(processor, family, s)) for s in samples]

    @staticmethod
    def _prompt(processor, family, sample):
        from PIL import Image

        return processor(text=[family.prompt(sample.question)], images=[Image.fromarray(sample.image)])["input_ids"][0]

    def group(self, k: int, kinds, version: int) -> RolloutGroup:
        """Sample k's group; kinds: "seg" (the target's last 12 tokens, `<seg>` inside) or a prefix length."""
        comps = []
        for kind in kinds:
            ids = self.targets[k][-12:] if kind == "seg" else self.targets[k][:kind]
            assert (self.seg_id in ids) == (kind == "seg")
            comps.append(Completion("", self.prompts[k], list(ids), [0.0] * len(ids), "length", version))
        return RolloutGroup(self.samples[k].id, comps)

    def batch(self, spec, version: int):
        """spec: per prompt, its completions' kinds -> (groups, samples)."""
        return [self.group(k, kinds, version) for k, kinds in enumerate(spec)], self.samples[:len(spec)]


def _weights(group):
    return group.pool.call_all("export_weights")


def _step(group, groups, samples, advantages):
    return group.update(groups, samples, np.asarray(advantages, dtype=np.float64), group.forward(groups, samples))


def _assert_equal_steps(one, two, before, stats1, stats2, keys=("loss", "pg_loss", "dice_ce", "tokens")):
    """Both ranks hold identical weights, equal to the single rank's within TOL; the step moved every part."""
    (single,), (rank0, rank1) = _weights(one), _weights(two)
    for part in PARTS:
        moved = 0.0
        for k, v in getattr(single, part).items():
            assert torch.equal(getattr(rank0, part)[k], getattr(rank1, part)[k]), k
            gap = float((getattr(rank0, part)[k] - v).abs().max())
            assert gap <= TOL, (k, gap)
            moved = max(moved, float((v - getattr(before, part)[k]).abs().max()))
        assert moved > 10 * TOL, part  # the comparison is not trivially true: the step moved this part
    for key in keys:
        assert stats2[key] == pytest.approx(stats1[key], abs=1e-5), key
    assert stats2["ranks_in_sync"] == 1.0 and "ranks_in_sync" not in stats1  # the group compared the ranks' digests


@pytest.fixture(scope="module")
def pair(ray_session, tiny_policy_dir, synth_samples):
    """(one rank in this process, two ranks in Ray, batch maker), same config and initial weights."""
    from coreseg.learner.group import LearnerGroup

    cfg = load_config("tiny_cpu", OVERRIDES)
    one = LearnerGroup(cfg, tiny_policy_dir, num_workers=1, local=True)
    two = LearnerGroup(cfg, tiny_policy_dir, num_workers=2)
    try:
        yield one, two, Batches(tiny_policy_dir, synth_samples[:6])
    finally:
        two.shutdown()
        one.shutdown()


def _compare(pair, spec, advantages):
    one, two, maker = pair
    groups, samples = maker.batch(spec, one.version)
    (before,) = _weights(one)
    stats1 = _step(one, groups, samples, advantages)
    stats2 = _step(two, groups, samples, advantages)
    _assert_equal_steps(one, two, before, stats1, stats2)
    return groups, stats1


def test_balanced_batch(pair):
    groups, stats = _compare(pair, [("seg", 20)] * 4, [1.0, -1.0, -0.5, 0.5, 2.0, -2.0, 0.3, -0.3])
    assert stats["tokens"] == 4 * (12 + 20)


def test_three_prompts_over_two_ranks(pair):
    # 6 rows over 2 ranks of micro-batches of 2: 2 micro-batches each, one of them holding a single row
    _compare(pair, [("seg", 20), (16, "seg"), ("seg", 24)], [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])


def test_rank_whose_completions_all_lack_seg(pair):
    spec = [("seg", 14), (20, 16)]  # one `<seg>` in the batch: one rank has none, whichever way it is split
    groups, _ = _compare(pair, spec, [1.0, -1.0, 0.5, -0.5])
    rows, comps = flatten_rows(groups, pair[2].samples[:2])
    seg = pair[2].seg_id
    layouts = pair[1]._grpo_layouts(rows, comps)  # the layout the 2-rank group used (packed: groups kept whole)
    assert any(not any(seg in comps[i].token_ids for i in lay.rows) for lay in layouts)


def test_dropped_groups_fewer_rows_than_slots(pair):
    # what is left after the zero-variance groups were dropped: one group of 3 completions for 2 ranks
    _compare(pair, [(20, 16, "seg")], [1.0, -0.5, -0.5])


def test_sft_step_uneven(pair):
    one, two, maker = pair
    samples = maker.samples[:5]  # 5 samples over 2 ranks of micro-batches of 2
    (before,) = _weights(one)
    stats1, stats2 = one.sft_step(samples), two.sft_step(samples)
    _assert_equal_steps(one, two, before, stats1, stats2, keys=("loss", "ce", "dice_ce"))


def test_default_settings_grpo_steps_on_two_ranks(ray_session, tiny_policy_dir, synth_samples):
    """Default settings (mask loss on, micro-batches of 8): steps whose batches leave a rank without `<seg>`,
    with fewer rows than ranks, uneven; the ranks stay in step and identical (the old code failed at step 4)."""
    from coreseg.learner.group import LearnerGroup

    cfg = load_config("tiny_cpu")
    assert cfg.learner.mask_loss_weight > 0 and cfg.learner.micro_batch_size == 8
    maker = Batches(tiny_policy_dir, synth_samples[:4])
    specs = [[("seg", 20, 16, "seg")] * 4,
             [("seg",) * 4, (20, 16, 24, 18), ("seg", 20, 16, 12), (20, 16, 24, 18)],
             [("seg", 20, 16, "seg")] * 3,
             [(20, "seg", 16, 24)],
             [(20, 16, 24, 18)] * 2]
    group = LearnerGroup(cfg, tiny_policy_dir, num_workers=2)
    try:
        for step, spec in enumerate(specs, start=1):
            groups, samples = maker.batch(spec, group.version)
            adv = np.tile([1.0, -1.0, 0.5, -0.5], len(spec))
            stats = _step(group, groups, samples, adv)
            assert np.isfinite(stats["loss"]) and group.version == step
            rank0, rank1 = _weights(group)
            for part in PARTS:
                for k, v in getattr(rank0, part).items():
                    assert torch.equal(v, getattr(rank1, part)[k]), (step, k)
        group.sft_step(maker.samples[:3])
        assert group.version == len(specs) + 1
    finally:
        group.shutdown()
