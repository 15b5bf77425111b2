"""Loading a model: a Hugging Face folder, a hub id, or a GGUF file -> Decoder (+ tokenizer).

The Decoder is built on the meta device and each checkpoint tensor is read straight into its final
dtype and device, one at a time, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.models.config import DecoderConfig, from_hf_config
from gazelle.models.decoder import Decoder
from gazelle.models.safetensors_io import iter_safetensors

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
# Tensors some checkpoints carry that the Decoder recomputes or does not use.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|vision_tower\.|multi_modal_projector\.)")
# The language model inside a multimodal gemma3 checkpoint, under either naming transformers used.
PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives once resolved: a local folder, or a GGUF file."""

    path: str
    is_gguf: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))


def resolve(name_or_path: str | os.PathLike, token: str | None = None) -> ModelSource:
    """A folder, a .gguf file, or a hub id (downloaded when online) -> ModelSource."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise GazelleError(
                f"{path} has no config.json: a model folder is what transformers' save_pretrained writes "
                "(config.json + *.safetensors), or pass a .gguf file"
            )
        return ModelSource(path, is_gguf=False)
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise GazelleError(f"GGUF file {path} not found")
        return ModelSource(path, is_gguf=True)
    if os.path.exists(path):
        raise GazelleError(f"{path} is neither a model folder nor a .gguf file")
    if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise GazelleError(f"{path} not found: pass a model folder, a .gguf file or a hub id like 'org/name'")
    return ModelSource(_download(path, token), is_gguf=False)


def _download(repo_id: str, token: str | None) -> str:
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, token=token)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise GazelleError(f"hub repository {repo_id} not found (or it is gated: pass token=...)") from None
    except (huggingface_hub.errors.LocalEntryNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0]
        raise GazelleError(
            f"cannot download {repo_id} from the Hugging Face hub (offline? {reason}); "
            "pass a local model folder or a .gguf file instead"
        ) from None


def load_config(source: ModelSource) -> DecoderConfig:
    if source.is_gguf:
        from gazelle.models.gguf_file import read_gguf_config

        return from_hf_config(read_gguf_config(source.path))
    return from_hf_config(source.path)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older ones, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    token: str | None = None,
    load_in_4bit: bool = False,
) -> Decoder:
    """A Decoder with the checkpoint's weights in `dtype` (default: default_dtype) on `device`.

    load_in_4bit quantizes the linear layers of the decoder blocks to NF4 as they load (embeddings and
    lm_head stay in `dtype`); a bitsandbytes 4-bit checkpoint loads as it is stored.
    """
    source = resolve(name_or_path, token)
    config = load_config(source)
    if load_in_4bit:
        raise GazelleError("load_in_4bit is not available yet")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Decoder(config)
    if source.is_gguf:
        from gazelle.models.gguf_file import iter_gguf_tensors

        tensors = iter_gguf_tensors(source.path, config.hf_config, dtype, device)
    else:
        tensors = (item for shard in shard_files(source.path) for item in iter_safetensors(shard, dtype, device))
    assign_tensors(model, tensors, source.path)
    model.name_or_path = os.fspath(name_or_path)
    return model.eval()


def shard_files(folder: str) -> list[str]:
    """The safetensors files of a folder: the index's shards in order, or the single model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GazelleError(f"{index} is not a valid safetensors index ({e!r})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise GazelleError(f"{index} lists shard {missing[0]}, which is not in {folder}")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise GazelleError(
        f"{folder} has no model.safetensors or model.safetensors.index.json (pickle .bin checkpoints are "
        "not loaded: they can run code; re-save the model with safe_serialization)"
    )


def assign_tensors(model: Decoder, tensors: Iterator[tuple[str, torch.Tensor]], source: str) -> None:
    """Put each (HF name, tensor) into the meta-built model, checking names and shapes; then tie."""
    expected = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    for name, tensor in tensors:
        for old, new in PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
        if IGNORED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise GazelleError(
                f"{source}: tensor {name} has no place in a {model.config.family} decoder "
                "(does config.json match these weights?)"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GazelleError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}"
            )
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor))
        expected[name] = model.get_parameter(name)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise GazelleError(f"{source}: checkpoint lacks {shown}")


def load_tokenizer(name_or_path: str | os.PathLike | ModelSource, token: str | None = None):
    """The model's tokenizer through transformers, chat template kept, a pad token always set."""
    from transformers import AutoTokenizer

    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve(name_or_path, token)
    if source.is_gguf:
        from gazelle.models.gguf_file import gguf_chat_template

        folder, filename = os.path.split(os.path.abspath(source.path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = gguf_chat_template(source.path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        # Reuse an existing token rather than grow the vocabulary: padding is masked everywhere anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         token: str | None = None):
    """(model, tokenizer) from one resolved source."""
    source = resolve(name_or_path, token)
    model = load_model(source.path, dtype, device, token)
    model.name_or_path = os.fspath(name_or_path)  # the hub id, not the download cache, goes into adapters
    return model, load_tokenizer(source)
