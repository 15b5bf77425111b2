"""gazelle sft [CONFIG.yaml] [section.field=value ...]: supervised fine-tuning with LoRA, QLoRA or full weights.

Without a config file the defaults run: the embedded SmolLM2 on the example facts shipped with gazelle.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from gazelle.cli.common import DTYPES, model_path
from gazelle.cli.config import load_config, section, to_yaml
from gazelle.errors import GazelleError
from gazelle.trainers.sft import SFTConfig

HELP = "supervised fine-tuning from a YAML config"
EXAMPLE_DATA = os.path.join(os.path.dirname(__file__), "..", "assets", "facts.jsonl")


@dataclass
class ModelSection:
    name: str | None = None
    """A model folder, hub id or .gguf file; empty: the embedded SmolLM2-135M-Instruct."""
    max_seq_length: int = 1024
    load_in_4bit: bool = False
    """QLoRA: NF4 base weights for the decoder blocks."""
    dtype: str | None = None
    """float32, bfloat16 or float16; empty: bf16 on a GPU that has it, fp32 on the CPU."""
    full_finetuning: bool = False
    """Train every weight instead of LoRA adapters."""


@dataclass
class LoraSection:
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names, or all-linear."""
    bias: str = "none"
    use_rslora: bool = False
    use_gradient_checkpointing: bool | str = True
    """true recomputes layers in backward; unsloth also offloads saved inputs to CPU on a GPU."""
    random_state: int = 3407


@dataclass
class DataSection:
    path: str | None = None
    """A local .json, .jsonl, .csv or .parquet file; empty: gazelle's example facts."""
    format: str = "auto"
    """auto, text (a text column), conversations (messages / ShareGPT conversations) or alpaca."""
    text_field: str = "text"
    chat_template: str | None = None
    """A gazelle chat template name (chatml, llama-3, gemma, ...); empty: the tokenizer's own."""
    train_on_responses_only: bool = False
    """Train only on assistant turns; needs instruction_part and response_part."""
    instruction_part: str | None = None
    response_part: str | None = None


@dataclass
class SFTRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: SFTConfig = section(SFTConfig, output_dir="outputs/sft", max_steps=60)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (sections: model, lora, data, train)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.learning_rate=1e-4")


def prepare_rows(cfg: DataSection, tokenizer) -> list[dict]:
    from gazelle.data.chat_templates import get_chat_template, standardize_sharegpt
    from gazelle.data.formats import format_alpaca, load_dataset_file

    rows = [dict(r) for r in load_dataset_file(cfg.path or os.path.abspath(EXAMPLE_DATA))]
    if not rows:
        raise GazelleError(f"{cfg.path} holds no rows")
    if cfg.chat_template:
        get_chat_template(tokenizer, cfg.chat_template)
    kind = cfg.format
    if kind == "auto":
        columns = rows[0].keys()
        kind = ("conversations" if {"messages", "conversations"} & set(columns)
                else "alpaca" if {"instruction", "output"} <= set(columns) else "text")
    if kind == "alpaca":
        return [{"text": format_alpaca(r, tokenizer.eos_token)} for r in rows]
    if kind == "conversations":
        if "conversations" in rows[0]:
            rows = [{"messages": r["conversations"]} for r in standardize_sharegpt(rows)]
        return rows
    if kind == "text":
        return rows
    raise GazelleError(f"data.format {cfg.format!r} is not one of auto, text, conversations, alpaca")


def read_config(cls, args: argparse.Namespace):
    """The run config of a verb from its CONFIG.yaml (optional) and section.field=value overrides."""
    config_file, overrides = args.config, list(args.overrides)
    if config_file and "=" in config_file and not os.path.isfile(config_file):  # only overrides were given
        config_file, overrides = None, [config_file, *overrides]
    cfg = load_config(cls, config_file, overrides)
    if cfg.model.dtype is not None and cfg.model.dtype not in DTYPES:
        raise GazelleError(f"model.dtype {cfg.model.dtype!r} is not one of {', '.join(DTYPES)}")
    return cfg


def load_with_lora(model_cfg: ModelSection, lora: LoraSection):
    """(model, tokenizer) as the model section says, with LoRA attached unless it asks for full fine-tuning."""
    from gazelle.fast import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_path(model_cfg.name), max_seq_length=model_cfg.max_seq_length,
        dtype=DTYPES.get(model_cfg.dtype or ""), load_in_4bit=model_cfg.load_in_4bit,
        full_finetuning=model_cfg.full_finetuning)
    if not model_cfg.full_finetuning:
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=lora.target_modules, lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout, bias=lora.bias, use_rslora=lora.use_rslora,
            use_gradient_checkpointing=lora.use_gradient_checkpointing, random_state=lora.random_state)
    return model, tokenizer


def run(args: argparse.Namespace) -> None:
    from gazelle.trainers.sft import SFTTrainer

    cfg = read_config(SFTRunConfig, args)
    model, tokenizer = load_with_lora(cfg.model, cfg.lora)
    rows = prepare_rows(cfg.data, tokenizer)
    train_args = cfg.train
    if train_args.max_seq_length is None:
        train_args.max_seq_length = cfg.model.max_seq_length
    trainer = SFTTrainer(model, tokenizer, rows, train_args, dataset_text_field=cfg.data.text_field)
    if cfg.data.train_on_responses_only:
        from gazelle.data.chat_templates import train_on_responses_only

        if not (cfg.data.instruction_part and cfg.data.response_part):
            raise GazelleError("data.train_on_responses_only needs data.instruction_part and data.response_part")
        train_on_responses_only(trainer, cfg.data.instruction_part, cfg.data.response_part)
    os.makedirs(train_args.output_dir, exist_ok=True)
    with open(os.path.join(train_args.output_dir, "run.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    trainer.train()
    final = os.path.join(train_args.output_dir, "final")
    model.save_pretrained(final, tokenizer=tokenizer)
    print(f"saved {'model' if cfg.model.full_finetuning else 'adapter'} to {final}")
