import pytest

from coreseg.common import prompts as P

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
    ("<think>x</think> <answer> The a is somewhere. The mask is <seg>. </answer>", False, P.R_NO_BOX_LIST, []),
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


HUGE = "1" + "0" * 400  # an int float() cannot hold


def _answer(boxes: str) -> str:
    return f"<think> a </think> <answer> The lesion is located at {boxes}. The mask is <seg>. </answer>"


@pytest.mark.parametrize("boxes, reason", [
    (f"[[0, 0, {HUGE}, 5]]", P.R_BOX_NOT_FINITE),  # was OverflowError from float(int)
    (f"[0, 0, {HUGE}, 5]", P.R_BOX_NOT_FINITE),
    ("[[0, 0, 1e999, 5]]", P.R_BOX_NOT_FINITE),
    ("[[NaN, 0, 1, 5]]", P.R_BOX_NOT_FINITE),
    ("[[0, -Infinity, 1, 5]]", P.R_BOX_NOT_FINITE),
    ("[[0, 0, " + "9" * 5000 + ", 5]]", P.R_BAD_LIST),  # past Python's int-string digit limit: not a number
    ("[" * 100_000 + "]" * 100_000, P.R_BAD_LIST),  # RecursionError inside json
])
def test_parser_huge_and_non_finite_numbers_are_reasons(boxes, reason):
    parsed = P.parse_completion(_answer(boxes))
    assert (parsed.ok, parsed.reason, parsed.boxes, parsed.boxes_ok) == (False, reason, [], False)
    salvaged = P.parse_completion("no tags " + boxes)  # the salvage path parses the same list
    assert (salvaged.reason, salvaged.boxes_ok) == (P.R_NO_THINK, False)


def _adversarial_strings():
    """Hand-picked hostile inputs, then random mixes of template fragments and odd characters."""
    import random
    fixed = [
        _answer(f"[[0, 0, 1{'0' * 400}, 5]]"), "[" * 200_000, "]" * 1000 + "[" * 1000, "[" * 50_000 + "]" * 50_000,
        _answer("[[[[[[1, 2, 3, 4]]]]]]"), _answer("[[1, 2, 3, 4], [[5, 6, 7, 8]]]"), _answer("[[true, 0, 1, 2]]"),
        _answer("[[NaN, NaN, NaN, NaN]]"), _answer("[Infinity, 0, 1, 2]"), _answer("[[1, 2, 3, 4] [5, 6, 7, 8]]"),
        _answer('[["1", 2, 3, 4]]'), _answer("[{}, 1, 2, 3]"), _answer("[null]"), _answer("[[1e308, 0, 1e309, 1]]"),
        _answer("[[-0.0, -0, 1, 1]]"), _answer("[[1, 2, 3, 4]]\u3000"), "\u3000\u00a0\u2028<think>\u2029x</think>\u0085",
        "<think>\ud800</think><answer>The \udfff is located at [[1, 2, 3, 4]]. The mask is <seg>.</answer>",
        "<think>😀</think><answer>The 病变 are located at [[1, 2, 3, 4]]. The mask is <seg>.</answer>",
        "\x00<think>\x00</think>\x00", "<seg>" * 1000, "<|im_end|>" * 10, "<think></think><answer></answer>",
        "<think><think></think></think><answer><answer></answer></answer>", "\n\n\n", "\t", "0" * 100_000,
    ]
    fragments = ["<think>", "</think>", "<answer>", "</answer>", "<seg>", "The", "mask", "is", "are", "located",
                 "at", " ", "  ", "\n", "\u3000", "[", "]", "[[", "]]", ",", ".", "1", "-2", HUGE, "NaN", "Infinity",
                 "1e999", "0.5", '"', "{", "}", "true", "null", "<|im_end|>", "<|endoftext|>", "é", "\ud800"]
    rng = random.Random(7)
    mixed = ["".join(rng.choice(fragments) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    built = [_answer(f"[[{rng.choice(fragments)}, {rng.choice(fragments)}, 3, 4]]") for _ in range(500)]
    return fixed + mixed + built


KNOWN_REASONS = {v for k, v in vars(P).items() if k.startswith("R_") or k == "OK"}


def test_parser_never_raises_on_adversarial_strings():
    for text in _adversarial_strings():
        parsed = P.parse_completion(text)
        assert parsed.reason in KNOWN_REASONS, (text[:80], parsed.reason)
        assert parsed.ok == (parsed.reason == P.OK)
        for box in parsed.boxes:  # whatever came back is usable: four finite floats, x2 > x1, y2 > y1
            assert len(box) == 4 and all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in box)
            assert box[2] > box[0] and box[3] > box[1]
    for not_text in (b"<think>", 3, 3.5, float("nan"), [GOOD], {"text": GOOD}, object()):
        assert P.parse_completion(not_text).reason == P.R_EMPTY


def _adversarial_64k(n: int) -> dict:
    """Inputs of n characters that made the regex parser quadratic (or worse), plus benign long ones."""
    head = "<think> a </think> <answer> The a is located at [[1, 2, 3, 4]]"
    tail = " [1, 2, 3, 4]. The mask is <seg>. </answer>"
    return {
        "many_open_brackets": "x" + "[" * n,
        "many_answer_tags": "<think>a</think>" + "<answer>" * (n // 8),
        "many_think_tags": "<think>" * (n // 7),
        "many_close_think_tags": "</think>" * (n // 8),
        "many_answer_after_think": "<think>a</think> <answer>" + "[<answer>" * (n // 9),
        "long_text_without_tags": "word " * (n // 5),
        "whitespace_in_template": head + " " * n + "x The mask is <seg>. </answer>",
        "whitespace_after_the": "<think>a</think><answer>The" + " " * n + "x</answer>",
        # the tail is the template's, so the category search runs over the whole head
        "repeated_located_at": "<think>a</think><answer>The a" + " is located at" * (n // 14) + tail,
        "repeated_is": "<think>a</think><answer>The a" + " is" * (n // 3) + tail,
        "is_then_spaces": "<think>a</think><answer>The a" + (" is" + " " * 61) * (n // 64) + tail,
    }


def _best_time(text: str, repeats: int = 3) -> float:
    import time
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        P.parse_completion(text)
        best = min(best, time.perf_counter() - start)
    return best


def test_parser_is_linear_on_adversarial_inputs():
    small, large = _adversarial_64k(64 * 1024), _adversarial_64k(128 * 1024)
    for name, text in small.items():
        t64 = _best_time(text)
        assert t64 < 0.1, f"{name}: {t64:.3f} s at 64 KB"
        t128 = _best_time(large[name])
        assert t128 < 3 * t64 + 0.01, f"{name}: {t64:.4f} s at 64 KB, {t128:.4f} s at 128 KB (not linear)"
