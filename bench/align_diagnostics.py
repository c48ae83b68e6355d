"""Where the path from image to boxes breaks in a policy folder: teacher-forced diagnostics on held-out samples
(bench/align_probe.py reports them for the folder it builds).

- NLL of the box coordinates' tens and units digits (ln 10 = 2.30 for a uniform guess over the digits);
- accuracy of the reasoning's image-dependent words among their options (vertical place, horizontal place, size,
  count), next to always answering the most frequent option;
- linear probes (ridge, fitted on the first 2/3 of the samples, scored on the rest): each vision token's own row and
  column from its hidden state after each language-model layer (chance 0.25), and the vertical-place word from the
  hidden state that predicts it;
- per head of the last layer, where the vertical-place word is predicted: the attention on the image's tokens and
  on the tokens a lesion covers (over 10% of the token's pixels).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

WORD_GROUPS = {"vertical place": (" upper", " lower", " middle", " centre"),
               "horizontal place": (" left", " right", " central"),
               "size": (" tiny", " small", " medium", " large"),
               "count": (" one", " two", " three")}


def first_token_ids(tokenizer, words: Sequence[str]) -> List[int]:
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0] for w in words]


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, lam: float = 10.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier: fitted on the first 2/3 of the rows, scored on the rest."""
    x = np.asarray(features, np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = len(x) * 2 // 3
    onehot = np.eye(labels.max() + 1)[labels]
    w = np.linalg.solve(x[:n].T @ x[:n] + lam * np.eye(x.shape[1]), x[:n].T @ onehot[:n])
    return float((np.argmax(x[n:] @ w, 1) == labels[n:]).mean())


def lesion_tokens(sample, grid: int) -> np.ndarray:
    """[grid * grid] bool: vision tokens (raster order) whose pixels are over 10% lesion."""
    from coreseg.common.models.align import coverage_targets

    # equal cells: a token's lesion fraction is the mean of its cells'
    return coverage_targets(sample, sample.height // grid).numpy().mean(axis=1) > 0.1


@torch.no_grad()
def diagnose(folder, samples, batch: int = 20) -> Dict[str, object]:
    from coreseg.common.models.align import collate, encode_rows
    from coreseg.common.models.policy import load_policy, policy_info

    model, processor = load_policy(folder)
    model.eval()
    model.config._attn_implementation = "eager"  # attention weights are returned by the eager kernel only
    model.model.language_model.config._attn_implementation = "eager"
    family, tok = policy_info(folder).family, processor.tokenizer
    digits = set(first_token_ids(tok, list("0123456789")))
    groups = {g: first_token_ids(tok, words) for g, words in WORD_GROUPS.items()}
    vertical = groups["vertical place"]
    image_id = model.config.image_token_id
    nll = {"tens": [], "units": []}
    picks: Dict[str, List[tuple]] = {g: [] for g in groups}
    own_place: Dict[int, List[np.ndarray]] = {}
    word_states: Dict[int, List[np.ndarray]] = {}
    word_labels: List[int] = []
    attention = {"image": [], "lesion": []}
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        inputs, target = collate(encode_rows(processor, family, chunk), family, tok.pad_token_id)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        ids, logits = inputs["input_ids"], out.logits.float()
        logp = torch.log_softmax(logits, -1)
        for b, sample in enumerate(chunk):
            image = (ids[b] == image_id).nonzero().flatten()
            grid = int(round(len(image) ** 0.5))
            for layer, h in enumerate(out.hidden_states):
                own_place.setdefault(layer, []).append(h[b, image].numpy())
            previous_digit = False
            for t in range(1, ids.shape[1]):
                token = int(ids[b, t])
                if target[b, t] <= 0:
                    continue
                if token in digits:
                    nll["units" if previous_digit else "tens"].append(-float(logp[b, t - 1, token]))
                previous_digit = token in digits
                for g, options in groups.items():
                    if token in options:
                        picks[g].append((options.index(token), int(torch.argmax(logits[b, t - 1, options]))))
            where = [t for t in range(1, ids.shape[1]) if int(ids[b, t]) in vertical and target[b, t] > 0]
            if where:
                q = where[0] - 1
                word_labels.append(vertical.index(int(ids[b, where[0]])))
                for layer, h in enumerate(out.hidden_states):
                    word_states.setdefault(layer, []).append(h[b, q].numpy())
                last = out.attentions[-1][b, :, q]  # [heads, T]
                attention["image"].append(last[:, image].sum(-1).numpy())
                attention["lesion"].append(last[:, image[torch.as_tensor(lesion_tokens(sample, grid))]].sum(-1).numpy())
    n_tokens = own_place[0][0].shape[0]
    grid = int(round(n_tokens ** 0.5))
    rows, cols = np.tile(np.arange(n_tokens) // grid, len(samples)), np.tile(np.arange(n_tokens) % grid, len(samples))
    labels = np.array(word_labels)
    words = {}
    for g, pairs in picks.items():
        truth, chosen = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        words[g] = {"n": len(pairs), "accuracy": float((truth == chosen).mean()),
                    "majority": float(np.bincount(truth).max() / len(truth))}
    return {"n": len(samples), "nll_tens": float(np.mean(nll["tens"])), "nll_units": float(np.mean(nll["units"])),
            "words": words,
            "own_row": [ridge_accuracy(np.concatenate(own_place[l]), rows) for l in sorted(own_place)],
            "own_col": [ridge_accuracy(np.concatenate(own_place[l]), cols) for l in sorted(own_place)],
            "vertical_word_probe": [ridge_accuracy(np.stack(word_states[l]), labels) for l in sorted(word_states)],
            "vertical_word_majority": float(np.bincount(labels).max() / len(labels)),
            "last_layer_attention_image": np.mean(attention["image"], 0).round(3).tolist(),
            "last_layer_attention_lesion": np.mean(attention["lesion"], 0).round(3).tolist()}


def diagnostics_table(rows: Dict[str, dict]) -> str:
    """Markdown: one row per labelled diagnosis."""
    head = ["policy", "n", "NLL tens / units digit"] + [f"{g} acc (majority)" for g in WORD_GROUPS] + [
        "vision token's own row / col, probe per layer", "vertical word probe per layer (majority)",
        "last layer attention per head: image / lesion tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d in rows.items():
        cells = [label, str(d["n"]), f"{d['nll_tens']:.2f} / {d['nll_units']:.2f}"]
        cells += [f"{d['words'][g]['accuracy']:.2f} ({d['words'][g]['majority']:.2f})" for g in WORD_GROUPS]
        cells += [" ".join(f"{r:.2f}/{c:.2f}" for r, c in zip(d["own_row"], d["own_col"])),
                  " ".join(f"{a:.2f}" for a in d["vertical_word_probe"]) + f" ({d['vertical_word_majority']:.2f})",
                  " ".join(f"{i:.2f}/{s:.2f}" for i, s in zip(d["last_layer_attention_image"],
                                                             d["last_layer_attention_lesion"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
