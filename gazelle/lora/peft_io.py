"""Adapters in PEFT's file format: adapter_config.json + adapter_model.safetensors.

A key in the file is `base_model.model.` + the in-model name (PEFT drops its adapter name, "default", on
save), e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; gazelle's modules already use
these names, so saving and loading is a prefix away. Trained biases are saved under their in-model names
too (`...q_proj.base_layer.bias` for a wrapped layer, `...k_proj.bias` for another), as PEFT does.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import save
from torch import nn

from gazelle.errors import GazelleError
from gazelle.lora.inject import inject_lora, lora_modules, remove_lora, target_names
from gazelle.lora.layers import LoraConfig
from gazelle.models.safetensors_io import iter_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options with no gazelle counterpart, all off when falsy: an adapter using one would load wrong, so it is refused.
UNSUPPORTED = (
    "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layer_replication",
    "target_parameters", "exclude_modules", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
    "arrow_config", "use_bdlora", "megatron_config",
)


def adapter_tensors(model: nn.Module, bias: str) -> dict[str, torch.Tensor]:
    """In-model name -> tensor of everything an adapter file holds: LoRA weights and, per `bias`, trained biases."""
    out = {}
    for wrapper, module in lora_modules(model):
        out.update((f"{wrapper}.{n}", p) for n, p in module.named_parameters() if not n.startswith("base_layer."))
        if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
            out[f"{wrapper}.base_layer.bias"] = module.base_layer.bias
    if bias == "all":
        out.update((n, p) for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias")
    return out


def adapter_config_dict(config: LoraConfig, target_modules: list[str] | str, base_model_name_or_path: str | None) \
        -> dict:
    """The fields PEFT writes for a LoRA adapter (those a reader needs; PEFT fills the rest with its defaults)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": config.init_lora_weights,
        "layers_pattern": None,
        "layers_to_transform": config.layers_to_transform,
        "loftq_config": {},
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": config.use_rslora,
    }


def _write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, config: LoraConfig, base_model_name_or_path: str | None
) -> None:
    """Write the model's adapter where PEFT's PeftModel.from_pretrained (and load_adapter) can read it."""
    modules = lora_modules(model)
    if not modules:
        raise GazelleError("this model has no LoRA adapters to save; call inject_lora (or load_adapter) first")
    for name, module in modules:
        if module.r != config.r or module.scaling != config.scaling:
            raise GazelleError(
                f"{name} has r={module.r}, lora_alpha={module.lora_alpha} but the config says r={config.r}, "
                f"lora_alpha={config.lora_alpha}; pass the LoraConfig the adapters were injected with"
            )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {PREFIX + n: p.detach().to("cpu").contiguous() for n, p in adapter_tensors(model, config.bias).items()}
    # A regex stays a regex (PEFT matches it the same way); names are written as the leaf names actually wrapped.
    regex = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
    targets = config.target_modules if regex else target_names(model)
    # Weights first, config last: a folder whose config is missing is not an adapter to any reader.
    _write_atomically(os.path.join(directory, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    text = json.dumps(adapter_config_dict(config, targets, base_model_name_or_path), indent=2, sort_keys=True)
    _write_atomically(os.path.join(directory, CONFIG_NAME), (text + "\n").encode())


def _required_file(directory: str | os.PathLike, name: str) -> str:
    path = os.path.join(os.fspath(directory), name)
    if os.path.isfile(path):
        return path
    if name == WEIGHTS_NAME and os.path.isfile(os.path.join(os.fspath(directory), "adapter_model.bin")):
        raise GazelleError(
            f"{directory} holds a pickle adapter_model.bin, which is not loaded (it can run code); "
            "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True)"
        )
    raise GazelleError(
        f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, as PEFT's save_pretrained writes"
    )


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, str | None]:
    """(LoraConfig, base_model_name_or_path) from a PEFT adapter folder."""
    path = _required_file(directory, CONFIG_NAME)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GazelleError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise GazelleError(f"{path} is not a JSON object; re-save the adapter with PEFT's save_pretrained")
    if raw.get("peft_type", "LORA") != "LORA":
        raise GazelleError(f"{path} is a {raw['peft_type']} adapter; gazelle loads LoRA adapters only")
    for key in UNSUPPORTED:
        if raw.get(key):
            raise GazelleError(
                f"{path} sets {key}={raw[key]!r}, which gazelle does not support; train a plain LoRA adapter"
            )
    if raw.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise GazelleError(
            f"{path} sets layers_pattern={raw['layers_pattern']!r}; gazelle's decoder layers are named 'layers'"
        )
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "layers_to_transform",
              "modules_to_save", "init_lora_weights", "loftq_config")
    kwargs = {k: raw[k] for k in fields if raw.get(k) is not None}
    if "target_modules" not in kwargs:
        raise GazelleError(f"{path} has no target_modules; gazelle cannot tell which layers the adapter wraps")
    try:
        # init_lora_weights is checked too: PiSSA, OLoRA, LoftQ... inits rewrite the base weights at injection,
        # and their adapters are wrong on an unmodified base.
        return LoraConfig(**kwargs), raw.get("base_model_name_or_path")
    except GazelleError as e:
        raise GazelleError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject LoRA as the adapter's config says and load its tensors; returns the model (modified in place)."""
    config, _ = read_adapter_config(directory)
    weights_path = _required_file(directory, WEIGHTS_NAME)
    # float32 like the LoRA parameters; copy_ casts anything else (biases, tables) to its parameter's dtype.
    tensors = dict(iter_safetensors(weights_path, torch.float32))
    inject_lora(model, config)
    try:
        pairs = _match_tensors(model, config, tensors, weights_path)
    except GazelleError:
        remove_lora(model)  # leave the model as it came rather than half-adapted
        raise
    with torch.no_grad():
        for target, tensor in pairs:
            target.copy_(tensor)
    return model


def adapter_values(model: nn.Module, directory: str | os.PathLike) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(adapter parameter, saved value) pairs of a saved adapter that fits the model's injected one."""
    config, _ = read_adapter_config(directory)
    if model.lora_config is None:
        raise GazelleError(f"{directory}: the model has no LoRA adapters to load these values into")
    weights_path = _required_file(directory, WEIGHTS_NAME)
    return _match_tensors(model, config, dict(iter_safetensors(weights_path, torch.float32)), weights_path)


def _match_tensors(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path: str):
    """(model parameter, file tensor) pairs, after checking that every name and shape fits the injected model."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head has its own key
    expected = adapter_tensors(model, config.bias)
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    pairs = []
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        # PEFT may also save whole embedding/lm_head tables (its save_embedding_layers): any model parameter
        # is accepted and overwritten, as PEFT does.
        target = params.get(name)
        if target is None:
            raise GazelleError(
                f"adapter tensor {key} has no place in this {family} model: the adapter belongs to another model"
            )
        if tensor.shape != target.shape:
            raise GazelleError(
                f"adapter tensor {key} has shape {tuple(tensor.shape)} but this {family} model's {name} is "
                f"{tuple(target.shape)}: the adapter belongs to another model"
            )
        pairs.append((target, tensor))
        expected.pop(name, None)
    if expected:
        first = next(iter(expected))
        more = f" and {len(expected) - 1} more" if len(expected) > 1 else ""
        raise GazelleError(f"{path} lacks {PREFIX}{first}{more}: the adapter belongs to another model or is incomplete")
    return pairs
