"""Loading a model: a Hugging Face folder, a hub id, or a GGUF file -> Decoder (+ tokenizer).

The Decoder is built on the meta device and each checkpoint tensor is read straight into its final
dtype and device, one at a time, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

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
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Decoder(config)
    if source.is_gguf:
        from gazelle.models.gguf_file import iter_gguf_tensors

        tensors = iter_gguf_tensors(source.path, config.hf_config, dtype, device)
        prequantized: set[str] = set()
    else:
        shards = shard_files(source.path)
        prequantized = prequantized_modules(shards)
        # bitsandbytes' packed codes and float32 block statistics must reach the 4-bit layer as stored.
        tensors = (item for shard in shards
                   for item in iter_safetensors(shard, dtype, device, keep_dtype=lambda n: ".weight." in n))
    plan = FourBitPlan(quantize=load_in_4bit, prequantized=prequantized, compute_dtype=dtype,
                       skip=tuple(config.hf_config.get("quantization_config", {}).get("llm_int8_skip_modules") or ())
                       + ("lm_head",))
    assign_tensors(model, tensors, source.path, plan)
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


def prequantized_modules(shards: list[str]) -> set[str]:
    """Names of the layers a bitsandbytes 4-bit checkpoint stores quantized (read from the headers only)."""
    from gazelle.models.safetensors_io import read_header

    marker = ".weight.quant_state.bitsandbytes__"
    return {name.partition(marker)[0] for shard in shards for name in read_header(shard)[0] if marker in name}


@dataclass
class FourBitPlan:
    """How linear layers become NF4 while loading."""

    quantize: bool = False
    """Quantize 16/32-bit linear weights of the decoder blocks as they arrive (QLoRA)."""
    prequantized: set = field(default_factory=set)
    """Layers the checkpoint already stores in bitsandbytes' NF4 layout."""
    compute_dtype: torch.dtype = torch.bfloat16
    skip: tuple[str, ...] = ("lm_head",)

    def owner(self, name: str) -> str | None:
        """The pre-quantized layer a tensor name belongs to (its weight, statistics or bias), if any."""
        layer = name.rsplit(".weight", 1)[0] if ".weight" in name else name.rpartition(".")[0]
        return layer if layer in self.prequantized else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _finish_prequantized(model: Decoder, pending: dict[str, dict], plan: FourBitPlan) -> None:
    from gazelle.quant.linear4bit import Linear4bit

    for layer, state in pending.items():
        shell = model.get_submodule(layer)
        bias = state.pop("bias", None)
        quantized = Linear4bit.from_state(state, shell.in_features, shell.out_features, bias, plan.compute_dtype,
                                          prefix=layer + ".")
        if plan.quantize:
            _replace(model, layer, quantized)
        else:  # a 4-bit checkpoint asked for in 16-bit: dequantize it once
            linear = nn.Linear(shell.in_features, shell.out_features, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(quantized.dequantized_weight().to(plan.compute_dtype))
            if bias is not None:
                linear.bias = nn.Parameter(bias)
            _replace(model, layer, linear)


def _quantize_when_complete(model: Decoder, name: str, plan: FourBitPlan) -> None:
    """Once a decoder-block linear layer has all its tensors, swap it for its NF4 form (frees the 16-bit one)."""
    from gazelle.quant.linear4bit import Linear4bit

    layer = name.rpartition(".")[0]
    module = model.get_submodule(layer)
    if (not isinstance(module, nn.Linear) or ".layers." not in f".{layer}" or any(s in layer for s in plan.skip)
            or any(p.is_meta for p in module.parameters())):
        return
    _replace(model, layer, Linear4bit.from_linear(module, plan.compute_dtype))


def assign_tensors(model: Decoder, tensors: Iterator[tuple[str, torch.Tensor]], source: str,
                   plan: FourBitPlan | None = None) -> None:
    """Put each (HF name, tensor) into the meta-built model, checking names and shapes; then tie."""
    plan = plan or FourBitPlan()
    expected = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    pending: dict[str, dict] = {}
    for name, tensor in tensors:
        for old, new in PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
        if IGNORED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if (layer := plan.owner(name)) is not None:
            pending.setdefault(layer, {})[name[len(layer) + 1:]] = tensor
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
        if plan.quantize:
            _quantize_when_complete(model, name, plan)
    _finish_prequantized(model, pending, plan)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise GazelleError(f"{source}: checkpoint lacks {shown}")


def load_tokenizer(name_or_path: str | os.PathLike | ModelSource, token: str | None = None):
    """The model's tokenizer through transformers, chat template kept, a pad token always set."""
    from transformers import AutoTokenizer

    if isinstance(name_or_path, ModelSource):
        source = name_or_path
    elif os.path.isfile(os.path.join(os.fspath(name_or_path), "tokenizer_config.json")):
        source = ModelSource(os.fspath(name_or_path), is_gguf=False)  # tokenizer files alone (an adapter folder)
    else:
        source = resolve(name_or_path, token)
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
