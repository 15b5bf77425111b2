"""Merged exports: LoRA folded into the base weights and written as a transformers folder (16-bit or NF4).

    save_merged(model, "out", tokenizer, save_method="merged_16bit")   # config.json + safetensors shards + tokenizer

Streaming: each output tensor is made on its own (one layer's base weight + B @ A * scaling, a 4-bit base
dequantized or read from the original checkpoint), cast, and buffered until a shard is full; the live model is
never modified. Everything goes into a temporary folder beside the target and is moved into place at the end,
so a failure (full disk, no permission) leaves no half-written model behind.

merged_entries (the merged tensors under their Hugging Face names, each made on demand) also feeds the GGUF writer.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.lora.inject import lora_modules
from gazelle.models.loading import PREFIXES, resolve, shard_files
from gazelle.models.safetensors_io import DTYPES, read_header
from gazelle.quant.linear4bit import Linear4bit
from gazelle.quant.nf4 import dequantize_nf4, nf4_to_state, quantize_nf4
from gazelle.utils.logging import get_logger

log = get_logger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit_forced", "merged_4bit", "lora")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BLOCK_LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.")
# Weight files a merged save replaces: stale ones left beside new ones would be loaded instead (a single
# model.safetensors wins over an index in transformers).
WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}
# Relative RMS difference between a weight and its NF4 round trip is about 0.1; another model's weight is ~1.4 away.
SAME_WEIGHT_TOLERANCE = 0.5


def check_save_method(save_method: str) -> str:
    """The normalised save_method ("Merged 16bit" -> "merged_16bit"); merged_4bit is refused as Unsloth does."""
    method = str(save_method).strip().lower().replace(" ", "_").replace("-", "_")
    if method not in SAVE_METHODS:
        raise GazelleError(f"save_method {save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    if method == "merged_4bit":
        raise GazelleError(
            "save_method 'merged_4bit' loses accuracy for every later export (GGUF, 16-bit) made from its output; "
            "save merged_16bit for further use, or pass save_method='merged_4bit_forced' if 4-bit is the final step"
        )
    return method


def parse_size(size: int | str, option: str = "max_shard_size") -> int:
    """Bytes from an int or a string like "5GB" (10**9, as transformers counts) or "500MiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
        if not match:
            raise GazelleError(f"{option} {size!r} is not a size like 5GB, 500MB or a number of bytes")
        value = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise GazelleError(f"{option} must be positive, got {size!r}")
    return value


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor from CPU memory (no serialized copy of the whole shard)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


class BaseWeights:
    """The 16-bit weights a 4-bit model was quantized from, read one tensor at a time from their checkpoint.

    They come from base_weights when given (then a missing or mismatched tensor is an error), else from where the
    model was loaded (then a 4-bit checkpoint, a GGUF or an unreachable hub id falls back to the dequantized
    weights, with one warning). Either way a weight that is not what the 4-bit layer was quantized from is refused.
    """

    def __init__(self, model: nn.Module, base_weights: str | os.PathLike | None):
        self.explicit = base_weights is not None
        self.origin = os.fspath(base_weights) if self.explicit else getattr(model, "name_or_path", None)
        self.index: dict[str, tuple[str, dict, int]] = {}
        self.reason: str | None = None
        self.warned = False
        try:
            if not self.origin:
                raise GazelleError("the model does not record the folder it was loaded from")
            source = resolve(self.origin)
            if source.is_gguf:
                raise GazelleError(f"{self.origin} is a GGUF file, not 16-bit safetensors")
            for shard in shard_files(source.path):
                header, data_start = read_header(shard)
                for name, info in header.items():
                    for old, new in PREFIXES:
                        name = new + name[len(old):] if name.startswith(old) else name
                    self.index[name] = (shard, info, data_start)
        except GazelleError as e:
            if self.explicit:
                raise GazelleError(f"base_weights: {e}") from None
            self.reason = str(e)

    def weight(self, name: str, layer: Linear4bit) -> torch.Tensor:
        """float32 (out, in) weight of a 4-bit layer: the original one when available, else its dequantized NF4."""
        dequantized = dequantize_nf4(layer.nf4, torch.float32)
        found = self.index.get(name)
        stored = DTYPES[found[1]["dtype"]] if found else None
        shape = (layer.out_features, layer.in_features)
        if found is None or not stored.is_floating_point or tuple(found[1]["shape"]) != shape:
            if found is None:
                problem = "lacks it"
            elif not stored.is_floating_point:
                problem = f"stores it as {found[1]['dtype']} (quantized)"
            else:
                problem = f"has it with shape {tuple(found[1]['shape'])}, this model's is {shape}"
            if self.explicit:
                raise GazelleError(f"base_weights {self.origin} is not this model's base: it {problem} ({name})")
            return self._fallback(dequantized, self.reason or f"{self.origin} {problem} ({name})")
        original = _read_tensor(*found).float().to(dequantized.device)
        rel = ((original - dequantized).norm() / original.norm().clamp(min=1e-30)).item()
        if rel > SAME_WEIGHT_TOLERANCE:
            raise GazelleError(
                f"{self.origin}: {name} is not the weight this 4-bit layer was quantized from (relative difference "
                f"{rel:.2f}); pass base_weights= the 16-bit folder of the model this one was loaded from"
            )
        return original

    def _fallback(self, dequantized: torch.Tensor, reason: str) -> torch.Tensor:
        if not self.warned:
            log.warning(f"merging onto the dequantized 4-bit weights: the original 16-bit weights are not available "
                        f"({reason}); pass base_weights= the base model's folder to merge onto those instead")
            self.warned = True
        return dequantized


def _read_tensor(path: str, info: dict, data_start: int) -> torch.Tensor:
    tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    with open(path, "rb") as f:
        f.seek(data_start + info["data_offsets"][0])
        if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != tensor.nbytes:
            raise GazelleError(f"{path} ends inside tensor data: the file is truncated")
    return tensor


@dataclass
class Entry:
    """One tensor of the merged checkpoint, made on demand."""

    name: str
    make: Callable[[], torch.Tensor]
    layer: nn.Module | None = None
    """The base linear layer when this is a decoder-block linear weight (what 4-bit exports quantize)."""
    adapted: bool = False


def merged_entries(model: nn.Module, base_weights: str | os.PathLike | None = None) -> tuple[list[Entry], bool]:
    """(the merged checkpoint's tensors under their Hugging Face names, in state-dict order; whether a tied
    embedding/lm_head pair had to be untied because LoRA changed one of them).

    Weights of adapted or 4-bit layers are made in float32; every other tensor is the live one.
    """
    wrappers = dict(lora_modules(model))
    tied = model.config.tie_word_embeddings
    untie = tied and ("lm_head" in wrappers or "model.embed_tokens" in wrappers)
    bases = None
    entries, seen = [], set()
    for key, value in model.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        name = ".".join(p for p in parts if p != "base_layer")
        if ".weight." in name:
            continue  # a 4-bit layer's statistics (weight.absmax, ...): its weight stands for them
        owner, _, leaf = name.rpartition(".")
        if name in seen or (tied and not untie and name == "lm_head.weight"):
            continue
        seen.add(name)
        wrapper = wrappers.get(owner)
        base = wrapper.base_layer if wrapper is not None else model.get_submodule(owner)
        if leaf != "weight":
            entries.append(Entry(name, lambda v=value: v.detach()))
            continue
        if isinstance(base, Linear4bit) and bases is None:
            bases = BaseWeights(model, base_weights)
        block_linear = isinstance(base, (nn.Linear, Linear4bit)) and BLOCK_LINEAR.search(name)
        entries.append(Entry(name, _maker(name, base, wrapper, bases), base if block_linear else None,
                             adapted=wrapper is not None))
    return entries, untie


def _maker(name: str, base: nn.Module, wrapper: nn.Module | None, bases: BaseWeights | None) \
        -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        if isinstance(base, Linear4bit):
            weight = bases.weight(name, base)
        elif wrapper is not None:
            weight = base.weight.detach().float()
        else:
            return base.weight.detach()
        if wrapper is not None:
            weight = weight + wrapper.delta_weight().to(weight.device)
        return weight

    return make


def save_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    maximum_memory_usage: float = 0.75,
    base_weights: str | os.PathLike | None = None,
) -> list[str]:
    """Write the model with its LoRA merged (or the adapter alone, save_method="lora") to `directory`; returns the
    files written.

    merged_16bit: config.json, model*.safetensors (+ index when sharded), generation_config.json, tokenizer files,
    in the model's dtype (a float32 model stays float32). merged_4bit_forced: the same with the decoder-block linear
    weights in bitsandbytes' NF4 layout and a quantization_config transformers reads. merged_4bit is refused
    (Unsloth's convention: it suits only a final save). base_weights: the 16-bit folder a 4-bit model was quantized
    from, when it is not the folder it was loaded from. maximum_memory_usage caps the shard buffer at that fraction
    of the available memory.
    """
    method = check_save_method(save_method)
    shard_bytes = parse_size(max_shard_size)
    if not 0 < maximum_memory_usage <= 0.95:
        raise GazelleError(f"maximum_memory_usage must be in (0, 0.95], got {maximum_memory_usage!r}")
    if not safe_serialization:
        log.info("safe_serialization=False is ignored: gazelle writes safetensors only (pickle files can run code)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if method == "lora" and getattr(model, "lora_config", None) is None:
        raise GazelleError("save_method='lora' needs LoRA adapters and this model has none; attach them with "
                           "get_peft_model, or save a merged model")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise GazelleError(f"{directory} exists and is not a folder; choose another output folder")
    if method != "lora" and os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise GazelleError(f"{directory} holds a LoRA adapter (adapter_config.json), so the merged model would load as "
                           "base + adapter (applied twice); save the merged model to another folder")

    def write(tmp: str) -> None:
        if method == "lora":
            from gazelle.lora.peft_io import save_adapter

            save_adapter(model, tmp, model.lora_config, model.name_or_path or "")
        else:
            budget = _available_memory()
            limit = min(shard_bytes, int(budget * maximum_memory_usage)) if budget else shard_bytes
            _write_checkpoint(model, tmp, method == "merged_4bit_forced", limit, base_weights)
            _write_json(os.path.join(tmp, "generation_config.json"), generation_config(model, tokenizer))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("no tokenizer given: the folder has no tokenizer files (pass tokenizer=)")

    paths = write_atomically(directory, write, replaces=WEIGHT_FILE if method != "lora" else None)
    log.info(f"saved {method} to {directory} ({len(paths)} files)")
    return paths


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _write_checkpoint(model: nn.Module, folder: str, four_bit: bool, shard_limit: int,
                      base_weights: str | os.PathLike | None) -> None:
    """model*.safetensors (+ index) and config.json of the merged model, one tensor made at a time."""
    dtype = model.dtype
    entries, untied = merged_entries(model, base_weights)
    skip = tuple((model.config.hf_config.get("quantization_config") or {}).get("llm_int8_skip_modules") or ())
    blocksize, double_quant = _nf4_settings(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal size, total
        if size and size + tensor.nbytes > shard_limit:
            write_safetensors(os.path.join(folder, f"part-{len(shards):05d}.safetensors"), shards[-1])
            shards[-1] = dict.fromkeys(shards[-1])  # keep the names for the index, drop the data
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += tensor.nbytes
        total += tensor.nbytes

    with torch.no_grad():
        for entry in entries:
            quantize = four_bit and entry.layer is not None and not any(s in entry.name for s in skip)
            if quantize and isinstance(entry.layer, Linear4bit) and not entry.adapted:
                state = nf4_to_state(entry.layer.nf4)  # already NF4 and unchanged: copied exactly
            elif quantize:
                state = nf4_to_state(quantize_nf4(entry.make().to(dtype), blocksize, double_quant))
            else:
                tensor = entry.make()
                add(entry.name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                continue
            layer = entry.name.removesuffix(".weight")
            for suffix, tensor in state.items():
                add(f"{layer}.{suffix}", tensor)
    write_safetensors(os.path.join(folder, f"part-{len(shards):05d}.safetensors"), shards[-1])

    count, weight_map = len(shards), {}
    for i, shard in enumerate(shards, 1):
        final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(os.path.join(folder, f"part-{i:05d}.safetensors"), os.path.join(folder, final))
        weight_map.update(dict.fromkeys(shard, final))
    if count > 1:
        _write_json(os.path.join(folder, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    quantization = ({"blocksize": blocksize, "double_quant": double_quant, "skip": list(skip) or None}
                    if four_bit else None)
    _write_json(os.path.join(folder, "config.json"), hf_config_for(model, dtype, untied, quantization))


def _nf4_settings(model: nn.Module) -> tuple[int, bool]:
    """Blocksize and double quantization of the model's own 4-bit layers, else bitsandbytes' defaults."""
    layer = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    return (64, True) if layer is None else (layer.blocksize, layer.nested_absmax is not None)


def hf_config_for(model: nn.Module, dtype: torch.dtype, untied: bool, quantization: dict | None = None) -> dict:
    """The model's transformers config for the merged checkpoint: dtype set, quantization_config only for NF4."""
    hf = copy.deepcopy(model.config.hf_config)
    hf.pop("quantization_config", None)
    hf["model_type"] = model.config.family
    hf["architectures"] = [ARCHITECTURES[model.config.family]]
    dtype_name = str(dtype).removeprefix("torch.")
    hf["dtype"] = hf["torch_dtype"] = dtype_name  # transformers 5 reads dtype, earlier releases and vLLM torch_dtype
    hf["tie_word_embeddings"] = model.config.tie_word_embeddings and not untied
    if quantization is not None:
        hf["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": quantization["double_quant"],
            "bnb_4bit_compute_dtype": dtype_name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": quantization["skip"], "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        }
    return hf


def generation_config(model: nn.Module, tokenizer=None) -> dict:
    """generation_config.json: the source folder's (sampling defaults kept), with bos/eos/pad as trained.

    The tokenizer's eos (an end-of-turn token a chat template may have set) joins the config's eos ids.
    """
    gen: dict = {}
    source = getattr(model, "name_or_path", None)
    path = os.path.join(source, "generation_config.json") if source and os.path.isdir(source) else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                gen = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise GazelleError(f"{path} is not readable JSON ({e}); fix or delete it, then save again") from None
    config = model.config
    eos = gen.get("eos_token_id", config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    ids = {
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
    }
    for key, value in ids.items():
        gen[key] = value if value is not None else gen.get(key, getattr(config, key))
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return {k: v for k, v in gen.items() if v is not None}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_atomically(directory: str, write: Callable[[str], None], replaces: re.Pattern | None = None) -> list[str]:
    """Run write(temporary folder beside `directory`), then move the result into place; returns the final paths.

    A missing or empty `directory` is replaced by the temporary folder in one rename. Into an existing folder each
    file is moved whole (os.replace), then files matching `replaces` that were not written are removed. On any
    failure the temporary folder is deleted and the target is left as it was.
    """
    parent, base = os.path.split(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise GazelleError(f"cannot write to {parent}: {e.strerror or e}") from None
    moved = 0
    try:
        write(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n.endswith(".json"), n))  # configs and the index last
        if not os.path.isdir(directory) or not os.listdir(directory):
            os.replace(tmp, directory)
            moved = len(names)
        else:
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
                moved += 1
            for name in os.listdir(directory):
                if replaces is not None and replaces.match(name) and name not in names:
                    os.remove(os.path.join(directory, name))
        return [os.path.join(directory, name) for name in names]
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        state = "nothing was written" if not moved else f"{moved} files were replaced before the failure"
        raise GazelleError(f"saving to {directory} failed: {reason}; {state}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_to_hub_folder(repo_id: str, token: str | None, private: bool | None, write: Callable[[str], list[str]]) -> str:
    """Create (or reuse) the hub repository, write(folder) into a temporary folder and upload it; returns its URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)

    def unreachable(e: Exception) -> GazelleError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return GazelleError(f"cannot push to the Hugging Face hub repository {repo_id} ({reason}); save to a folder "
                            "and upload it from a connected machine (huggingface-cli upload)")

    # create_repo first: an unreachable hub fails before the merge does any work. The network stack raises
    # its own error types (httpx's, OSError, HfHubHTTPError), all meaning "cannot push": hence the broad catch.
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
    except Exception as e:  # noqa: BLE001
        raise unreachable(e) from None
    with tempfile.TemporaryDirectory() as folder:
        write(folder)
        try:
            api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload model trained with gazelle")
        except Exception as e:  # noqa: BLE001
            raise unreachable(e) from None
    return str(url)
