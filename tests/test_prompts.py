import pytest

from common import prompts as P

GOOD = "<think> The liver is homogeneous. A dark region. </think> <answer> The liver lesion is located at " \
       "[[10, 20, 30, 40], [50, 60, 70, 80]]. The mask is <seg>. </answer>"


@pytest.mark.parametrize("text, ok, reason, boxes", [
    (GOOD, True, P.OK, [[10, 20, 30, 40], [50, 60, 70, 80]]),
    (GOOD + "<|im_end|>", True, P.OK, [[10, 20, 30, 40], [50, 60, 70, 80]]),
    ("<think>x</think><answer>The polyp is located at [[1.5, 2, 3, 4.25]]. The mask is <seg>.</answer>", True,
     P.OK, [[1.5, 2, 3, 4.25]]),
    ("<think>x</think> <answer> The polyp is located at [1, 2, 3, 4]. The mask is <seg>. </answer>", True, P.OK,
     [[1, 2, 3, 4]]),  # a single flat box is one box
    ("<think>x</think> <answer> The polyp is located at []. The mask is <seg>. </answer>", True, P.OK, []),
    ("", False, P.R_EMPTY, []),
    (None, False, P.R_EMPTY, []),
    ("The polyp is located at [[1, 2, 3, 4]]. The mask is <seg>.", False, P.R_NO_THINK, [[1, 2, 3, 4]]),
    ("hello <think>x</think> <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg>. </answer>", False,
     P.R_TEXT_BEFORE, [[1, 2, 3, 4]]),
    ("<think>x</think> The a is located at [[1, 2, 3, 4]]. The mask is <seg>.", False, P.R_NO_ANSWER, []),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg>.", False,
     P.R_UNCLOSED_ANSWER, [[1, 2, 3, 4]]),
    (GOOD + " and more", False, P.R_TEXT_AFTER, [[10, 20, 30, 40], [50, 60, 70, 80]]),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3, 4]]. </answer>", False, P.R_NO_SEG, [[1, 2, 3, 4]]),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg><seg>. </answer>", False,
     P.R_MULTI_SEG, [[1, 2, 3, 4]]),
    ("<think>x <seg></think> <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg>. </answer>", False,
     P.R_SEG_IN_THINK, [[1, 2, 3, 4]]),
    ("<think>x</think> <answer> The a is somewhere. The mask is <seg>. </answer>", False, P.R_NO_BOXES, []),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3, 4]. The mask is <seg>. </answer>", False,
     P.R_BAD_LIST, []),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3]]. The mask is <seg>. </answer>", False,
     P.R_BOX_NOT_4, []),
    ("<think>x</think> <answer> The a is located at [[30, 2, 10, 4]]. The mask is <seg>. </answer>", False,
     P.R_INVERTED, []),
    ("<think>x</think> <answer> The a is located at [[1, \"b\", 3, 4]]. The mask is <seg>. </answer>", False,
     P.R_BOX_NOT_4, []),
    ("<think>x</think> <answer> Located: [[1, 2, 3, 4]] <seg> </answer>", False, P.R_NOT_TEMPLATE, [[1, 2, 3, 4]]),
    ("<think>x</think> <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg>. Done </answer>", False,
     P.R_NOT_TEMPLATE, [[1, 2, 3, 4]]),
    ("<think>unclosed <answer> The a is located at [[1, 2, 3, 4]]. The mask is <seg>. </answer>", False,
     P.R_NO_THINK, [[1, 2, 3, 4]]),
])
def test_parser_cases(text, ok, reason, boxes):
    parsed = P.parse_completion(text)
    assert parsed.ok is ok
    assert parsed.reason == reason
    assert parsed.boxes == boxes


def test_parser_extracts_fields():
    parsed = P.parse_completion(GOOD)
    assert parsed.category == "liver lesion"
    assert parsed.think == "The liver is homogeneous. A dark region."
    assert parsed.seg_count == 1


def test_parser_never_raises_on_garbage():
    import random
    rng = random.Random(0)
    alphabet = list("<>[]/,.0123456789 thinkanswerseg") + ["<think>", "</think>", "<answer>", "</answer>", "<seg>"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert isinstance(P.parse_completion(text).reason, str)


def test_built_completion_parses():
    comp = P.build_completion("Normal tissue. A bright spot.", "polyp", [[1, 2, 30, 40.4]])
    parsed = P.parse_completion(comp)
    assert parsed.ok and parsed.boxes == [[1, 2, 30, 40]] and parsed.category == "polyp"
