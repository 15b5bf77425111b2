"""The training loop, written once: accumulation, clipping, schedule, logging, checkpoint and resume.

A trainer subclass provides `batches(epoch, start)` (the micro-batches of one epoch from index `start`, in a
deterministic order) and `loss(batch) -> (loss_sum, count)`; this module turns that into optimizer steps
whose loss is normalised once for the whole step (`step_normalizer`: by default the target tokens of all
its micro-batches), so batch 8 x accumulation 1 and batch 1 x accumulation 8 take the same step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.models.decoder import MLP, DecoderBody
from gazelle.models.host_embeddings import HostEmbeddings, why_not
from gazelle.models.host_layers import HostLayers
from gazelle.trainers.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from gazelle.trainers.config import TrainingArguments
from gazelle.trainers.graphed import GraphedStep
from gazelle.utils.logging import get_logger, progress

log = get_logger(__name__)


class TrainOutput(NamedTuple):
    """What train() returns, shaped like transformers' TrainOutput."""

    global_step: int
    training_loss: float
    metrics: dict


EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def make_optimizer(model, args: TrainingArguments) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise GazelleError("the model has no trainable parameters: attach LoRA (get_peft_model) or set full_finetuning")
    embed_lr = args.embedding_learning_rate
    groups = []
    for is_embedding in (False, True):
        chosen = [p for n, p in params if (embed_lr is not None and any(e in n for e in EMBEDDING_NAMES)) == is_embedding]
        if not chosen:
            continue
        decay = [p for p in chosen if p.ndim >= 2]
        no_decay = [p for p in chosen if p.ndim < 2]  # biases and norms take no weight decay
        lr = embed_lr if is_embedding else args.learning_rate
        groups += [g for g in ({"params": decay, "weight_decay": args.weight_decay, "lr": lr},
                               {"params": no_decay, "weight_decay": 0.0, "lr": lr}) if g["params"]]
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if args.optim in ("adamw_8bit", "paged_adamw_8bit"):
        from gazelle.trainers.adamw8bit import AdamW8bit

        return AdamW8bit(groups, **kwargs)
    # On CUDA the fused kernels: one launch group for all adapters, against a dozen launches per parameter (the
    # step of the qwen-1.5B shape's 392 LoRA tensors). Elsewhere the per-parameter loop: no temporaries the size
    # of all parameters, which matters in full fine-tuning.
    fused = all(p.is_cuda for _, p in params)
    return torch.optim.AdamW(groups, fused=fused, foreach=False if not fused else None, **kwargs)


def make_scheduler(optimizer, args: TrainingArguments, total_steps: int):
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    kind = args.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if kind != "constant" else 1.0
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress_)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Subclasses set up data; `train()` runs the steps."""

    def __init__(self, model, args: TrainingArguments, callbacks=None):
        self.model = model
        self.args = args
        self.callbacks = list(callbacks or [])
        self.global_step = 0
        self.metrics: list[dict] = []
        self.eval_metrics: list[dict] = []
        self._graphed: GraphedStep | None = None

    # -- what a subclass provides -------------------------------------------------------------
    def num_batches(self) -> int:
        """Micro-batches per epoch."""
        raise NotImplementedError

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The micro-batches of `epoch` from index `start` on (a resumed run skips what it has done)."""
        raise NotImplementedError

    def step_normalizer(self, batches: list[dict]) -> float:
        """What the summed losses of one optimizer step are divided by: here, their target tokens."""
        tokens = sum(int((b["targets"] != -100).sum()) for b in batches)
        if tokens == 0:
            raise GazelleError("a training step has no target tokens: every label is masked (check "
                               "train_on_responses_only's parts or the dataset)")
        return tokens

    def log_extras(self) -> dict:
        """More fields for the next logged record (a subclass's own statistics since the last one)."""
        return {}

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    graph_loss = None
    """A subclass's loss as a method free of host syncs and data-dependent shapes, for CUDA-graph replay
    (gazelle.trainers.graphed); None: every step runs eagerly."""

    def evaluate(self) -> dict:
        """Metrics on held-out data ({} when there is none)."""
        return {}

    def save_extra(self, directory: str) -> None:
        """Files a checkpoint carries besides the training state: the LoRA adapter in PEFT's format."""
        if getattr(self.model, "lora_config", None) is not None:
            from gazelle.lora.peft_io import save_adapter

            save_adapter(self.model, directory, self.model.lora_config, self.model.name_or_path or "")

    def resolved_config(self) -> dict:
        return self.args.to_dict()

    # -- the loop ----------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = math.ceil(self.num_batches() / self.args.gradient_accumulation_steps)
        return max(1, math.ceil(per_epoch * self.args.num_train_epochs))

    def _micro_batches(self, start_epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index within epoch, batch) forever, starting `skip` batches into `start_epoch`."""
        epoch = start_epoch
        while True:
            for index, batch in enumerate(self.batches(epoch, skip), start=skip):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0

    def _checkpoint(self, optimizer, scheduler, position: tuple[int, int]) -> str:
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
        state = {"global_step": self.global_step, "epoch": position[0], "batch_in_epoch": position[1],
                 "config": self.resolved_config()}
        save_checkpoint(path, self.model, optimizer, scheduler, state, extra_save=self.save_extra)
        prune_checkpoints(self.args.output_dir, self.args.save_total_limit)
        return path

    def _resume_path(self, resume_from_checkpoint) -> str | None:
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint is True:
            found = list_checkpoints(self.args.output_dir)
            if not found:
                log.info("no checkpoint in %s: starting from scratch", self.args.output_dir)
                return None
            return found[-1]
        return str(resume_from_checkpoint)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        args, model = self.args, self.model
        started = time.perf_counter()
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(self.resolved_config(), f, indent=1, default=str)
        torch.manual_seed(args.seed)
        total = self.total_steps()
        optimizer = make_optimizer(model, args)
        scheduler = make_scheduler(optimizer, args, total)
        position = (0, 0)
        resume = self._resume_path(resume_from_checkpoint)
        if resume is not None:
            state = load_checkpoint(resume, model, optimizer, scheduler)
            self.global_step, position = state["global_step"], (state["epoch"], state["batch_in_epoch"])
            log.info("resumed from %s at step %d", resume, self.global_step)
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if resume is None and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run starts a fresh record; a resumed one continues it
        elif resume is not None:
            _truncate_metrics(metrics_path, self.global_step)
        model.train()
        if args.gradient_checkpointing:  # otherwise keep what get_peft_model chose
            model.gradient_checkpointing = True
        self._graphed = self._graphed_step(optimizer)
        stream = self._micro_batches(*position)
        window = {"loss": 0.0, "tokens": 0, "seen": 0, "steps": 0, "time": time.perf_counter()}
        host, tiles, unchecked, layers = None, [], None, None
        try:  # the settings below are undone in finally, also when one of them fails
            host = self._host_embeddings()
            tiles = self._mlp_tiles()
            unchecked = self._uncheckpointed_layers()
            layers = self._host_layers()
            with progress(total, self.global_step, disable=args.disable_tqdm) as bar:
                while self.global_step < total:
                    for cb in self.callbacks:
                        getattr(cb, "on_step_begin", lambda t: None)(self)
                    micro = [next(stream) for _ in range(args.gradient_accumulation_steps)]
                    loss_sum, tokens, grad_norm = self._step(optimizer, [b for _, _, b in micro])
                    seen = sum(int(b["attention_mask"].sum()) for _, _, b in micro)
                    if not math.isfinite(loss_sum):
                        path = self._checkpoint(optimizer, scheduler, (micro[0][0], micro[0][1]))
                        raise GazelleError(
                            f"the loss became {loss_sum} at step {self.global_step + 1}; the state before it is saved in "
                            f"{path}; lower learning_rate or check the data"
                        )
                    lr = scheduler.get_last_lr()[0]  # the rate this step used
                    scheduler.step()
                    self.global_step += 1
                    epoch, index, _ = micro[-1]
                    position = (epoch, index + 1)
                    window["loss"] += loss_sum
                    window["tokens"] += tokens
                    window["seen"] += seen
                    window["steps"] += 1
                    bar.advance(loss=loss_sum / max(tokens, 1))
                    if self.global_step % args.logging_steps == 0 or self.global_step == total:
                        self._log(window, lr, grad_norm, epoch, metrics_path)
                        window = {"loss": 0.0, "tokens": 0, "seen": 0, "steps": 0, "time": time.perf_counter()}
                    if args.eval_strategy == "steps" and self.global_step % (args.eval_steps or args.logging_steps) == 0:
                        self._log_eval(metrics_path)
                    if args.save_strategy == "steps" and self.global_step % args.save_steps == 0:
                        self._checkpoint(optimizer, scheduler, position)
                    for cb in self.callbacks:
                        getattr(cb, "on_step_end", lambda t: None)(self)
        finally:
            self._graphed = None  # its graphs' memory pool goes with it
            for mlp, light in tiles:
                mlp.light_tile_bytes = light
            if layers is not None:
                layers.disable()  # every layer's weights back on the device
            if unchecked is not None:
                model.uncheckpointed_layers = unchecked
            if host is not None:
                host.disable()  # the tables go back to the device: inference afterwards sees the model as it was
        if args.save_strategy != "no":
            self._checkpoint(optimizer, scheduler, position)
        if args.eval_strategy == "end":
            self._log_eval(metrics_path)
        model.eval()
        self._plot()
        runtime = time.perf_counter() - started
        mean_loss = sum(m["loss"] for m in self.metrics) / max(len(self.metrics), 1)
        metrics = {"train_runtime": runtime, "train_steps_per_second": self.global_step / runtime,
                   "train_loss": mean_loss, **(self.metrics[-1] if self.metrics else {})}
        return TrainOutput(self.global_step, mean_loss, metrics)

    supports_host_embeddings = False
    """Whether the subclass's batches (input_ids) and loss take inputs_embeds looked up on the host
    (gazelle.models.host_embeddings)."""

    def _host_embeddings(self) -> HostEmbeddings | None:
        """The embedding table and head moved to host memory, when args.offload_embeddings allows and it applies."""
        wanted = self.args.offload_embeddings
        if wanted is False or (wanted is None and not self.supports_host_embeddings):
            return None
        why = "the trainer does not support it" if not self.supports_host_embeddings else why_not(self.model)
        if why is not None:
            if wanted:
                raise GazelleError(f"offload_embeddings=True cannot apply: {why}; leave it unset")
            return None
        host = HostEmbeddings(self.model)
        host.enable()
        return host

    def _decoder_layers(self, setting: str) -> nn.ModuleList:
        """The model's decoder layers, for a setting that applies to gazelle's decoder only."""
        body = getattr(self.model, "model", None)
        if not isinstance(body, DecoderBody):
            raise GazelleError(f"{setting} applies to gazelle's decoder, and this model is not one")
        return body.layers

    def _uncheckpointed_layers(self) -> int | None:
        """Sets args.uncheckpointed_layers on the model; returns the model's own setting, to restore (None: unset)."""
        count = self.args.uncheckpointed_layers
        if not count:
            return None
        layers = self._decoder_layers("uncheckpointed_layers")
        if count > len(layers):
            raise GazelleError(f"uncheckpointed_layers={count} exceeds the model's {len(layers)} layers")
        own, self.model.uncheckpointed_layers = self.model.uncheckpointed_layers, count
        return own

    supports_host_layers = False
    """Whether the subclass runs the model only through its forward (no generation engine), so some layers' frozen
    weights may stream from host memory (gazelle.models.host_layers)."""

    def _host_layers(self) -> HostLayers | None:
        """args.stream_layers layers of the model streamed from host memory, or None when it is 0."""
        count = self.args.stream_layers
        if not count:
            return None
        if not self.supports_host_layers:
            raise GazelleError(f"stream_layers applies to SFT training, not to {type(self).__name__}; leave it at 0")
        self._decoder_layers("stream_layers")
        layers = HostLayers(self.model, count)
        layers.enable()
        return layers

    def _mlp_tiles(self) -> list[tuple[nn.Module, int | None]]:
        """Sets args.mlp_tile_mb on every MLP of the model; returns each one's own setting, to restore."""
        if self.args.mlp_tile_mb is None:
            return []
        mlps = [m for m in self.model.modules() if isinstance(m, MLP)]
        if not mlps:
            raise GazelleError("mlp_tile_mb applies to the MLPs of gazelle's decoder, and this model has none")
        saved = [(m, m.light_tile_bytes) for m in mlps]
        for m in mlps:
            m.light_tile_bytes = int(self.args.mlp_tile_mb * 2**20) or None
        return saved

    def _graphed_step(self, optimizer) -> GraphedStep | None:
        """The CUDA-graph runner of the micro-batches when args.cuda_graphs allows and the setting supports it."""
        wanted = self.args.cuda_graphs
        if wanted is False or (wanted is None and self.graph_loss is None):
            return None
        device = self.model.device
        draws_random = getattr(self.model, "draws_random", lambda: False)()
        why = ("the trainer's loss is not capturable" if self.graph_loss is None else
               f"the model is on {device.type}, not CUDA" if device.type != "cuda" else
               "the model draws random numbers in training (lora_dropout > 0)" if draws_random else None)
        if why is None:
            # max_graphs: SFT pads its batches to at most 8 lengths (SFTTrainer._padded_length)
            return GraphedStep(self.graph_loss, [p for g in optimizer.param_groups for p in g["params"]], max_graphs=8)
        if wanted:
            raise GazelleError(f"cuda_graphs=True cannot apply: {why}; leave cuda_graphs unset to run eagerly")
        if device.type == "cuda":
            log.info("CUDA graphs off: %s", why)
        return None

    def _step(self, optimizer, batches: list[dict]) -> tuple[float, int, float]:
        """One optimizer step over the micro-batches; returns (loss sum, normalizer, grad norm)."""
        device = self.model.device
        tokens = self.step_normalizer(batches)
        graphed = self._graphed
        host = self.model._host_embeddings if hasattr(self.model, "_host_embeddings") else None
        total = 0.0
        for batch in batches:
            if host is not None:
                batch = host.inputs(batch)  # the embedding rows, gathered on the host
            try:
                if graphed is not None:  # copies the batch to the device itself
                    loss_sum, _ = graphed(batch, 1.0 / tokens)
                else:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    loss_sum, _ = self.loss(batch)
                    (loss_sum / tokens).backward()
            except torch.OutOfMemoryError:
                raise GazelleError(
                    "out of GPU memory: lower per_device_train_batch_size (raise gradient_accumulation_steps to "
                    "keep the step size), lower max_seq_length, set use_gradient_checkpointing='unsloth', or "
                    "load_in_4bit=True"
                ) from None
            total += float(loss_sum.detach())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if math.isfinite(total):
            optimizer.step()
        optimizer.zero_grad(set_to_none=graphed is None)  # a graph adds into the .grad tensors it captured
        return total, tokens, grad_norm

    def _log(self, window, lr, grad_norm, epoch, metrics_path) -> None:
        elapsed = time.perf_counter() - window["time"]
        record = {
            "step": self.global_step,
            "epoch": epoch,
            "loss": window["loss"] / max(window["tokens"], 1),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": window["seen"] / max(elapsed, 1e-9),  # all tokens processed, not only targets
            "memory_gib": _memory_gib(),
            **self.log_extras(),
        }
        self.metrics.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("step %d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  %.2f GiB", record["step"], record["loss"],
                 record["learning_rate"], grad_norm, record["tokens_per_second"], record["memory_gib"])
        for cb in self.callbacks:
            getattr(cb, "on_log", lambda t, r: None)(self, record)

    def _log_eval(self, metrics_path: str) -> None:
        record = {"step": self.global_step, **self.evaluate()}
        if len(record) == 1:
            return
        self.model.train()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("step %d  %s", self.global_step, "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        self.eval_metrics.append(record)

    def _plot(self) -> None:
        if not self.metrics:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m["step"] for m in self.metrics], [m["loss"] for m in self.metrics])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        fig.tight_layout()
        fig.savefig(os.path.join(self.args.output_dir, "loss.png"), dpi=100)
        plt.close(fig)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        rss = next(line for line in f if line.startswith("VmRSS"))
    return int(rss.split()[1]) / 2**20
