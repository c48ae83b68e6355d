"""Reward terms as a registry: the paper's terms by name, extra terms by import path from config (CLI dotted
overrides and YAML), per-term components and reasons, weights, failing terms, and config errors."""
import numpy as np
import pytest

from coreseg.common.config import ConfigError, RewardConfig, load_config
from coreseg.common.prompts import build_completion
from coreseg.reward.terms import PAPER_TERMS, TermError, format_term, register_term, resolve_term, score_completion

EXAMPLE = "tests.reward_term_example"


def _gt():
    mask = np.zeros((40, 40), bool)
    mask[0:10, 0:10] = True
    return mask, np.array([[0, 0, 10, 10]], float)


def test_paper_terms_are_registered():
    assert PAPER_TERMS == ("format", "box", "mask")
    assert resolve_term("format") is format_term
    assert load_config("tiny_cpu").reward.terms == ["format", "box", "mask"]


def test_custom_term_by_import_path_from_cli_override():
    cfg = load_config("tiny_cpu", [f"reward.terms=[format,box,mask,{EXAMPLE}:length_penalty]",
                                   "reward.term_weights.length_penalty=0.5", "reward.w_box=2"]).reward
    mask, boxes = _gt()
    text = build_completion("a long description of the image " * 4, "polyp", boxes)
    over = len(text) - 100
    assert over > 0
    score = score_completion(text, mask, [mask], boxes, (40, 40), cfg)
    # format 1, box 1 (perfect box), mask 3 (perfect mask), length -0.01 per character past 100
    assert score.components == {"format": 1.0, "box": 1.0, "mask": 3.0,
                                "length_penalty": pytest.approx(-0.01 * over)}
    assert score.total == pytest.approx(1.0 + 2 * 1.0 + 3.0 + 0.5 * (-0.01 * over))
    assert score.reasons == ["length_penalty:too_long"]
    short = build_completion("x", "polyp", boxes)  # under 100 characters: no penalty, no reason
    assert len(short) <= 100
    score = score_completion(short, mask, [mask], boxes, (40, 40), cfg)
    assert score.components["length_penalty"] == 0.0 and score.total == pytest.approx(6.0) and not score.reasons


def test_terms_survive_the_saved_run_config(tmp_path):
    from coreseg.common.config import load_saved_config, save_config
    cfg = load_config("tiny_cpu", [f"reward.terms=[format,{EXAMPLE}:length_penalty]",
                                   "reward.term_weights.length_penalty=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml").reward
    assert again.terms == ["format", f"{EXAMPLE}:length_penalty"] and again.term_weights == {"length_penalty": 0.25}


def test_custom_term_from_yaml_with_default_weight(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"reward:\n  terms: [mask, '{EXAMPLE}:length_penalty']\n  w_mask: 0.5\n")
    cfg = load_config(str(path)).reward
    mask, boxes = _gt()
    text = build_completion("y" * 150, "polyp", boxes)
    score = score_completion(text, np.zeros_like(mask), [mask], boxes, (40, 40), cfg)
    want_len = -0.01 * (len(text) - 100)
    assert score.components == {"mask": -1.0, "length_penalty": pytest.approx(want_len)}
    assert score.total == pytest.approx(0.5 * -1.0 + 1.0 * want_len)  # an extra term's weight defaults to 1
    assert score.reasons == ["mask:empty_mask", "length_penalty:too_long"]


def test_a_failing_term_scores_zero_with_a_counted_reason():
    cfg = RewardConfig(terms=["format", "box", f"{EXAMPLE}:fails_on_two_boxes", f"{EXAMPLE}:not_finite"])
    mask, _ = _gt()
    two = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    score = score_completion(build_completion("x", "polyp", two), "no_seg_token", [mask], two, (40, 40), cfg)
    assert score.components == {"format": 1.0, "box": 1.0, "fails_on_two_boxes": 0.0, "not_finite": 0.0}
    assert score.total == pytest.approx(2.0)
    assert score.reasons == ["fails_on_two_boxes:error:KeyError", "not_finite:error:non_finite_value"]
    one = np.array([[0, 0, 10, 10]], float)
    score = score_completion(build_completion("x", "polyp", one), "no_seg_token", [mask], one, (40, 40), cfg)
    assert score.components["fails_on_two_boxes"] == 1.0 and score.total == pytest.approx(3.0)


@pytest.mark.parametrize("overrides, key, words", [
    (["reward.terms=[format,bocks]"], "reward.terms[1]", "unknown reward term 'bocks'"),
    (["reward.terms=[format,tests.no_such_module:fn]"], "reward.terms[1]", "cannot import 'tests.no_such_module'"),
    ([f"reward.terms=[{EXAMPLE}:missing]"], "reward.terms[0]", "has no function 'missing'"),
    ([f"reward.terms=[{EXAMPLE}:NOT_A_FUNCTION]"], "reward.terms[0]", "has no function"),
    ([f"reward.terms=[box,{EXAMPLE}:length_penalty,{EXAMPLE}:length_penalty]"], "reward.terms[2]", "a second term"),
    (["reward.terms=[]"], "reward.terms", "at least one term"),
    (["reward.term_weights.length_penalty=2"], "reward.term_weights.length_penalty", "no such term"),
    (["reward.term_weights.box=2"], "reward.term_weights.box", "reward.w_box"),
])
def test_bad_terms_fail_at_config_load_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", overrides)
    assert f"config key '{key}'" in str(err.value) and words in str(err.value)


def test_register_term_refuses_a_second_function_under_one_name():
    with pytest.raises(TermError, match="already registered"):
        register_term("format")(lambda inp: (0.0, ""))
