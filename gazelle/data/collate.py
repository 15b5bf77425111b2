"""Tokenized examples -> training batches: targets shifted per document, padding, packing.

An example is {"input_ids": [...], "labels": [...]} with labels equal to input_ids except IGNORE_INDEX
where the token is not trained on. Targets are shifted inside each example (position t predicts
token t + 1, the last position predicts nothing) before examples are padded or packed, so a packed
row never asks one document to predict the next one's first token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gazelle.losses.cross_entropy import IGNORE_INDEX


def shifted_targets(labels: Sequence[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE_INDEX]


def pad_batch(examples: Sequence[dict], pad_token_id: int, length: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, targets, all (B, T) with T the longest example (or `length`
    when longer: a few fixed shapes for CUDA graphs)."""
    T = max(length, *(len(e["input_ids"]) for e in examples))
    ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(shifted_targets(e["labels"]))
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing into rows of at most max_length tokens.

    Each row is {"input_ids", "targets", "position_ids"}, position ids restarting at 0 for every
    document, which is how the Decoder keeps packed documents from attending to each other.
    """
    rows, current = [], {"input_ids": [], "targets": [], "position_ids": []}
    for e in examples:
        n = len(e["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "targets": [], "position_ids": []}
        current["input_ids"] += list(e["input_ids"])
        current["targets"] += shifted_targets(e["labels"])
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


def packed_batch(rows: Sequence[dict], pad_token_id: int, length: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows -> (B, T) tensors, T the longest row or `length`; padding at the end of a row is masked and
    trains nothing."""
    T = max(length, *(len(r["input_ids"]) for r in rows))
    out = {
        "input_ids": torch.full((len(rows), T), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), T), dtype=torch.long),
        "targets": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), T), dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["targets"][i, :n] = torch.tensor(r["targets"])
        out["position_ids"][i, :n] = torch.tensor(r["position_ids"])
    return out
