"""TrainingArguments: the optimisation, schedule, logging and saving fields every trainer shares.

Field names are the ones Hugging Face / TRL users already write; each is documented once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gazelle.errors import GazelleError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_8bit", "paged_adamw_8bit")


@dataclass
class TrainingArguments:
    output_dir: str = "outputs"
    """Where checkpoints, metrics.jsonl, the loss plot and the final model go."""
    per_device_train_batch_size: int = 2
    """Examples (or packed rows) per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step; the loss is normalised by the target tokens of the whole step."""
    learning_rate: float = 2e-4
    embedding_learning_rate: float | None = None
    """A separate learning rate for embed_tokens / lm_head parameters (continued pretraining)."""
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps to run; when > 0 it overrides num_train_epochs."""
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps, used when warmup_steps is 0."""
    lr_scheduler_type: str = "linear"
    """linear, cosine, constant or constant_with_warmup."""
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    """adamw_torch, or adamw_8bit (8-bit optimizer states, gazelle's own)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    logging_steps: int = 1
    eval_strategy: str = "no"
    """no, steps (every eval_steps) or epoch-free "end": when to compute the eval_dataset loss."""
    eval_steps: int | None = None
    """Steps between evaluations with eval_strategy=steps (default: logging_steps)."""
    save_strategy: str = "steps"
    """steps (every save_steps), epoch, or no."""
    save_steps: int = 500
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    seed: int = 3407
    bf16: bool = False
    fp16: bool = False
    report_to: str | list[str] = "none"
    """Accepted for compatibility; gazelle logs to the terminal and metrics.jsonl."""
    gradient_checkpointing: bool | str = False
    """True recomputes each layer in backward; "unsloth" also offloads layer inputs to CPU on a GPU."""
    uncheckpointed_layers: int = 0
    """With gradient checkpointing, the top this many decoder layers keep their activations on the GPU instead of
    recomputing them in backward (gazelle's decoder: Decoder.uncheckpointed_layers): memory for speed. At the
    llama-8B shape, 2 x 2048 tokens, bf16 on an H100: 4 layers took 1.27 GiB and saved 17 ms of a 359 ms step
    (benchmarks/RESULTS.md, session 11)."""
    cuda_graphs: bool | None = None
    """Replay each micro-batch's forward and backward from a CUDA graph captured per batch shape (the step's
    kernel launches cost the host one call). None: where it applies (CUDA, a trainer whose loss is capturable,
    no active dropout); True: an error where it cannot; False: always eager."""
    offload_embeddings: bool | None = None
    """Keep the frozen embedding table and lm_head in pinned host memory while training (rows looked up on the
    host, the head copied in under each forward; gazelle.models.host_embeddings). None: where it applies (SFT on
    CUDA, both frozen, a plain linear head); True: an error where it cannot; False: never."""
    mlp_tile_mb: float | None = None
    """Memory for speed in checkpointed training: a layer's MLP whose intermediates (gate, up, their product)
    exceed this many MB runs in tiles of tokens in the checkpoint's forward and recomputation, so backward holds
    one tile's intermediates, not the whole batch's (MLP.light_tile_bytes, restored after training). None keeps
    the model's (512 MB); 0 never tiles. benchmarks/RESULTS.md: 128 takes qwen-1.5B QLoRA at 8 x 1024 from 2.34
    to 1.96 GiB for 15% of its speed."""
    stream_layers: int = 0
    """Memory for host-link bandwidth in LoRA training with offloaded checkpointing: this many decoder layers, spread
    through the checkpointed ones, keep their frozen weights in pinned host memory and are copied into two device
    slots ahead of each use (gazelle.models.host_layers); GPU memory holds stream_layers - 2 layers fewer. 0: none.
    The copies overlap the other layers' compute. On an H100 (benchmarks/RESULTS.md, session 11): 14 of qwen-1.5B's
    28 layers at 8 x 1024, 3.11 GiB at 48,335 tok/s (session 10 without: 4.16 GiB, 46,123). llama-8B at 2 x 2048
    (session 12): 10 layers streamed and uncheckpointed_layers=6, 14.30 GiB at 12,372-12,589 tok/s, against 15.42
    GiB at 12,076 with neither."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    dataloader_num_workers: int = 0
    """Accepted for compatibility; batches are built in the training process."""

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise GazelleError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.embedding_learning_rate is not None and not self.embedding_learning_rate > 0:
            raise GazelleError(f"embedding_learning_rate must be > 0, got {self.embedding_learning_rate}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise GazelleError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or (self.max_steps < 0 and not self.num_train_epochs > 0):
            raise GazelleError("set max_steps > 0 or num_train_epochs > 0: there is nothing to train")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise GazelleError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULERS)}")
        if self.optim not in OPTIMIZERS:
            raise GazelleError(f"optim {self.optim!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.eval_strategy not in ("no", "steps", "end"):
            raise GazelleError(f"eval_strategy {self.eval_strategy!r} is not one of no, steps, end")
        if self.save_strategy not in ("steps", "epoch", "no"):
            raise GazelleError(f"save_strategy {self.save_strategy!r} is not one of steps, epoch, no")
        if self.bf16 and self.fp16:
            raise GazelleError("bf16 and fp16 are both set; choose one")
        if self.mlp_tile_mb is not None and not self.mlp_tile_mb >= 0:
            raise GazelleError(f"mlp_tile_mb must be >= 0 (0: no tiles) or unset, got {self.mlp_tile_mb}")
        if self.uncheckpointed_layers < 0:
            raise GazelleError(f"uncheckpointed_layers must be >= 0 (0: every layer checkpointed), got "
                               f"{self.uncheckpointed_layers}")
        if self.stream_layers < 0:
            raise GazelleError(f"stream_layers must be >= 0 (0: none), got {self.stream_layers}")
        if not 0 <= self.warmup_ratio < 1:
            raise GazelleError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
