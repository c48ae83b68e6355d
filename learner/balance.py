"""How a batch is laid out over data-parallel learner ranks and their micro-batches (pure).

Every rank of a step must run the same sequence of collectives whatever its data: under ZeRO each backward
reduces gradients and each forward (ZeRO-3) gathers parameters, so every rank runs the same number of
micro-batches. `rank_layouts` balances the rows by tokens (a row's cost: its prompt + completion tokens; packed
batches: a prompt's completions stay together, at the cost of one prompt + their completions), gives
every rank the same number of micro-batches and fills a micro-batch left empty with one padding row: a copy of
the batch's cheapest row whose loss weight is 0 (the worker zeroes its completion mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from coreseg.common.actor_pool import balanced_shards

T = TypeVar("T")


@dataclass(frozen=True)
class RankLayout:
    """One rank's part of a step. `rows`: the batch rows it computes, in its order (a padding row repeats a real
    row's index); `real[j]`: False for a padding row (loss weight 0, its outputs discarded); `micro`: its
    micro-batches as [start, end) ranges over `rows`, never empty. Every rank of a step has as many micro-batches."""
    rows: Tuple[int, ...]
    real: Tuple[bool, ...]
    micro: Tuple[Tuple[int, int], ...]


def _units(n: int, groups: Optional[Sequence[Hashable]]) -> List[List[int]]:
    """Runs of consecutive rows with the same group label (each row alone when there are no labels)."""
    if groups is None:
        return [[i] for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} rows")
    units: List[List[int]] = []
    for i in range(n):
        if units and groups[units[-1][0]] == groups[i]:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def assign_rows(costs: Sequence[float], ranks: int, micro_batch_size: int,
                groups: Optional[Sequence[Hashable]] = None) -> List[List[List[int]]]:
    """plan[rank][k]: the row indices of micro-batch k of `rank`. Every rank gets the same number of
    micro-batches, ceil(rows / (ranks * micro_batch_size)) and at least 1, each of at most `micro_batch_size`
    rows (a micro-batch may be empty: `rank_layouts` pads it). Rows go, most expensive first, to the rank with the
    least cost so far among those with room left (ties: fewer rows, lower rank), so two ranks' costs differ by
    more than the largest row's cost only when the lighter one is full. Within a rank, rows keep batch order (a
    prompt's completions stay together, so its image is prepared once per micro-batch), split into micro-batches
    whose sizes differ by at most 1 (on one rank: the batch's contiguous chunks).

    `groups` (packed batches): a label per row; consecutive rows with the same label (a prompt's completions) go
    to one rank together, as one unit of their summed cost, so the rank packs their prompt once. A unit that fits
    no rank's room whole is dealt row by row as above."""
    if ranks < 1 or micro_batch_size < 1:
        raise ValueError(f"need ranks >= 1 and micro_batch_size >= 1, got {ranks} and {micro_batch_size}")
    if any(c < 0 for c in costs):
        raise ValueError(f"row costs must be >= 0, got {min(costs)}")
    per_rank = max(1, math.ceil(len(costs) / (ranks * micro_batch_size)))
    capacity = per_rank * micro_batch_size
    members: List[List[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    units = _units(len(costs), groups)
    for unit in sorted(units, key=lambda u: (-sum(costs[i] for i in u), u[0])):
        room = [r for r in range(ranks) if len(members[r]) + len(unit) <= capacity]
        for part in ([unit] if room else [[i] for i in unit]):
            r = min((r for r in range(ranks) if len(members[r]) + len(part) <= capacity),
                    key=lambda r: (loads[r], len(members[r]), r))
            members[r] += part
            loads[r] += sum(costs[i] for i in part)
    members = [sorted(m) for m in members]
    return [[[m[k] for k in part] for part in balanced_shards(len(m), per_rank)] for m in members]


def rank_layouts(costs: Sequence[float], ranks: int, micro_batch_size: int,
                 groups: Optional[Sequence[Hashable]] = None) -> List[RankLayout]:
    """`assign_rows`, with each empty micro-batch filled by one padding row (the cheapest row, lowest index)."""
    if not len(costs):
        raise ValueError("cannot lay out an empty batch over learner ranks")
    pad = min(range(len(costs)), key=lambda i: (costs[i], i))
    layouts = []
    for micro_batches in assign_rows(costs, ranks, micro_batch_size, groups):
        rows: List[int] = []
        real: List[bool] = []
        bounds = []
        for part in micro_batches:
            start = len(rows)
            rows += part or [pad]
            real += [True] * len(part) or [False]
            bounds.append((start, len(rows)))
        layouts.append(RankLayout(tuple(rows), tuple(real), tuple(bounds)))
    return layouts


def in_batch_order(layouts: Sequence[RankLayout], per_rank: Sequence[Sequence[T]]) -> List[T]:
    """Per-row results of every rank (one per row of its layout) -> the real rows' results in batch order."""
    out = {}
    for layout, values in zip(layouts, per_rank):
        if len(values) != len(layout.rows):
            raise ValueError(f"{len(values)} results for a rank laid out with {len(layout.rows)} rows")
        out.update((i, v) for i, keep, v in zip(layout.rows, layout.real, values) if keep)
    if sorted(out) != list(range(len(out))):
        raise ValueError(f"the layouts cover rows {sorted(out)}, not 0..{len(out) - 1}")
    return [out[i] for i in range(len(out))]


def flatten_rows(groups: Sequence, samples: Sequence) -> Tuple[list, list]:
    """(sample, completion) rows of a GRPO batch, prompt-major: (samples, completions), one entry per completion."""
    if len(groups) != len(samples):
        raise ValueError(f"{len(groups)} rollout groups for {len(samples)} samples")
    rows = [(s, c) for s, g in zip(samples, groups) for c in g.completions]
    return [s for s, _ in rows], [c for _, c in rows]


def prompt_groups(samples: Sequence, completions: Sequence) -> List[int]:
    """A label per row: consecutive rows with the same sample id and prompt ids (a prompt's completions) share one."""
    labels: List[int] = []
    for i, (s, c) in enumerate(zip(samples, completions)):
        same = i and s.id == samples[i - 1].id and list(c.prompt_token_ids) == list(completions[i - 1].prompt_token_ids)
        labels.append(labels[-1] if same else (labels[-1] + 1 if labels else 0))
    return labels


def completion_costs(completions: Sequence, packed: bool = False,
                     groups: Optional[Sequence[Hashable]] = None) -> List[float]:
    """A GRPO row's cost: the tokens the learner runs through the model for it. Padded rows: prompt + completion.
    Packed (`groups`: `prompt_groups` labels): the completion plus its share of the prompt its group runs once, so a
    group costs P + sum(C)."""
    if not packed:
        return [len(c.prompt_token_ids) + len(c.token_ids) for c in completions]
    if groups is None or len(groups) != len(completions):
        raise ValueError("packed row costs need one group label per completion")
    sizes = {g: list(groups).count(g) for g in set(groups)}
    return [len(c.token_ids) + len(c.prompt_token_ids) / sizes[g] for c, g in zip(completions, groups)]


def merge_forward(layouts: Sequence[RankLayout], results: Sequence):
    """Every rank's ForwardResult (one entry per row of its layout) -> the batch's, real rows in batch order."""
    from coreseg.common.protocol import ForwardResult

    logprobs = in_batch_order(layouts, [r.logprobs for r in results])
    ref = in_batch_order(layouts, [r.ref_logprobs for r in results]) if len(results[0].ref_logprobs) else []
    states = in_batch_order(layouts, [list(r.seg_states) for r in results])
    found = in_batch_order(layouts, [list(r.seg_found) for r in results])
    return ForwardResult(logprobs, ref, np.stack(states), np.asarray(found, dtype=bool))
