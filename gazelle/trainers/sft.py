"""Supervised fine-tuning: SFTConfig and SFTTrainer with TRL's field names.

Rows become token sequences from, in order of preference: `formatting_func(row)`, the
`dataset_text_field` column, or a conversation column ("messages" or "conversations") rendered with
the tokenizer's chat template. Labels train on every token unless a label transform (such as
train_on_responses_only) masks some.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gazelle.data.collate import pack_examples, packed_batch, pad_batch
from gazelle.errors import GazelleError
from gazelle.losses.cross_entropy import IGNORE_INDEX, cross_entropy_sum
from gazelle.trainers.config import TrainingArguments
from gazelle.trainers.loop import Trainer
from gazelle.utils.logging import get_logger

log = get_logger(__name__)
CONVERSATION_COLUMNS = ("messages", "conversations")


@dataclass
class SFTConfig(TrainingArguments):
    dataset_text_field: str = "text"
    """Column holding the training text when no formatting_func is given."""
    max_seq_length: int | None = None
    """Longest training sequence in tokens (TRL's newer name: max_length); default: the model's setting or 2048."""
    max_length: int | None = None
    packing: bool = False
    """Concatenate examples into rows of max_seq_length; documents never attend to each other."""
    overlong: str = "truncate"
    """What to do with rows longer than max_seq_length: truncate (counted in the log), skip (counted), or error."""
    dataset_num_proc: int | None = None
    """Accepted for compatibility; tokenization runs in this process."""

    def __post_init__(self):
        super().__post_init__()
        if self.overlong not in ("truncate", "skip", "error"):
            raise GazelleError(f"overlong {self.overlong!r} is not one of truncate, skip, error")
        if self.max_seq_length is None:
            self.max_seq_length = self.max_length
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise GazelleError(f"max_seq_length must be at least 2, got {self.max_seq_length}")


TrainingArgumentsForSFT = SFTConfig


def _rows(dataset) -> list[dict]:
    if dataset is None:
        raise GazelleError("SFTTrainer needs a train_dataset")
    rows = [dict(r) for r in dataset]
    if not rows:
        raise GazelleError("train_dataset is empty: there is nothing to train on")
    return rows


class SFTTrainer(Trainer):
    supports_host_embeddings = True
    supports_host_layers = True

    def __init__(
        self,
        model,
        tokenizer=None,
        train_dataset=None,
        args: SFTConfig | TrainingArguments | None = None,
        formatting_func: Callable[[dict], str | list[str]] | None = None,
        data_collator=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        dataset_text_field: str | None = None,
        max_seq_length: int | None = None,
        packing: bool | None = None,
        dataset_num_proc: int | None = None,
    ):
        args = args or SFTConfig()
        if not isinstance(args, SFTConfig):  # plain TrainingArguments, as older notebooks pass
            args = SFTConfig(**args.to_dict())
        # Older TRL took these as trainer arguments; they override the config's.
        for name, value in (("dataset_text_field", dataset_text_field), ("max_seq_length", max_seq_length),
                            ("packing", packing)):
            if value is not None:
                setattr(args, name, value)
        super().__init__(model, args, callbacks)
        self.tokenizer = tokenizer or processing_class
        if self.tokenizer is None:
            raise GazelleError("SFTTrainer needs the tokenizer (tokenizer= or processing_class=)")
        if data_collator is not None:
            log.info("data_collator is ignored: gazelle pads and packs batches itself")
        self.formatting_func = formatting_func
        self.train_rows = _rows(train_dataset)
        self.eval_rows = _rows(eval_dataset) if eval_dataset is not None else None
        self.max_seq_length = args.max_seq_length or getattr(model, "max_seq_length", None) or 2048
        self.label_transforms: list[Callable[[list[int]], list[int]]] = []
        self._examples: list[dict] | None = None
        self._check_columns()

    # -- data ---------------------------------------------------------------------------------
    def add_label_transform(self, fn: Callable[[list[int]], list[int]]) -> None:
        """fn(input_ids) -> labels, applied to every tokenized row (train_on_responses_only uses it)."""
        self.label_transforms.append(fn)
        self._examples = None

    def _check_columns(self) -> None:
        if self.formatting_func is not None:
            return
        columns = self.train_rows[0].keys()
        if self.args.dataset_text_field in columns or any(c in columns for c in CONVERSATION_COLUMNS):
            return
        raise GazelleError(
            f"train_dataset has no {self.args.dataset_text_field!r} column (dataset_text_field) and no "
            f"messages/conversations column; its columns are {sorted(columns)}; pass formatting_func= or "
            "set dataset_text_field"
        )

    def _text(self, row: dict, index: int) -> str:
        if self.formatting_func is not None:
            text = self.formatting_func(row)
            if isinstance(text, list):
                if len(text) != 1:
                    raise GazelleError(f"formatting_func returned {len(text)} texts for row {index}; return one string")
                text = text[0]
        elif self.args.dataset_text_field in row:
            text = row[self.args.dataset_text_field]
        else:
            messages = next(row[c] for c in CONVERSATION_COLUMNS if c in row)
            if not self.tokenizer.chat_template:
                raise GazelleError("the dataset holds conversations but the tokenizer has no chat template; "
                                   "set one with gazelle.chat_templates.get_chat_template")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if text is not None and not isinstance(text, str):
            raise GazelleError(f"row {index}: the training text is a {type(text).__name__}, not a string")
        return text or ""

    def examples(self) -> list[dict]:
        """Tokenized training rows with labels, packed when configured (cached)."""
        if self._examples is None:
            examples = self.tokenize(self.train_rows)
            self._examples = pack_examples(examples, self.max_seq_length) if self.args.packing else examples
        return self._examples

    def tokenize(self, rows: list[dict]) -> list[dict]:
        """Rows -> {"input_ids", "labels"}, over-long and empty rows handled as configured."""
        tok, limit = self.tokenizer, self.max_seq_length
        examples, truncated, skipped_long, empty = [], 0, 0, 0
        for index, row in enumerate(rows):
            text = self._text(row, index)
            bos = tok.bos_token
            ids = tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
            if len(ids) < 2:
                empty += 1
                continue
            labels = list(ids)
            for transform in self.label_transforms:  # a token trains only if no transform masks it
                labels = [IGNORE_INDEX if new == IGNORE_INDEX else old for old, new in zip(labels, transform(ids))]
            if len(ids) > limit:
                if self.args.overlong == "error":
                    raise GazelleError(f"row {index} has {len(ids)} tokens, more than max_seq_length={limit} "
                                       "(set overlong='truncate' or 'skip', or raise max_seq_length)")
                if self.args.overlong == "skip":
                    skipped_long += 1
                    continue
                ids, labels, truncated = ids[:limit], labels[:limit], truncated + 1
            examples.append({"input_ids": ids, "labels": labels})
        if truncated or skipped_long or empty:
            log.info("data: %d rows truncated to %d tokens, %d over-long rows skipped, %d empty rows skipped",
                     truncated, limit, skipped_long, empty)
        if not examples:
            raise GazelleError("no trainable rows remain after tokenization (all empty or skipped)")
        if all(all(label == IGNORE_INDEX for label in e["labels"]) for e in examples):
            raise GazelleError("every label is masked: check train_on_responses_only's instruction/response parts")
        return examples

    def num_batches(self) -> int:
        return math.ceil(len(self.examples()) / self.args.per_device_train_batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        examples = self.examples()
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        size = self.args.per_device_train_batch_size
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for first in range(start * size, len(examples), size):
            chosen = [examples[i] for i in order[first : first + size].tolist()]
            length = self._padded_length(chosen)
            yield packed_batch(chosen, pad, length) if self.args.packing else pad_batch(chosen, pad, length)

    def _padded_length(self, chosen: list[dict]) -> int:
        """With CUDA graphs, batches padded to a few lengths, so each shape is captured once and replayed: packed
        rows to max_seq_length, others up to a multiple of an eighth of it (rounded to 64 tokens). Padding is
        masked and trains nothing; without graphs, the longest row."""
        if self._graphed is None:
            return 0
        if self.args.packing:
            return self.max_seq_length
        step = min(self.max_seq_length, -(-self.max_seq_length // 8 // 64) * 64 or 64)
        longest = max(len(e["input_ids"]) for e in chosen)
        return min(-(-longest // step) * step, max(self.max_seq_length, longest))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean loss over eval_dataset, tokenized like the training rows."""
        if self.eval_rows is None:
            return {}
        self.model.eval()
        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        examples, total, tokens = self.tokenize(self.eval_rows), 0.0, 0
        size = self.args.per_device_train_batch_size
        for start in range(0, len(examples), size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + size], pad).items()}
            loss_sum, count = self.loss(batch)
            total, tokens = total + float(loss_sum), tokens + int(count)
        return {"eval_loss": total / max(tokens, 1)}

    # -- loss ---------------------------------------------------------------------------------
    def _hidden(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch.get("position_ids"), inputs_embeds=batch.get("inputs_embeds"))

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._hidden(batch)
        trained = batch["targets"] != IGNORE_INDEX
        # Only positions with a target go through the lm_head.
        return cross_entropy_sum(self.model.logits, hidden[trained], batch["targets"][trained],
                                 self.model.config.vocab_size)

    def graph_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """loss() without selecting the trained positions (a data-dependent shape): every position goes through
        the head and the ignored ones add 0. The same value; what a CUDA graph can replay."""
        return cross_entropy_sum(self.model.logits, self._hidden(batch), batch["targets"],
                                 self.model.config.vocab_size)

    def resolved_config(self) -> dict:
        return {**self.args.to_dict(), "max_seq_length": self.max_seq_length}
