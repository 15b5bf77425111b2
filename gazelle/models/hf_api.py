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


_LIVE = object()  # fast_generate's default lora_request: the adapters as they are


class HFStyleMixin:
    @property
    def device(self) -> torch.device:
        """Where the model computes (its embedding tables may sit in host memory meanwhile: HostEmbeddings)."""
        host = getattr(self, "_host_embeddings", None)
        return host.device if host is not None else next(self.parameters()).device

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
        from gazelle.generation.sampling import SamplingParams

        if input_ids is None:
            raise GazelleError("generate needs input_ids (tokenize the prompt first)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repetition_penalty)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        if streamer is not None:
            if len(prompts) != 1:
                raise GazelleError("a streamer shows one sequence: generate one prompt at a time with streamer=")
            streamer.put(input_ids[:, attention_mask[0].bool()].cpu())
        on_tokens = None if streamer is None else (lambda rows, tokens: streamer.put(tokens[:1].cpu()))
        completions = self.engine().generate(prompts, max_new_tokens, params, eos_token_ids=eos, on_tokens=on_tokens)
        if streamer is not None:
            streamer.end()
        # transformers' layout: the prompts as given (left-padded), then the completions right-padded with pad.
        input_ids, attention_mask = left_padded(input_ids, attention_mask)
        width = max(len(c) for c in completions)
        new = torch.full((len(completions), width), pad, dtype=input_ids.dtype)
        for row, completion in enumerate(completions):
            new[row, : len(completion)] = torch.tensor(completion, dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def engine(self):
        """The generation engine over this model's live weights (created once, with its KV cache)."""
        from gazelle.generation.engine import Engine

        if self._engine is None:
            self._engine = Engine(self)
        return self._engine

    def fast_generate(self, prompts, sampling_params=None, max_new_tokens: int = 256, n: int = 1,
                      tokenizer=None, seed: int | None = None, lora_request=_LIVE, **unused) -> list[str]:
        """Texts for prompts given as strings or chat message lists (one prompt or a list of them).

        sampling_params: gazelle's engine SamplingParams, gazelle.SamplingParams (vLLM's names: temperature,
        top_p, top_k, min_p, repetition_penalty, max_tokens, n, seed, stop), or a dict of those names.
        Completions come prompt-major, n per prompt; each is a str that also carries vLLM's `.outputs`.
        lora_request: left out, the live weights (adapters as trained so far); a model.load_lora(path) request,
        that saved adapter for this call; None, the base model alone (adapters disabled), as vLLM reads it.
        """
        from gazelle.data.chat_templates import prompt_token_ids
        from gazelle.generation.requests import CompletionOutput, RequestOutput, SamplingParams, cut_at_stop
        from gazelle.generation.sampling import SamplingParams as EngineParams

        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise GazelleError("fast_generate needs the tokenizer: load with FastLanguageModel.from_pretrained "
                               "or pass tokenizer=")
        stop = None
        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**{"max_tokens": max_new_tokens, **sampling_params})
        if isinstance(sampling_params, SamplingParams):
            request = sampling_params
            max_new_tokens = request.max_tokens or max_new_tokens
            n, seed, stop = request.n, request.seed if request.seed is not None else seed, request.stop
            params = request.engine_params()
        else:
            params = sampling_params or EngineParams()
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if isinstance(sampling_params, SamplingParams):
            eos += list(sampling_params.stop_token_ids)
        with self._adapter_for(lora_request):
            completions = self.engine().generate(ids, max_new_tokens, params, n=n, eos_token_ids=eos, seed=seed)
        outputs = []
        for k, c in enumerate(completions):
            text, stopped = cut_at_stop(tokenizer.decode(c, skip_special_tokens=True), stop)
            ended = stopped or (bool(c) and c[-1] in eos)
            outputs.append(CompletionOutput(k % n, text, c, "stop" if ended else "length"))
        return [RequestOutput(o.text, prompts[k // n], outputs[(k // n) * n : (k // n + 1) * n])
                for k, o in enumerate(outputs)]

    def _adapter_for(self, lora_request):
        """A context in which the model generates as `lora_request` asks (see fast_generate)."""
        import contextlib

        from gazelle.lora.inject import adapters_disabled, lora_parameters

        if lora_request is _LIVE:
            return contextlib.nullcontext()
        if lora_request is None:
            return adapters_disabled(self)

        @contextlib.contextmanager
        def swapped():
            from gazelle.lora.peft_io import adapter_values

            pairs = adapter_values(self, lora_request.lora_path)
            saved = [p.detach().clone() for p in lora_parameters(self)]
            try:
                with torch.no_grad():
                    for target, tensor in pairs:
                        target.copy_(tensor)
                yield
            finally:
                with torch.no_grad():
                    for p, value in zip(lora_parameters(self), saved):
                        p.copy_(value)

        return swapped()

    def save_lora(self, save_directory: str | os.PathLike) -> None:
        """The LoRA adapter alone, in PEFT's format (Unsloth's name for save_pretrained of an adapter)."""
        if self.lora_config is None:
            raise GazelleError("save_lora: the model has no LoRA adapters (attach them with get_peft_model)")
        from gazelle.lora.peft_io import save_adapter

        save_adapter(self, save_directory, self.lora_config, self.name_or_path or "")

    def load_lora(self, lora_path: str | os.PathLike, load_tensors: bool = False):
        """A request to generate with a saved adapter: `fast_generate(..., lora_request=model.load_lora(path))`."""
        from gazelle.generation.requests import LoRARequest
        from gazelle.lora.peft_io import read_adapter_config

        read_adapter_config(lora_path)  # a missing or broken folder fails here, by name
        return LoRARequest(str(lora_path), os.path.basename(os.path.normpath(str(lora_path))))

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

    def save_pretrained_merged(self, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit",
                               max_shard_size: int | str = "5GB", safe_serialization: bool = True,
                               maximum_memory_usage: float = 0.75, base_weights: str | None = None,
                               **unused) -> list[str]:
        """Unsloth's save: LoRA merged into 16-bit weights ("merged_16bit"), into NF4 ("merged_4bit_forced"), or
        the adapter alone ("lora"); returns the files written (see gazelle.export.merged.save_merged)."""
        from gazelle.export.merged import save_merged

        return save_merged(self, save_directory, tokenizer, save_method, max_shard_size, safe_serialization,
                           maximum_memory_usage, base_weights)

    def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                           token: str | None = None, private: bool | None = None, **kwargs) -> str:
        """save_pretrained_merged into a hub repository (created when missing); returns its URL."""
        from gazelle.export.merged import check_save_method, push_to_hub_folder

        check_save_method(save_method)
        return push_to_hub_folder(repo_id, token, private,
                                  lambda folder: self.save_pretrained_merged(folder, tokenizer, save_method, **kwargs))

    def save_pretrained_gguf(self, save_directory: str | os.PathLike, tokenizer=None,
                             quantization_method: str | list[str] = "q8_0", system: str | None = None,
                             dynamic=None, name: str | None = None, base_weights: str | None = None,
                             **unused) -> list[str]:
        """One GGUF per quantization method and an Ollama Modelfile (FROM the first) next to them; returns the paths.

        system: the Modelfile's SYSTEM message; dynamic, name, base_weights: see gazelle.export.gguf_writer.export_gguf.
        """
        from gazelle.export.gguf_writer import export_gguf
        from gazelle.export.modelfile import write_modelfile

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        paths = export_gguf(self, tokenizer, save_directory, quantization_method, dynamic=dynamic, name=name,
                            modelfile=False, base_weights=base_weights)
        if tokenizer is None:
            return paths
        return [*paths, write_modelfile(save_directory, os.path.basename(paths[0]), tokenizer, system=system,
                                        family=self.config.family)]

    def push_to_hub_gguf(self, repo_id: str, tokenizer=None, quantization_method: str | list[str] = "q8_0",
                         token: str | None = None, private: bool | None = None, **kwargs) -> str:
        """save_pretrained_gguf into a hub repository (created when missing); returns its URL."""
        from gazelle.export.merged import push_to_hub_folder

        return push_to_hub_folder(
            repo_id, token, private, lambda folder: self.save_pretrained_gguf(folder, tokenizer, quantization_method,
                                                                              **kwargs))
