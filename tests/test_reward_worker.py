"""Segmenter cache, reward worker (without Ray) and RewardPool in local Ray on the tiny SAM."""

import numpy as np
import pytest
import torch

from coreseg.common.config import load_config
from coreseg.common.models.adapter import build_adapter
from coreseg.common.prompts import build_completion
from coreseg.common.protocol import ScoreItem, WeightBundle
from coreseg.reward.segmenter import Segmenter
from coreseg.reward.worker import LocalRewardWorker, StaleWeightsError

HIDDEN = 128
EMB_BYTES = 256 * 8 * 8 * 4  # one tiny-SAM embedding (float32)


def _items(samples, g, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for s in samples:
        for _ in range(g):
            text = build_completion(s.reasoning, s.category, s.boxes + rng.integers(-2, 3, s.boxes.shape))
            items.append(ScoreItem(s.id, text, rng.normal(size=HIDDEN).astype(np.float32), s.image, s.masks, s.boxes))
    return items


def _bundle(version, seed=123):
    return WeightBundle(version=version, lora={}, peft_config={}, adapter=build_adapter(HIDDEN, seed=seed).state_dict())


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny_cpu")


@pytest.fixture(scope="module")
def worker(cfg):
    return LocalRewardWorker(cfg, HIDDEN)


def test_cache_runs_encoder_once_for_g_rollouts(tiny_sam, synth_samples):
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=1 << 24)
    items = _items(synth_samples[:1], g=8)
    masks = seg.masks(items)
    h, w = synth_samples[0].image.shape[:2]
    assert len(masks) == 8 and all(m.shape == (h, w) and m.dtype == bool for m in masks)
    assert seg.encoder_calls == 1 and seg.cache.misses == 1
    seg.masks(_items(synth_samples[:1], g=8, seed=1))  # a later epoch: a cache hit, no encoder pass
    assert seg.encoder_calls == 1 and seg.cache.hits == 1
    # each state decoded in the batch equals the same state decoded alone
    alone = seg.masks(items[3:4])[0]
    assert np.array_equal(alone, masks[3])


def test_masks_at_a_non_square_image_size(tiny_sam):
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=1 << 24)
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    item = ScoreItem("wide", "", np.ones(HIDDEN, np.float32), image, [], np.zeros((0, 4)))
    assert seg.masks([item])[0].shape == (60, 90)


def test_cache_is_bounded_in_bytes(tiny_sam, synth_samples):
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=2 * EMB_BYTES)
    for s in synth_samples[:4]:
        seg.embeddings([s.id], [s.image])
    assert len(seg.cache) == 2 and seg.cache.bytes <= 2 * EMB_BYTES and seg.cache.evictions == 2
    from coreseg.common.images import image_key

    key = lambda s: image_key(s.id, s.image)  # noqa: E731 (the cache keys on id + pixels)
    assert key(synth_samples[3]) in seg.cache and key(synth_samples[0]) not in seg.cache  # LRU order


def test_warm_start_from_precomputed_embeddings(tmp_path, cfg, tiny_sam, synth_parquet):
    from coreseg.common.data import LesionDataset
    from coreseg.reward.embed import precompute_embeddings

    out = precompute_embeddings(synth_parquet, "train", tmp_path / "emb.safetensors", cfg)
    samples = next(LesionDataset(str(synth_parquet), "train", batch_size=3, shuffle=False).iter_all(3))
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=1 << 26)
    assert seg.warm_start(out, {"sam_type": "tiny"}) > 3
    warm = seg.embeddings([s.id for s in samples], [s.image for s in samples])
    assert seg.encoder_calls == 0
    cold = Segmenter(tiny_sam, build_adapter(HIDDEN)).embeddings([s.id for s in samples], [s.image for s in samples])
    assert torch.allclose(warm, cold, atol=1e-5)
    with pytest.raises(ValueError, match="sam_type"):
        seg.warm_start(out, {"sam_type": "vit_b"})


def test_malformed_outputs_score_zero_with_reasons(worker, synth_samples):
    s = synth_samples[0]
    good = build_completion(s.reasoning, s.category, s.boxes)
    nan_state = np.full(HIDDEN, np.nan, np.float32)
    items = [ScoreItem(s.id, good, None, s.image, s.masks, s.boxes),
             ScoreItem(s.id, good, nan_state, s.image, s.masks, s.boxes),
             ScoreItem(s.id, good, np.full(HIDDEN, np.inf, np.float32), s.image, s.masks, s.boxes),
             ScoreItem(s.id, good, np.zeros(HIDDEN + 1, np.float32), s.image, s.masks, s.boxes),
             ScoreItem(s.id, "garbage [[1, 2", np.zeros(HIDDEN, np.float32), s.image, s.masks, s.boxes),
             ScoreItem(s.id, good, np.zeros(HIDDEN, np.float32), s.image, s.masks, s.boxes)]
    scores = worker.score(items)
    assert scores[0].components["mask"] == 0 and "mask:no_seg_token" in scores[0].reasons
    assert scores[0].components["format"] == 1 and scores[0].components["box"] == pytest.approx(1.0)
    for k in (1, 2):
        assert scores[k].components["mask"] == 0 and "mask:seg_state_not_finite" in scores[k].reasons
    assert scores[3].components["mask"] == 0 and "mask:seg_state_bad_shape" in scores[3].reasons
    assert scores[4].components["format"] == 0 and scores[4].components["box"] == 0 and not scores[4].format_ok
    assert np.isfinite(scores[5].total) and scores[5].format_ok
    assert worker.stats()["reason/mask:no_seg_token"] >= 1


def test_load_weights_version_check(cfg, synth_samples):
    w = LocalRewardWorker(cfg, HIDDEN)
    items = _items(synth_samples[:1], g=2)
    assert w.version() == 0 and len(w.score(items)) == 2
    assert w.load_weights(_bundle(2)) == 2 and w.version() == 2
    assert torch.equal(w.segmenter.adapter.queries, build_adapter(HIDDEN, seed=123).queries)
    with pytest.raises(ValueError, match="refusing"):
        w.load_weights(_bundle(1))
    with pytest.raises(StaleWeightsError):
        w.score(items, expected_version=1)


@pytest.fixture(scope="module")
def pool_and_reference(ray_session, cfg, worker, synth_samples):
    from coreseg.reward.worker import RewardPool

    items = _items(synth_samples[:6], g=8)
    bundle = _bundle(1)
    reference = LocalRewardWorker(cfg, HIDDEN)
    reference.load_weights(bundle)
    want = [s.total for s in reference.score(items)]
    pool = RewardPool(cfg, HIDDEN, num_workers=2)
    pool.load_weights(ray_session.put(bundle))
    yield pool, items, want
    pool.shutdown()


@pytest.mark.slow
def test_pool_keeps_order(pool_and_reference):
    pool, items, want = pool_and_reference
    assert pool.versions() == [1, 1]
    shares = pool._assign(items)
    owner = {}
    for w, rows in shares.items():  # an image's G rollouts all go to one worker; both workers get work
        for k in rows:
            assert owner.setdefault(items[k].sample_id, w) == w
    assert sorted(len(rows) for rows in shares.values()) == [24, 24]
    got = pool.score(items)
    assert [g.total for g in got] == pytest.approx(want, abs=1e-5)
    stats = pool.stats()
    assert stats["encoder_calls"] == 6 and stats["restarts"] == 0


@pytest.mark.slow
def test_pool_survives_a_worker_killed_mid_batch(ray_session, pool_and_reference, monkeypatch):
    pool, items, want = pool_and_reference
    submit, killed = pool.pool.submit, []

    def submit_then_kill(w, method, *args, **kwargs):  # the kill lands right after worker 0's share is sent
        call = submit(w, method, *args, **kwargs)
        if w == 0 and method == "score" and not killed:
            killed.append(w)
            ray_session.kill(pool.workers[0], no_restart=False)
        return call

    monkeypatch.setattr(pool.pool, "submit", submit_then_kill)
    got = pool.score(items)
    print("restart causes:", dict(pool.pool.restart_causes))
    assert killed == [0]
    assert [g.total for g in got] == pytest.approx(want, abs=1e-5)
    assert pool.stats()["restarts"] >= 1 and pool.versions() == [1, 1]


@pytest.mark.slow
def test_pool_stats_survive_a_restarting_worker(ray_session, pool_and_reference):
    pool, items, want = pool_and_reference
    before = pool.pool.restarts
    ray_session.kill(pool.workers[0], no_restart=False)
    stats = pool.stats()  # the worker is dead or restarting here: the pool waits for it, never raises
    assert stats["workers"] == 2
    assert pool.versions()[1] == 1
    got = pool.score(items)
    assert [g.total for g in got] == pytest.approx(want, abs=1e-5)
    assert pool.pool.restarts > before and pool.versions() == [1, 1]


@pytest.mark.slow
def test_pool_notices_a_silent_restart(ray_session, pool_and_reference):
    pool, items, want = pool_and_reference
    before = pool.pool.restarts
    ray_session.kill(pool.workers[1], no_restart=False)  # dies between batches; comes back at version 0
    got = pool.score(items)
    assert [g.total for g in got] == pytest.approx(want, abs=1e-5)
    assert pool.pool.restarts > before and pool.versions() == [1, 1]
    with pytest.raises(ray_session.exceptions.RayTaskError, match="refusing"):
        ray_session.get(pool.workers[1].load_weights.remote(_bundle(0)))


@pytest.mark.slow
def test_in_process_pool_scores_like_the_ray_pool(pool_and_reference, cfg):
    from coreseg.reward.worker import RewardPool

    ray_pool, items, want = pool_and_reference
    pool = RewardPool(cfg, HIDDEN, num_workers=2, local=True)
    try:
        assert pool.load_weights(_bundle(1)) == [1, 1] and pool.versions() == [1, 1] and pool.version == 1
        assert pool._assign(items) == ray_pool._assign(items)
        assert [g.total for g in pool.score(items)] == pytest.approx(want, abs=1e-5)
        stats = pool.stats()
        assert stats["workers"] == 2 and stats["scored"] == len(items) and stats["encoder_calls"] == 6
    finally:
        pool.shutdown()
