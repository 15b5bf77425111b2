"""The plain reference generation loop: one sequence batch, a growing KV cache, one token per step.

It is the oracle the fast engine is tested against and what the CLI uses until that engine exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gazelle.errors import GazelleError
from gazelle.generation.kv_cache import DynamicKVCache
from gazelle.generation.sampling import SamplingParams, next_token


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    params: SamplingParams = SamplingParams(),
    eos_token_ids: int | list[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue left-padded prompts input_ids (B, T); returns (B, T + n) with n <= max_new_tokens.

    A sequence that emits an EOS token is padded with pad_token_id afterwards; the loop stops when all
    have finished. `on_token` receives each step's (B,) new tokens, for streaming.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise GazelleError("generation needs left-padded prompts (set tokenizer.padding_side = 'left')")
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else (eos_token_ids or []), device=input_ids.device)
    cache = DynamicKVCache(model.config.num_layers)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, step_ids = [input_ids], input_ids
    rope = model.config.rope
    for _ in range(max_new_tokens):
        if rope.rope_type == "longrope" and cache.length <= rope.original_max_position_embeddings < cache.length + step_ids.shape[1]:
            # LongRoPE switches every position to its long factors once the sequence passes the original
            # length: keys cached under the short factors are stale, so the whole sequence is run again.
            cache, step_ids = DynamicKVCache(model.config.num_layers), torch.cat(tokens, dim=-1)
        hidden = model(step_ids, attention_mask=attention_mask, cache=cache)
        token = next_token(model.logits(hidden[:, -1]), params, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token[:, None])
        if on_token is not None:
            on_token(token)
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()):
            break
        step_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=-1)
    return torch.cat(tokens, dim=-1)
