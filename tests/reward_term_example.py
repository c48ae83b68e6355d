"""Reward terms referenced by import path in tests/test_reward_terms.py (`tests.reward_term_example:<name>`)."""
from coreseg.reward.terms import TermInput


def length_penalty(inp: TermInput):
    """-0.01 per character of the completion past 100."""
    over = max(0, len(inp.text) - 100)
    return -0.01 * over, ("too_long" if over else "")


def fails_on_two_boxes(inp: TermInput):
    """1, but raises on a completion with two boxes: a term that breaks on some outputs."""
    if len(inp.parsed.boxes) == 2:
        raise KeyError("two boxes")
    return 1.0, ""


def not_finite(inp: TermInput):
    return float("nan"), ""


NOT_A_FUNCTION = 3
