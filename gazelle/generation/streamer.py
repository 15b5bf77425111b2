"""Turning generated token ids into text as they arrive."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TextStreamer:
    """Decodes one sequence's tokens incrementally and writes only text that is complete.

    The whole sequence is re-decoded at each token so that merges across token boundaries and
    multi-byte characters come out right; text ending in an unfinished character is held back.
    """

    def __init__(self, tokenizer, write: Callable[[str], object] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""

    def put(self, token_ids: list[int]) -> None:
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
