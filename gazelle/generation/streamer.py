"""Turning generated token ids into text as they arrive."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


class TextStreamer:
    """Decodes one sequence's tokens incrementally and writes only text that is complete.

    The whole sequence is re-decoded at each token so that merges across token boundaries and
    multi-byte characters come out right; text ending in an unfinished character is held back.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, write: Callable[[str], object] | None = None,
                 skip_special_tokens: bool = True):
        """skip_prompt: the first put() carries the prompt (as model.generate sends it) and is not shown."""
        self.tokenizer = tokenizer
        self.skip_next = skip_prompt
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""

    def put(self, token_ids) -> None:
        """token_ids: a list of ids or a tensor of them (one sequence)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        if self.skip_next:
            self.skip_next = False
            return
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens))
        self.write("\n")

    def _emit(self, text: str) -> None:
        if len(text) > len(self.text):
            self.write(text[len(self.text):])
        self.text = text
