"""Per-image caches key on the image's content (common.images.image_key), not on the sample id alone: two
different images that share an id (a duplicate id, a predict request, data changed since a warm-start file
was written) never get each other's embedding or processor inputs."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from coreseg.common.data import LesionSample
from coreseg.common.images import image_key, image_keys
from coreseg.common.models.adapter import build_adapter
from coreseg.common.models.sam import encode_images
from coreseg.common.protocol import ScoreItem
from coreseg.common.byte_cache import EmbeddingCache
from coreseg.reward.segmenter import Segmenter

HIDDEN = 128


def _two_images_one_id():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    return a, b


def test_image_key_depends_on_pixels_shape_and_id():
    a, b = _two_images_one_id()
    assert image_key("x", a) == image_key("x", a.copy())  # content, not object identity
    assert len({image_key("x", a), image_key("x", b), image_key("y", a), image_key("x", a.reshape(24, 96, 3))}) == 4
    assert image_keys(["x", "x", "y"], [a, a, a]) == [image_key("x", a)] * 2 + [image_key("y", a)]


def test_get_or_compute_batches_the_missing_keys_once_each_and_keeps_the_order():
    cache = EmbeddingCache(1 << 20)
    cache.put("a", torch.zeros(2))
    calls = []

    def compute(inputs):
        calls.append(list(inputs))
        return [torch.full((2,), float(x)) for x in inputs]

    out = cache.get_or_compute(["b", "a", "c", "b"], [1, 9, 3, 7], compute)
    assert calls == [[1, 3]]  # one call; "b" once (its first input), "a" served from the cache
    assert [v.tolist() for v in out] == [[1, 1], [0, 0], [3, 3], [1, 1]]
    assert cache.get_or_compute(["c"], [5], compute)[0].tolist() == [3, 3] and len(calls) == 1  # kept


def test_reward_cache_never_answers_with_another_images_embedding(tiny_sam):
    a, b = _two_images_one_id()
    seg = Segmenter(tiny_sam, build_adapter(HIDDEN), cache_bytes=1 << 24)
    first = seg.embeddings(["dup"], [a])[0]
    second = seg.embeddings(["dup"], [b])[0]
    want = encode_images(tiny_sam, [a, b])  # the encoder itself, no cache
    assert torch.allclose(first, want[0], atol=1e-5) and torch.allclose(second, want[1], atol=1e-5)
    assert seg.encoder_calls == 2
    seg.embeddings(["dup"], [a.copy()])  # the same pixels again: a hit
    assert seg.encoder_calls == 2 and seg.cache.hits == 1
    # within one batch of items, two images with one id get their own masks (one decoder image each)
    state = np.random.default_rng(0).normal(size=HIDDEN).astype(np.float32)
    items = [ScoreItem("dup", "", state, img, [], np.zeros((0, 4))) for img in (a, b, a)]
    masks = seg.masks(items)
    alone = [Segmenter(tiny_sam, seg.adapter).masks([item])[0] for item in items[:2]]
    assert np.array_equal(masks[0], alone[0]) and np.array_equal(masks[1], alone[1])
    assert np.array_equal(masks[2], masks[0])


def test_warm_start_refuses_a_file_keyed_by_sample_id(tmp_path, tiny_sam):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"sample-1": torch.zeros(256, 8, 8)}, str(path), metadata={"sam_type": "tiny"})
    with pytest.raises(ValueError, match="re-run `coreseg data embed`"):
        Segmenter(tiny_sam, build_adapter(HIDDEN)).warm_start(path)


def test_learner_embedding_cache_keys_on_content(tiny_sam):
    from coreseg.learner.model import CoreSegModule

    a, b = _two_images_one_id()
    module = types.SimpleNamespace(sam=tiny_sam, _embeddings=EmbeddingCache(1 << 20), device="cpu")  # its only state
    samples = [LesionSample(id="dup", image=img, masks=[], boxes=np.zeros((0, 4)), question="q") for img in (a, b)]
    first = CoreSegModule.image_embeddings(module, samples[:1])
    second = CoreSegModule.image_embeddings(module, samples[1:])
    want = encode_images(tiny_sam, [a, b])
    assert torch.allclose(first[0], want[0], atol=1e-5) and torch.allclose(second[0], want[1], atol=1e-5)


def test_learner_embedding_cache_is_bounded_by_bytes(tiny_sam):
    """learner.embed_cache_bytes bounds the learner's cache: room for one tiny embedding (256 x 8 x 8 fp32 =
    65,536 B) keeps only the latest image, and an evicted image is encoded again with the same result."""
    from coreseg.learner.model import CoreSegModule

    a, b = _two_images_one_id()
    one = 256 * 8 * 8 * 4
    module = types.SimpleNamespace(sam=tiny_sam, _embeddings=EmbeddingCache(one), device="cpu")
    samples = [LesionSample(id=f"s{i}", image=img, masks=[], boxes=np.zeros((0, 4)), question="q")
               for i, img in enumerate((a, b))]
    first = CoreSegModule.image_embeddings(module, samples[:1])
    CoreSegModule.image_embeddings(module, samples[1:])
    assert len(module._embeddings) == 1 and module._embeddings.bytes == one
    again = CoreSegModule.image_embeddings(module, samples[:1])
    assert module._embeddings.evictions == 2 and torch.allclose(again, first)


def test_prompt_encoder_keys_on_content_and_question(tiny_policy_dir):
    from coreseg.common.models.family import model_family
    from coreseg.common.models.policy import load_policy
    from coreseg.learner.batch import PromptEncoder
    from PIL import Image

    _, processor = load_policy(tiny_policy_dir)
    family = model_family(tiny_policy_dir)
    a, b = _two_images_one_id()
    b = b[:32]  # another size: another number of image tokens
    encoder = PromptEncoder(processor, family)
    sa, sb = (LesionSample(id="dup", image=img, masks=[], boxes=np.zeros((0, 4)), question="Find it.") for img in (a, b))
    for sample in (sa, sb):
        want = family.encode_prompt(processor, sample.question, Image.fromarray(sample.image))
        got = encoder.encode(sample)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])
    asked = LesionSample(id="dup", image=a, masks=[], boxes=np.zeros((0, 4)), question="Something else?")
    want = family.encode_prompt(processor, asked.question, Image.fromarray(a))
    assert torch.equal(encoder.encode(asked)["input_ids"], want["input_ids"])


def test_prompt_encoder_cache_is_bounded_by_bytes(tiny_policy_dir, monkeypatch):
    import coreseg.learner.batch as batch
    from coreseg.common.models.family import model_family
    from coreseg.common.models.policy import load_policy

    _, processor = load_policy(tiny_policy_dir)
    family = model_family(tiny_policy_dir)
    rng = np.random.default_rng(0)
    samples = [LesionSample(id=f"s{i}", image=rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), masks=[],
                            boxes=np.zeros((0, 4)), question="Find it.") for i in range(6)]
    one = batch.PromptEncoder(processor, family).encode(samples[0])
    per_entry = sum(v.numel() * v.element_size() for v in one.values() if isinstance(v, torch.Tensor))
    monkeypatch.setattr(batch, "PROMPT_CACHE_BYTES", 2 * per_entry)  # room for two prompts of this size
    encoder = batch.PromptEncoder(processor, family)
    for s in samples:
        encoder.encode(s)
    assert len(encoder._rendered) == 2 and encoder._rendered.bytes == 2 * per_entry
    from coreseg.common.images import image_key

    kept = {k[0] for k in encoder._rendered._items}
    assert kept == {image_key(s.id, s.image) for s in samples[-2:]}  # the oldest went first
