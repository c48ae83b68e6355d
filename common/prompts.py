"""The task's prompt words and completion template, and the strict completion parser. The chat format the
words are wrapped in is the model folder's chat template, applied through the model family
(`common.models.family`, `ModelFamily.render_prompt`); `SYSTEM_PROMPT` is `model.system_prompt`'s default.

Completion format (the paper's):
  <think> reasoning </think> <answer> The <category> is located at [[x1, y1, x2, y2], ...]. The mask is <seg>. </answer>
Boxes are absolute pixel coordinates, one per lesion; one `<seg>` covers all lesions.
The parser never raises on model output: it returns a `ParsedCompletion` with a named `reason`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

SEG_TOKEN = "<seg>"
END_OF_TURN = "<|im_end|>"  # stripped by the parser (generation ends there)

SYSTEM_PROMPT = "You are a medical imaging expert. Reason step by step before you answer."
USER_INSTRUCTION = (
    "{question} Think inside <think> </think>, then answer inside <answer> </answer> as: "
    "The <category> is located at [[x1, y1, x2, y2]]. The mask is <seg>.")

# Parser reasons (stable strings: they are counted in metrics).
OK = "ok"
R_EMPTY = "empty_output"
R_NO_THINK = "no_think_block"
R_TEXT_BEFORE = "text_before_think"
R_NO_ANSWER = "no_answer_tag"
R_UNCLOSED_ANSWER = "unclosed_answer"
R_TEXT_AFTER = "text_after_answer"
R_NOT_TEMPLATE = "answer_not_in_template"
R_NO_BOX_LIST = "no_box_list"
R_BAD_LIST = "bad_list_syntax"
R_BOX_NOT_4 = "box_not_4_numbers"
R_BOX_NOT_FINITE = "box_not_finite"
R_INVERTED = "inverted_box"
R_NO_SEG = "no_seg_token"
R_MULTI_SEG = "multiple_seg_tokens"
R_SEG_IN_THINK = "seg_in_think"

# Only single greedy runs and literal-led patterns: every scan below is linear in the input (the earlier
# `(.*?)` / `\[.*\]` regexes backtracked quadratically on inputs like "x" + "[" * 65536).
_WS_RE = re.compile(r"\s*")
# "is|are located at [" right after whitespace: where the category may end (see `_match_template`)
_VERB_RE = re.compile(r"(?<=\s)(?:is|are)\s+located\s+at\s+\[")


@dataclass
class ParsedCompletion:
    ok: bool
    reason: str
    think: str = ""
    category: str = ""
    boxes: List[List[float]] = field(default_factory=list)
    boxes_ok: bool = False  # the box list parsed (even if the rest of the format failed)
    seg_count: int = 0


def build_user_text(question: str) -> str:
    return USER_INSTRUCTION.format(question=question.strip())


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    return "[" + ", ".join("[" + ", ".join(str(int(round(v))) for v in b) + "]" for b in boxes) + "]"


def build_completion(reasoning: str, category: str, boxes: Sequence[Sequence[float]]) -> str:
    """The target completion (used by the synthetic set and SFT)."""
    return (f"<think> {reasoning.strip()} </think> <answer> The {category} is located at "
            f"{format_boxes(boxes)}. The mask is {SEG_TOKEN}. </answer>")


def parse_box_list(text: str) -> tuple[Optional[List[List[float]]], str]:
    """Parse a nested list of [x1, y1, x2, y2]; returns (boxes, reason)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # also an int past Python's digit limit, or nesting past the stack
        return None, R_BAD_LIST
    if not isinstance(value, list):
        return None, R_BAD_LIST
    if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = [value]  # a single flat box is accepted as one box
    boxes = []
    for box in value:
        if not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            return None, R_BOX_NOT_4
        try:
            box = [float(v) for v in box]
        except OverflowError:  # an int too large for a float is not a finite coordinate
            return None, R_BOX_NOT_FINITE
        if not all(math.isfinite(v) for v in box):
            return None, R_BOX_NOT_FINITE
        if box[2] <= box[0] or box[3] <= box[1]:
            return None, R_INVERTED
        boxes.append(box)
    return boxes, OK


def _skip_ws(text: str, i: int) -> int:
    r"""The first index >= i that is not whitespace (`\s`, as str.strip sees it)."""
    return _WS_RE.match(text, i).end()


def _words_at(text: str, i: int, *words: str) -> int:
    r"""End of `word1 \s+ word2 \s+ ...` read at i, or -1."""
    for k, word in enumerate(words):
        if k:
            j = _skip_ws(text, i)
            if j == i:
                return -1
            i = j
        if not text.startswith(word, i):
            return -1
        i += len(word)
    return i


def _dot_ws(text: str, i: int) -> int:
    r"""End of `\s* \.? \s*` read at i."""
    i = _skip_ws(text, i)
    return _skip_ws(text, i + 1) if text.startswith(".", i) else i


def _box_span(text: str) -> Optional[str]:
    r"""From the first '[' to the last ']' after it (what the regex `\[.*\]` with DOTALL finds), or None."""
    first, last = text.find("["), text.rfind("]")
    return text[first:last + 1] if 0 <= first < last else None


def _salvage_boxes(text: str) -> tuple[List[List[float]], bool]:
    span = _box_span(text)
    if span is None:
        return [], False
    boxes, reason = parse_box_list(span)
    return (boxes, True) if reason == OK else ([], False)


def _match_template(answer: str) -> Optional[tuple[str, str]]:
    r"""(category, box list text) when the answer (holding exactly one `<seg>`) is the paper's template, else None.
    Same result as the DOTALL regex
        ^\s*The\s+(.+?)\s+(?:is|are)\s+located\s+at\s+(\[.*\])\s*\.?\s*The\s+mask\s+is\s+<seg>\s*\.?\s*$
    but linear: the tail fixes the list's closing ']' (the last one before `<seg>`), and the category is the
    shortest text before the first `is|are located at [` that opens before that ']'."""
    seg = answer.find(SEG_TOKEN)
    if _dot_ws(answer, seg + len(SEG_TOKEN)) != len(answer):
        return None
    close = answer.rfind("]", 0, seg)
    if close < 0:
        return None
    mask_is = _words_at(answer, _dot_ws(answer, close + 1), "The", "mask", "is")
    if mask_is < 0 or _skip_ws(answer, mask_is) == mask_is or _skip_ws(answer, mask_is) != seg:
        return None
    the_end = _words_at(answer, _skip_ws(answer, 0), "The")
    if the_end < 0:
        return None
    cat_start = _skip_ws(answer, the_end)
    if cat_start == the_end:
        return None
    verb = _VERB_RE.search(answer, cat_start + 1)
    if verb is not None and verb.end() - 1 < close:
        return answer[cat_start:verb.start()].strip(), answer[verb.end() - 1:close + 1]
    # The regex's `\s+` after "The" may also give back whitespace: with 3+ spaces before "is located at [",
    # the category is one space (which strips to "").
    verb = _VERB_RE.match(answer, cat_start)
    if cat_start - the_end >= 3 and verb is not None and verb.end() - 1 < close:
        return "", answer[verb.end() - 1:close + 1]
    return None


def parse_completion(text) -> ParsedCompletion:
    """Strict parse of one completion. Never raises; linear time in the length of the text."""
    if not isinstance(text, str) or not text.strip():
        return ParsedCompletion(False, R_EMPTY)
    text = text.replace(END_OF_TURN, "").replace("<|endoftext|>", "")
    seg_total = text.count(SEG_TOKEN)
    think_start = _skip_ws(text, 0)
    think_end = text.find("</think>", think_start + len("<think>")) if text.startswith("<think>", think_start) else -1
    if think_end < 0:
        reason = R_TEXT_BEFORE if "<think>" in text and "</think>" in text else R_NO_THINK
        boxes, boxes_ok = _salvage_boxes(text)
        return ParsedCompletion(False, reason, boxes=boxes, boxes_ok=boxes_ok, seg_count=seg_total)
    think = text[think_start + len("<think>"):think_end].strip()
    rest = text[_skip_ws(text, think_end + len("</think>")):]
    partial = dict(think=think, seg_count=seg_total)
    if SEG_TOKEN in think:
        boxes, boxes_ok = _salvage_boxes(rest)
        return ParsedCompletion(False, R_SEG_IN_THINK, boxes=boxes, boxes_ok=boxes_ok, **partial)
    if not rest.startswith("<answer>"):
        return ParsedCompletion(False, R_NO_ANSWER, **partial)
    answer_end = rest.find("</answer>", len("<answer>"))
    if answer_end < 0:
        boxes, boxes_ok = _salvage_boxes(rest)
        return ParsedCompletion(False, R_UNCLOSED_ANSWER, boxes=boxes, boxes_ok=boxes_ok, **partial)
    answer = rest[len("<answer>"):answer_end]
    boxes, boxes_ok = _salvage_boxes(answer)
    partial.update(boxes=boxes, boxes_ok=boxes_ok)
    if rest[answer_end + len("</answer>"):].strip():
        return ParsedCompletion(False, R_TEXT_AFTER, **partial)
    seg_in_answer = answer.count(SEG_TOKEN)
    if seg_in_answer == 0:
        return ParsedCompletion(False, R_NO_SEG, **partial)
    if seg_in_answer > 1:
        return ParsedCompletion(False, R_MULTI_SEG, **partial)
    if _box_span(answer) is None:
        return ParsedCompletion(False, R_NO_BOX_LIST, **partial)
    template = _match_template(answer)
    if template is None:
        return ParsedCompletion(False, R_NOT_TEMPLATE, **partial)
    category, box_text = template
    parsed_boxes, reason = parse_box_list(box_text)
    if reason != OK:
        return ParsedCompletion(False, reason, think=think, seg_count=seg_total)
    return ParsedCompletion(True, OK, think=think, category=category, boxes=parsed_boxes, boxes_ok=True,
                            seg_count=seg_total)
