"""FastLanguageModel: the notebook-facing entry point, call-compatible with Unsloth's published notebooks.

    model, tokenizer = FastLanguageModel.from_pretrained("path/or/hub-id", max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=[...], lora_alpha=16)
"""

from __future__ import annotations

import os

import torch

from gazelle.errors import GazelleError
from gazelle.lora import LoraConfig, inject_lora, load_adapter, read_adapter_config, trainable_summary
from gazelle.models.loading import default_dtype, load_model, load_tokenizer, resolve
from gazelle.utils.logging import get_logger

log = get_logger(__name__)


def is_bfloat16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _device(device_map) -> torch.device:
    if isinstance(device_map, dict):  # {"": 0} style
        device_map = next(iter(device_map.values()), "auto")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in (None, "auto", "sequential", "balanced"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def _is_adapter(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def PatchFastRL(algorithm: str | None = None, FastLanguageModel=None) -> None:  # noqa: N802 - Unsloth's name
    """Accepted for notebooks that call it: gazelle patches nothing; its trainers are fast as they are."""


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map="auto",
        trust_remote_code: bool = False,
        fast_inference: bool = False,
        **unused,
    ):
        """(model, tokenizer) from a folder, a hub id, a .gguf file, or a saved LoRA adapter folder.

        An adapter folder loads its base model (base_model_name_or_path in adapter_config.json) and then the
        adapter. dtype None means bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU.
        """
        if load_in_8bit:
            raise GazelleError("load_in_8bit is not supported; use load_in_4bit=True (QLoRA) or 16-bit")
        if trust_remote_code:
            log.info("trust_remote_code is ignored: gazelle runs its own model code, never the repository's")
        if fast_inference:
            log.info("fast_inference: gazelle generates with its own engine; no vLLM is started")
        device = _device(device_map)
        dtype = dtype or default_dtype(device)
        adapter_dir = None
        if _is_adapter(str(model_name)):
            adapter_dir = str(model_name)
            _, base = read_adapter_config(adapter_dir)
            if not base:
                raise GazelleError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; "
                                   "load the base model and then the adapter with load_adapter")
            model_name = base
        source = resolve(model_name, token)
        model = load_model(source.path, dtype=dtype, device=device, load_in_4bit=load_in_4bit)
        model.name_or_path = str(model_name)
        model.max_seq_length = max_seq_length
        has_own = adapter_dir is not None and os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
        tokenizer = load_tokenizer(adapter_dir if has_own else source)
        tokenizer.model_max_length = max_seq_length
        model.tokenizer = tokenizer  # for fast_generate
        if adapter_dir is not None:
            load_adapter(model, adapter_dir)
            model.lora_config, _ = read_adapter_config(adapter_dir)
        if full_finetuning:
            if load_in_4bit:
                raise GazelleError("full_finetuning cannot train 4-bit weights; set load_in_4bit=False")
            model.requires_grad_(True)
        elif adapter_dir is None:  # frozen until get_peft_model attaches adapters
            model.requires_grad_(False)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config=None,
        max_seq_length: int | None = None,
        layers_to_transform: list[int] | None = None,
        modules_to_save=None,
        init_lora_weights: bool = True,
        **unused,
    ):
        """Attach LoRA adapters (PEFT's semantics and names); only they (and chosen biases) train."""
        targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
        if model.config.fused_qkv and isinstance(targets, list):  # phi3 names its fused projections
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                     "up_proj": "gate_up_proj"}
            targets = list(dict.fromkeys(fused.get(t, t) for t in targets))
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
                            use_rslora=use_rslora, layers_to_transform=layers_to_transform,
                            modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
                            random_state=random_state, loftq_config=loftq_config)
        inject_lora(model, config)
        model.lora_config = config
        model.gradient_checkpointing = bool(use_gradient_checkpointing)
        model.checkpoint_offload = use_gradient_checkpointing == "unsloth"
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        log.info(trainable_summary(model))
        return model

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        model.train()
        model.gradient_checkpointing = bool(use_gradient_checkpointing)
        return model
