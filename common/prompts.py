"""The task's prompt words and completion template, and the strict completion parser. The chat format the
words are wrapped in belongs to the model family (`common.models.family`, `ModelFamily.prompt`).

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
R_NO_BOXES = "no_box_list"
R_BAD_LIST = "bad_list_syntax"
R_BOX_NOT_4 = "box_not_4_numbers"
R_BOX_NOT_FINITE = "box_not_finite"
R_INVERTED = "inverted_box"
R_NO_SEG = "no_seg_token"
R_MULTI_SEG = "multiple_seg_tokens"
R_SEG_IN_THINK = "seg_in_think"

_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_TEMPLATE_RE = re.compile(
    r"^\s*The\s+(?P<category>.+?)\s+(?:is|are)\s+located\s+at\s+(?P<boxes>\[.*\])\s*\.?\s*"
    r"The\s+mask\s+is\s+<seg>\s*\.?\s*$", re.S)
_BOX_LIST_RE = re.compile(r"\[.*\]", re.S)


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
    except (ValueError, RecursionError):
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
        box = [float(v) for v in box]
        if not all(math.isfinite(v) for v in box):
            return None, R_BOX_NOT_FINITE
        if box[2] <= box[0] or box[3] <= box[1]:
            return None, R_INVERTED
        boxes.append(box)
    return boxes, OK


def _salvage_boxes(text: str) -> tuple[List[List[float]], bool]:
    match = _BOX_LIST_RE.search(text)
    if not match:
        return [], False
    boxes, reason = parse_box_list(match.group(0))
    return (boxes, True) if reason == OK else ([], False)


def parse_completion(text) -> ParsedCompletion:
    """Strict parse of one completion. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return ParsedCompletion(False, R_EMPTY)
    text = text.replace(END_OF_TURN, "").replace("<|endoftext|>", "")
    seg_total = text.count(SEG_TOKEN)
    think_match = _THINK_RE.match(text)
    if not think_match:
        reason = R_TEXT_BEFORE if "<think>" in text and "</think>" in text else R_NO_THINK
        boxes, boxes_ok = _salvage_boxes(text)
        return ParsedCompletion(False, reason, boxes=boxes, boxes_ok=boxes_ok, seg_count=seg_total)
    think = think_match.group(1).strip()
    rest = text[think_match.end():]
    partial = dict(think=think, seg_count=seg_total)
    if SEG_TOKEN in think:
        boxes, boxes_ok = _salvage_boxes(rest)
        return ParsedCompletion(False, R_SEG_IN_THINK, boxes=boxes, boxes_ok=boxes_ok, **partial)
    if not rest.lstrip().startswith("<answer>"):
        return ParsedCompletion(False, R_NO_ANSWER, **partial)
    answer_match = _ANSWER_RE.search(rest)
    if not answer_match:
        boxes, boxes_ok = _salvage_boxes(rest)
        return ParsedCompletion(False, R_UNCLOSED_ANSWER, boxes=boxes, boxes_ok=boxes_ok, **partial)
    answer = answer_match.group(1)
    boxes, boxes_ok = _salvage_boxes(answer)
    partial.update(boxes=boxes, boxes_ok=boxes_ok)
    if rest[answer_match.end():].strip():
        return ParsedCompletion(False, R_TEXT_AFTER, **partial)
    seg_in_answer = answer.count(SEG_TOKEN)
    if seg_in_answer == 0:
        return ParsedCompletion(False, R_NO_SEG, **partial)
    if seg_in_answer > 1:
        return ParsedCompletion(False, R_MULTI_SEG, **partial)
    if not _BOX_LIST_RE.search(answer):
        return ParsedCompletion(False, R_NO_BOXES, **partial)
    template = _TEMPLATE_RE.match(answer)
    if not template:
        return ParsedCompletion(False, R_NOT_TEMPLATE, **partial)
    parsed_boxes, reason = parse_box_list(template.group("boxes"))
    if reason != OK:
        return ParsedCompletion(False, reason, think=think, seg_count=seg_total)
    return ParsedCompletion(True, OK, think=think, category=template.group("category").strip(),
                            boxes=parsed_boxes, boxes_ok=True, seg_count=seg_total)
