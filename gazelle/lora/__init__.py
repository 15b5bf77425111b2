"""LoRA for gazelle's Decoder, in PEFT's in-memory naming and file format."""

from gazelle.lora.inject import adapters_disabled, inject_lora, lora_parameters, merge_lora, remove_lora, trainable_summary
from gazelle.lora.layers import LoraConfig, LoraEmbedding, LoraLinear
from gazelle.lora.peft_io import load_adapter, read_adapter_config, save_adapter

__all__ = [
    "LoraConfig", "LoraEmbedding", "LoraLinear", "adapters_disabled", "inject_lora", "load_adapter", "lora_parameters", "merge_lora",
    "read_adapter_config", "remove_lora", "save_adapter", "trainable_summary",
]
