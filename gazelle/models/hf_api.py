"""The Hugging Face-style conveniences notebooks call on a model: generate, save_pretrained, device.

Kept apart from the Decoder's math; the Decoder inherits them.
"""

from __future__ import annotations

import json
import os

import torch

from gazelle.errors import GazelleError


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's tokens to the right end (tokenizers pad on the right by default)."""
    if bool(attention_mask[:, -1].all()):
        return input_ids, attention_mask
    lengths = attention_mask.sum(-1)
    T = input_ids.shape[1]
    # Row r's real tokens are its first lengths[r] columns (right padding); roll them to the end.
    order = (torch.arange(T, device=input_ids.device)[None] + lengths[:, None]) % T  # (B, T)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


class HFStyleMixin:
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        streamer=None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **unused,
    ) -> torch.Tensor:
        """transformers-style generate: (B, T) prompts -> (B, T + new) tokens, prompts left-padded as needed.

        `streamer` is anything with put(tensor) and end(), transformers' TextStreamer included.
        """
        from gazelle.generation.reference import generate
        from gazelle.generation.sampling import SamplingParams

        if input_ids is None:
            raise GazelleError("generate needs input_ids (tokenize the prompt first)")
        if repetition_penalty != 1.0:
            raise GazelleError("repetition_penalty is not supported by the reference generator yet; leave it at 1.0")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_padded(input_ids, attention_mask)
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, params=params,
                       eos_token_ids=eos, pad_token_id=pad,
                       on_token=None if streamer is None else (lambda token: streamer.put(token.cpu())))
        if streamer is not None:
            streamer.end()
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None, **unused) -> None:
        """The LoRA adapter in PEFT's format when adapters are attached, else the full weights + config.json."""
        os.makedirs(save_directory, exist_ok=True)
        if self.lora_config is not None:
            from gazelle.lora.peft_io import save_adapter

            save_adapter(self, save_directory, self.lora_config, self.name_or_path or "")
        else:
            from safetensors.torch import save_file

            state = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
            if self.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            tmp = os.path.join(save_directory, "model.safetensors.tmp")
            save_file(state, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(save_directory, "model.safetensors"))
            with open(os.path.join(save_directory, "config.json"), "w") as f:
                json.dump(self.config.hf_config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    def push_to_hub(self, *args, **kwargs):
        raise GazelleError("push_to_hub needs the Hugging Face hub, which this machine cannot reach; "
                           "save_pretrained to a folder and upload it from a connected machine")
