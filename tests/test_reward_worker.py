import numpy as np
import pytest
import torch

from common.config import load_config
from common.models.adapter import build_adapter
from common.prompts import build_completion
from common.protocol import ScoreItem, WeightBundle
from reward.scorer import RewardScorer
from reward.segmenter import Segmenter

HIDDEN = 128


def _items(samples, g, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for s in samples:
        for k in range(g):
            text = build_completion(s.reasoning, s.category, s.boxes + rng.integers(-2, 3, s.boxes.shape))
            items.append(ScoreItem(s.id, text, rng.normal(size=HIDDEN).astype(np.float32), s.image, s.masks, s.boxes))
    return items


def test_cache_runs_encoder_once_for_g_rollouts(tiny_sam, synth_samples):
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=1 << 24)
    s = synth_samples[0]
    masks = seg.masks([s.id], [s.image], torch.randn(8, HIDDEN), [0] * 8)
    assert len(masks) == 8 and all(m.shape == s.image.shape[:2] and m.dtype == bool for m in masks)
    assert seg.encoder_calls == 1
    seg.masks([s.id], [s.image], torch.randn(8, HIDDEN), [0] * 8)  # a later epoch: cache hit
    assert seg.encoder_calls == 1 and seg.cache.hits >= 1


def test_cache_is_bounded_in_bytes(tiny_sam, synth_samples):
    one = 256 * 8 * 8 * 4
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=2 * one)
    for s in synth_samples[:4]:
        seg.embeddings([s.id], [s.image])
    assert len(seg.cache) == 2 and seg.cache.bytes <= 2 * one and seg.cache.evictions == 2


def test_malformed_outputs_score_zero_with_reasons(synth_samples):
    cfg = load_config("tiny_cpu")
    scorer = RewardScorer(cfg, HIDDEN)
    s = synth_samples[0]
    good = build_completion(s.reasoning, s.category, s.boxes)
    items = [ScoreItem(s.id, good, None, s.image, s.masks, s.boxes),
             ScoreItem(s.id, good, np.full(HIDDEN, np.nan, np.float32), s.image, s.masks, s.boxes),
             ScoreItem(s.id, "garbage [[1, 2", np.zeros(HIDDEN, np.float32), s.image, s.masks, s.boxes)]
    version, scores = scorer.score(items)
    assert scores[0].components["mask"] == 0 and "mask:no_seg_token" in scores[0].reasons
    assert scores[0].components["format"] == 1 and scores[0].components["box"] == pytest.approx(1.0)
    assert scores[1].components["mask"] == 0 and "mask:seg_state_not_finite" in scores[1].reasons
    assert scores[2].components["format"] == 0 and scores[2].components["box"] == 0 and not scores[2].format_ok


@pytest.fixture(scope="module")
def ray_session():
    import ray
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_pool_keeps_order_and_survives_a_dead_worker(ray_session, synth_samples):
    import ray

    from reward.worker import RewardPool

    cfg = load_config("tiny_cpu")
    items = _items(synth_samples[:4], g=4)
    reference = RewardScorer(cfg, HIDDEN)
    adapter = build_adapter(HIDDEN, seed=123)
    bundle = WeightBundle(version=1, lora={}, peft_config={}, adapter=adapter.state_dict())
    reference.load_weights(bundle)
    _, want = reference.score(items)
    pool = RewardPool(cfg, HIDDEN, num_workers=2)
    try:
        pool.load_weights(ray.put(bundle))
        assert pool.versions() == [1, 1]
        got = pool.score(items)
        assert [g.total for g in got] == pytest.approx([w.total for w in want], abs=1e-5)
        ray.kill(pool.workers[0], no_restart=False)  # dies; Ray restarts it without its weights
        got = pool.score(items)
        assert [g.total for g in got] == pytest.approx([w.total for w in want], abs=1e-5)
        assert pool.stats()["restarts"] >= 1 and pool.versions() == [1, 1]
        with pytest.raises(ray.exceptions.RayTaskError, match="refusing"):
            ray.get(pool.workers[1].load_weights.remote(WeightBundle(0, {}, {}, adapter.state_dict())))
    finally:
        pool.shutdown()
