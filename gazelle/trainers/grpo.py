"""GRPO: sample a group of completions per prompt, score them with reward functions, push toward the better ones.

GRPOConfig keeps TRL's field names and defaults; reward functions are called as TRL calls them:
`f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]`, every dataset column
passed by name. Chat prompts (lists of messages) give completions as lists of messages.

A generation batch is per_device_train_batch_size x steps_per_generation completions (prompts x
num_generations). Its rollout runs when the training loop asks for its first micro-batch: generation on the
engine over the live weights (no second copy), rewards, advantages, and the log-probs the loss needs besides
the current ones (old ones when the batch is used off-policy, reference ones when beta > 0). The batch is then
shuffled and split into steps_per_generation micro-batches, num_iterations times over.

Resuming restores adapter, optimizer and RNG (the loop's checkpoint) and the data position: generation
batches already consumed are skipped without generating, and each rollout samples from a seed derived from
(seed, epoch, batch index), so a resumed run draws the same prompts in the same order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gazelle.data.chat_templates import prompt_token_ids
from gazelle.errors import GazelleError
from gazelle.generation.engine import stop_token_ids
from gazelle.generation.sampling import SamplingParams
from gazelle.losses.cross_entropy import token_log_probs
from gazelle.losses.grpo import (
    ESTIMATORS,
    IMPORTANCE_LEVELS,
    LOSS_TYPES,
    SCALINGS,
    advantages,
    policy_loss,
)
from gazelle.trainers.config import TrainingArguments
from gazelle.trainers.loop import Trainer
from gazelle.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class GRPOConfig(TrainingArguments):
    learning_rate: float = 1e-6
    # -- generation ---------------------------------------------------------------------------
    num_generations: int = 8
    """Completions sampled per prompt (the group)."""
    per_device_train_batch_size: int = 8
    """Completions per forward pass. 1 with num_generations > 1 is read as one prompt's group per pass (the
    convention of Unsloth's notebooks) and becomes num_generations."""
    generation_batch_size: int | None = None
    """Completions per rollout; default per_device_train_batch_size x steps_per_generation."""
    steps_per_generation: int | None = None
    """Micro-batches each rollout feeds; default gradient_accumulation_steps (one rollout per optimizer step)."""
    num_iterations: int = 1
    """Times each rollout is trained on (mu in the GRPO paper); > 1 uses the clipped importance ratio."""
    max_prompt_length: int | None = 512
    """Prompts longer than this keep their last tokens (counted in the log), or stop the run (overlong_prompts)."""
    overlong_prompts: str = "truncate"
    """truncate (from the left) or error."""
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    shuffle_dataset: bool = True
    # -- loss ---------------------------------------------------------------------------------
    beta: float = 0.0
    """KL coefficient against the reference policy: the same model with adapters disabled (no second copy);
    full fine-tuning keeps a frozen copy. 0 computes no reference log-probs at all."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clipping bound (DAPO's clip-higher); default epsilon."""
    loss_type: str = "dapo"
    """grpo, bnpo, dr_grpo or dapo (formulas in gazelle/losses/grpo.py)."""
    importance_sampling_level: str = "token"
    """token, or sequence (GSPO)."""
    scale_rewards: str | bool = "group"
    """group, batch or none (True = group, False = none): what the advantages are divided by."""
    advantage_estimator: str = "grpo"
    """grpo (group-mean baseline) or rloo (leave-one-out baseline)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without EOS out of the loss."""
    reward_weights: list[float] | None = None
    reward_errors: str = "raise"
    """raise: a reward function that raises or returns NaN stops the run, naming the function and row; none:
    such rows score None for that function (left out of its mean) and are counted in the log."""
    # -- logging ------------------------------------------------------------------------------
    log_completions: bool = False
    """Print sample completions with their rewards every logging_steps."""
    num_completions_to_print: int | None = 2
    use_vllm: bool = False
    """Accepted for compatibility: gazelle samples with its own engine over the live weights."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        for name, value, allowed in (("loss_type", self.loss_type, LOSS_TYPES),
                                     ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS),
                                     ("scale_rewards", self.scale_rewards, SCALINGS),
                                     ("advantage_estimator", self.advantage_estimator, ESTIMATORS),
                                     ("reward_errors", self.reward_errors, ("raise", "none")),
                                     ("overlong_prompts", self.overlong_prompts, ("truncate", "error"))):
            if value not in allowed:
                raise GazelleError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        G = self.num_generations
        if G < 1:
            raise GazelleError(f"num_generations must be at least 1, got {G}")
        if self.advantage_estimator == "rloo" and G < 2:
            raise GazelleError("advantage_estimator rloo needs num_generations >= 2")
        for name in ("num_iterations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise GazelleError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise GazelleError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}")
        if self.beta < 0 or self.epsilon < 0:
            raise GazelleError("beta and epsilon must be >= 0")
        self.epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        self.top_k, self.min_p = self.top_k or 0, self.min_p or 0.0
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise GazelleError("set generation_batch_size or steps_per_generation, not both")
        if self.per_device_train_batch_size == 1 and G > 1 and self.generation_batch_size is None:
            self.per_device_train_batch_size = G
        bs = self.per_device_train_batch_size
        if self.generation_batch_size is not None:
            if self.generation_batch_size % bs:
                raise GazelleError(f"generation_batch_size={self.generation_batch_size} is not a multiple of "
                                   f"per_device_train_batch_size={bs}")
            self.steps_per_generation = self.generation_batch_size // bs
        self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
        self.generation_batch_size = bs * self.steps_per_generation
        if self.generation_batch_size % G:
            raise GazelleError(
                f"a rollout of {self.generation_batch_size} completions (per_device_train_batch_size={bs} x "
                f"steps_per_generation={self.steps_per_generation}) is not divisible by num_generations={G}; make "
                "per_device_train_batch_size (or generation_batch_size) a multiple of num_generations"
            )
        if self.temperature == 0:
            log.info("temperature 0: every completion of a group is the same, so advantages are all zero")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(do_sample=self.temperature > 0, temperature=self.temperature or 1.0,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty)


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _run_async(calls: list[tuple[Callable, dict]]) -> list:
    """Await the async reward calls together (in a thread of its own, so a caller's event loop is no obstacle)."""
    async def together():
        return await asyncio.gather(*(fn(**kwargs) for fn, kwargs in calls), return_exceptions=True)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, together()).result()


class GRPOTrainer(Trainer):
    def __init__(
        self,
        model,
        reward_funcs,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        tokenizer=None,
        callbacks=None,
        peft_config=None,
        reward_processing_classes=None,
    ):
        args = args or GRPOConfig()
        if not isinstance(args, GRPOConfig):
            raise GazelleError(f"GRPOTrainer takes a GRPOConfig as args, got {type(args).__name__}")
        if isinstance(model, str):
            from gazelle.fast import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(model)
        if peft_config is not None:
            from gazelle.fast import FastLanguageModel

            options = {k: getattr(peft_config, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                             "bias", "use_rslora") if hasattr(peft_config, k)}
            FastLanguageModel.get_peft_model(model, **options)
        super().__init__(model, args, callbacks)
        self.tokenizer = processing_class or tokenizer or getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise GazelleError("GRPOTrainer needs the tokenizer (processing_class= or tokenizer=)")
        if reward_processing_classes is not None:
            log.info("reward_processing_classes is ignored: reward models are not supported, only functions")
        self.reward_funcs = self._reward_functions(reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise GazelleError(f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.train_rows = self._rows(train_dataset, "train_dataset")
        self.eval_rows = self._rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.eos = stop_token_ids(self.tokenizer, model.config)
        self._prompt_cache: dict[tuple[str, int], list[int]] = {}
        self.ref_model = None
        if args.beta > 0 and model.lora_config is None:  # full fine-tuning: the reference is a frozen copy
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self._rollout_stats: list[dict] = []
        self._window_started, self._window_tokens = time.perf_counter(), 0
        self._loss_stats: dict[str, float] = {}
        self._reward_failures: dict[str, int] = {}
        self._samples: list[tuple] = []
        self.reward_history: list[dict] = []

    # -- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _reward_functions(reward_funcs) -> list[Callable]:
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise GazelleError("GRPOTrainer needs at least one reward function (reward_funcs=)")
        resolved = []
        for fn in funcs:
            if isinstance(fn, str):
                from gazelle.rewards import get_reward

                fn = get_reward(fn)
            if not callable(fn):
                raise GazelleError(f"reward function {fn!r} is not callable; reward models are not supported, pass "
                                   "functions f(prompts, completions, **columns) -> list[float]")
            resolved.append(fn)
        return resolved

    @staticmethod
    def _rows(dataset, name: str) -> list[dict]:
        if dataset is None:
            raise GazelleError(f"GRPOTrainer needs a {name}")
        rows = [dict(r) for r in dataset]
        if not rows:
            raise GazelleError(f"{name} is empty")
        if "prompt" not in rows[0]:
            raise GazelleError(f"{name} has no 'prompt' column (its columns are {sorted(rows[0])}); GRPO samples "
                               "completions for each row's prompt: a string or a list of chat messages")
        return rows

    def _prompt_ids(self, split: str, index: int, prompt) -> tuple[list[int], bool]:
        """Token ids of a row's prompt (cached) and whether they were truncated."""
        key = (split, index)
        if key not in self._prompt_cache:
            try:
                ids = prompt_token_ids(self.tokenizer, prompt)
            except GazelleError as e:
                raise GazelleError(f"{split} row {index}: {e}") from None
            if not ids:
                raise GazelleError(f"{split} row {index}: the prompt is empty")
            self._prompt_cache[key] = ids
        ids, limit = self._prompt_cache[key], self.args.max_prompt_length
        if limit is not None and len(ids) > limit:
            if self.args.overlong_prompts == "error":
                raise GazelleError(f"{split} row {index}: the prompt has {len(ids)} tokens, more than "
                                   f"max_prompt_length={limit} (raise it, or set overlong_prompts='truncate')")
            return ids[-limit:], True
        return ids, False

    # -- data ---------------------------------------------------------------------------------
    def _prompts_per_rollout(self) -> int:
        return self.args.generation_batch_size // self.args.num_generations

    def _micro_per_rollout(self) -> int:
        return self.args.steps_per_generation * self.args.num_iterations

    def num_batches(self) -> int:
        rollouts = math.ceil(len(self.train_rows) / self._prompts_per_rollout())
        return rollouts * self._micro_per_rollout()

    def _order(self, epoch: int) -> list[int]:
        if not self.args.shuffle_dataset:
            return list(range(len(self.train_rows)))
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        return torch.randperm(len(self.train_rows), generator=generator).tolist()

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        order, per_rollout, micro = self._order(epoch), self._prompts_per_rollout(), self._micro_per_rollout()
        for g, first in enumerate(range(0, len(order), per_rollout)):
            if (g + 1) * micro <= start:
                continue  # consumed before a resume: skipped without generating
            seed = (self.args.seed * 1_000_003 + epoch * 10_007 + g) % 2**62
            rollout = self.rollout(order[first : first + per_rollout], seed)
            n, G = len(rollout["completion_ids"]), self.args.num_generations
            splits, size = self.args.steps_per_generation, self.args.per_device_train_batch_size
            for iteration in range(self.args.num_iterations):
                # Whole groups are shuffled (so a micro-batch packs each prompt once), then cut into micro-batches.
                groups = torch.randperm(n // G, generator=torch.Generator().manual_seed(seed + 1 + iteration))
                completions = [group * G + k for group in groups.tolist() for k in range(G)]
                for k in range(splits):
                    if g * micro + iteration * splits + k < start:
                        continue
                    chosen = completions[k * size : (k + 1) * size]
                    if chosen:
                        yield self._collate(rollout, chosen)

    # -- rollout ------------------------------------------------------------------------------
    def rollout(self, row_indices: list[int], seed: int, split: str = "train", params: SamplingParams | None = None,
                n: int | None = None) -> dict:
        """Generate, score and prepare one batch: completions prompt-major, n per prompt."""
        args, tok = self.args, self.tokenizer
        rows = self.train_rows if split == "train" else self.eval_rows
        n = n or args.num_generations
        prompt_ids, truncated = [], 0
        for i in row_indices:
            ids, cut = self._prompt_ids(split, i, rows[i]["prompt"])
            prompt_ids.append(ids)
            truncated += cut
        if truncated:
            log.info("%d of %d prompts were longer than max_prompt_length=%d and lost their first tokens", truncated,
                     len(row_indices), args.max_prompt_length)
        started = time.perf_counter()
        completion_ids = self.model.engine().generate(prompt_ids, args.max_completion_length, params or args.sampling,
                                                      n=n, eos_token_ids=self.eos, seed=seed)
        generation_seconds = time.perf_counter() - started
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        source = [rows[i] for i in row_indices for _ in range(n)]
        is_chat = isinstance(source[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_chat else texts
        ended = [bool(c) and c[-1] in self.eos for c in completion_ids]
        scores = self._score(source, completions, completion_ids, [i for i in row_indices for _ in range(n)], split)
        weighted = scores * self.reward_weights
        total = torch.where(scores.isnan().all(dim=1), 0.0, weighted.nansum(dim=1))
        adv = advantages(total, n, args.advantage_estimator, args.scale_rewards) if n > 1 else torch.zeros_like(total)
        rollout = {"prompt_ids": [p for p in prompt_ids for _ in range(n)], "completion_ids": completion_ids,
                   "group": [g for g in range(len(prompt_ids)) for _ in range(n)],
                   "ended": ended, "advantages": adv, "texts": texts, "rewards": scores, "total": total,
                   "prompts": [r["prompt"] for r in source]}
        if split == "train":
            self._record_rollout(rollout, n, generation_seconds, truncated)
            self._precompute_log_probs(rollout)
        return rollout

    def _score(self, source: list[dict], completions: list, completion_ids: list[list[int]], dataset_rows: list[int],
               split: str) -> torch.Tensor:
        """(N, functions) rewards, NaN where a function returned None."""
        N = len(completions)
        columns = {k: [r[k] for r in source] for k in source[0] if k not in ("prompt", "completion", "completion_ids")}
        kwargs = dict(prompts=[r["prompt"] for r in source], completions=completions, completion_ids=completion_ids,
                      **columns)
        results: list = [None] * len(self.reward_funcs)
        pending = [(i, fn) for i, fn in enumerate(self.reward_funcs) if inspect.iscoroutinefunction(fn)]
        if pending:
            for (i, _), value in zip(pending, _run_async([(fn, kwargs) for _, fn in pending])):
                results[i] = value
        for i, fn in enumerate(self.reward_funcs):
            if not inspect.iscoroutinefunction(fn):
                try:
                    results[i] = fn(**kwargs)
                except Exception as error:  # noqa: BLE001 - a user's function; reported with its row below
                    results[i] = error
        scores = torch.full((N, len(self.reward_funcs)), float("nan"))
        for i, (fn, result) in enumerate(zip(self.reward_funcs, results)):
            name = _name(fn)
            if isinstance(result, BaseException):
                result = self._per_row(fn, kwargs, N, result, dataset_rows, split)
            if not isinstance(result, (list, tuple)) and not (hasattr(result, "__len__") and hasattr(result, "__getitem__")):
                raise GazelleError(f"reward function {name} returned a {type(result).__name__}; return a list of "
                                   f"{N} floats (or None), one per completion")
            if len(result) != N:
                raise GazelleError(f"reward function {name} returned {len(result)} values for {N} completions; "
                                   "return one float (or None) per completion")
            for row, value in enumerate(result):
                if value is None:
                    continue
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise GazelleError(f"reward function {name} returned {value!r} for completion {row} "
                                       f"({split} row {dataset_rows[row]}); return floats or None") from None
                if math.isnan(value):
                    if self.args.reward_errors == "raise":
                        raise GazelleError(f"reward function {name} returned NaN for completion {row} ({split} row "
                                           f"{dataset_rows[row]}); return a number or None (set reward_errors='none' "
                                           "to score such rows None)")
                    self._reward_failures[name] = self._reward_failures.get(name, 0) + 1
                    continue
                scores[row, i] = value
        return scores

    def _per_row(self, fn, kwargs: dict, N: int, error: BaseException, dataset_rows: list[int], split: str) -> list:
        """After a batch call raised: find the failing rows, one call each; raise naming one, or score them None."""
        name, values = _name(fn), []
        for row in range(N):
            single = {k: v[row : row + 1] if isinstance(v, list) and len(v) == N else v for k, v in kwargs.items()}
            try:
                value = _run_async([(fn, single)])[0] if inspect.iscoroutinefunction(fn) else fn(**single)
                if isinstance(value, BaseException):
                    raise value
                values.append(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else None)
            except Exception as row_error:
                if self.args.reward_errors == "raise":
                    raise GazelleError(f"reward function {name} raised {type(row_error).__name__}: {row_error} on "
                                       f"completion {row} ({split} row {dataset_rows[row]}); fix the function or set "
                                       "reward_errors='none' to score such rows None") from row_error
                self._reward_failures[name] = self._reward_failures.get(name, 0) + 1
                values.append(None)
        if self.args.reward_errors == "raise":  # every row alone succeeded: the batch call itself is at fault
            raise GazelleError(f"reward function {name} raised {type(error).__name__}: {error} on the batch of {N} "
                               "completions, though each row alone succeeds") from error
        return values

    def _record_rollout(self, rollout: dict, n: int, seconds: float, truncated: int) -> None:
        lengths = torch.tensor([len(c) for c in rollout["completion_ids"]], dtype=torch.float32)
        scores, total = rollout["rewards"], rollout["total"]
        stats = {"reward": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0,
                 "frac_reward_zero_std": (total.view(-1, n).std(dim=1) < 1e-6).float().mean().item() if n > 1 else 1.0,
                 "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                 "completions/max_length": lengths.max().item(),
                 "completions/clipped_ratio": 1.0 - sum(rollout["ended"]) / len(rollout["ended"]),
                 "generation_tokens_per_second": lengths.sum().item() / max(seconds, 1e-9),
                 "generation_seconds": seconds, "prompts_truncated": truncated}
        for i, fn in enumerate(self.reward_funcs):
            column = scores[:, i]
            present = column[~column.isnan()]
            stats[f"rewards/{_name(fn)}/mean"] = present.mean().item() if present.numel() else float("nan")
            stats[f"rewards/{_name(fn)}/std"] = present.std().item() if present.numel() > 1 else 0.0
        self._rollout_stats.append(stats)
        if self.args.log_completions:
            self._samples = [(rollout["prompts"][i], rollout["texts"][i], rollout["total"][i].item())
                             for i in range(min(self.args.num_completions_to_print or len(rollout["texts"]),
                                                len(rollout["texts"])))]

    # -- tensors ------------------------------------------------------------------------------
    def _collate(self, rollout: dict, chosen: list[int]) -> dict:
        """A micro-batch of completions, packed: one row per prompt holding the prompt once and then each of its
        completions, every completion attending to the prompt and to itself only (positions continue from the
        prompt in each). The prompt's forward and backward are shared by its completions instead of repeated,
        and the result is exactly that of one padded row per completion."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        groups: list[tuple[list[int], list[int]]] = []  # (prompt ids, completion indices)
        for i in chosen:
            if groups and rollout["group"][groups[-1][1][0]] == rollout["group"][i]:
                groups[-1][1].append(i)
            else:
                groups.append((rollout["prompt_ids"][i], [i]))
        where = {i: j for j, i in enumerate(chosen)}
        widths = [len(p) + sum(len(rollout["completion_ids"][i]) for i in members) for p, members in groups]
        R, T = len(groups), max(widths)
        C = max(max(len(rollout["completion_ids"][i]) for i in chosen), 1)
        ids = torch.full((R, T), pad, dtype=torch.long)
        positions = torch.zeros(R, T, dtype=torch.long)
        doc = torch.full((R, T), -2, dtype=torch.long)  # -1 prompt, k completion k of the row, -2 padding
        predictor, target, slot = [], [], []  # flat indices: hidden state, token, (completion, step)
        for r, (prompt, members) in enumerate(groups):
            n = len(prompt)
            ids[r, :n], positions[r, :n], doc[r, :n] = torch.tensor(prompt), torch.arange(n), -1
            start = n
            for k, i in enumerate(members):
                c = rollout["completion_ids"][i]
                L, j = len(c), where[i]
                ids[r, start : start + L] = torch.tensor(c, dtype=torch.long)
                positions[r, start : start + L] = torch.arange(n, n + L)
                doc[r, start : start + L] = k
                predictor += [r * T + n - 1] + [r * T + start + t for t in range(L - 1)]
                target += [r * T + start + t for t in range(L)]
                slot += [j * C + t for t in range(L)]
                start += L
        real = torch.zeros(len(chosen), C, dtype=torch.bool)
        for j, i in enumerate(chosen):
            real[j, : len(rollout["completion_ids"][i])] = True
        loss_mask = real.clone()
        if self.args.mask_truncated_completions:
            loss_mask &= torch.tensor([rollout["ended"][i] for i in chosen])[:, None]
        batch = {"input_ids": ids, "positions": positions, "doc": doc, "attention_mask": doc != -2,
                 "predictor": torch.tensor(predictor), "target": torch.tensor(target), "slot": torch.tensor(slot),
                 "completion_real": real, "completion_mask": loss_mask, "advantages": rollout["advantages"][chosen],
                 "completion_index": torch.tensor(chosen)}
        for key in ("old_logp", "ref_logp"):
            if key in rollout:
                batch[key] = rollout[key][chosen, :C]
        return batch

    def _masks(self, batch: dict) -> dict:
        """Per sliding window, (R, 1, T, T): causal, same-completion-or-prompt, real keys, within the window."""
        doc, pos = batch["doc"], batch["positions"]
        T = doc.shape[1]
        slots = torch.arange(T, device=doc.device)
        causal = slots[None, :, None] >= slots[None, None, :]
        same = (doc[:, None, :] == -1) | (doc[:, :, None] == doc[:, None, :])
        allowed = causal & same & (doc[:, None, :] != -2)
        itself = torch.eye(T, dtype=torch.bool, device=doc.device)[None]  # padding queries see themselves
        cfg, masks = self.model.config, {}
        for window in {cfg.window(i) for i in range(cfg.num_layers)}:
            visible = allowed if window is None else allowed & (pos[:, :, None] - pos[:, None, :] < window)
            masks[window] = (visible | itself)[:, None]
        return masks

    def _log_probs(self, model, batch: dict, with_entropy: bool = False):
        """log p(token) of every completion token at the sampling temperature, (completions, C); the lm_head
        sees only the positions that predict a completion token."""
        hidden = model.run_layers(batch["input_ids"], batch["positions"], self._masks(batch))
        h = hidden.reshape(-1, hidden.shape[-1])[batch["predictor"]]
        targets = batch["input_ids"].reshape(-1)[batch["target"]]
        out = token_log_probs(model.logits, h, targets, model.config.vocab_size,
                              temperature=self.args.temperature or 1.0, with_entropy=with_entropy)
        real = batch["completion_real"]
        shaped = []
        for part in out if with_entropy else (out,):
            full = torch.zeros(real.numel(), dtype=part.dtype, device=part.device)
            shaped.append(full.index_put((batch["slot"],), part).reshape(real.shape))
        return tuple(shaped) if with_entropy else shaped[0]

    @torch.no_grad()
    def _precompute_log_probs(self, rollout: dict) -> None:
        """Old log-probs when the rollout trains off-policy; reference log-probs when beta > 0."""
        args = self.args
        off_policy = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
        if not off_policy and args.beta == 0:
            return
        device = next(self.model.parameters()).device
        n, size = len(rollout["completion_ids"]), self.args.per_device_train_batch_size
        width = max(len(c) for c in rollout["completion_ids"])
        old, ref = [], []
        for first in range(0, n, size):
            chosen = list(range(first, min(first + size, n)))
            batch = {k: v.to(device) for k, v in self._collate(rollout, chosen).items()}
            if off_policy:
                old.append(self._pad(self._log_probs(self.model, batch), width))
            if args.beta > 0:
                ref.append(self._pad(self._reference_log_probs(batch), width))
        if old:
            rollout["old_logp"] = torch.cat(old)
        if ref:
            rollout["ref_logp"] = torch.cat(ref)

    @staticmethod
    def _pad(values: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(values, (0, width - values.shape[1])).cpu()

    def _reference_log_probs(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self._log_probs(self.ref_model, batch)
        from gazelle.lora.inject import adapters_disabled

        with adapters_disabled(self.model):
            return self._log_probs(self.model, batch)

    # -- loss ---------------------------------------------------------------------------------
    def step_normalizer(self, batches: list[dict]) -> float:
        kind = self.args.loss_type
        if kind in ("grpo", "dr_grpo"):
            return float(sum(len(b["advantages"]) for b in batches))
        if kind == "bnpo":
            return float(len(batches))
        return max(float(sum(int(b["completion_mask"].sum()) for b in batches)), 1.0)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.args
        logp, entropy = self._log_probs(self.model, batch, with_entropy=True)
        result = policy_loss(logp, batch.get("old_logp"), batch["advantages"], batch["completion_mask"],
                             loss_type=args.loss_type, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                             importance_sampling_level=args.importance_sampling_level, beta=args.beta,
                             ref_logp=batch.get("ref_logp"), max_completion_length=args.max_completion_length)
        stats = self._loss_stats
        mask = batch["completion_mask"].float()
        self._window_tokens += int(batch["attention_mask"].sum())  # prompt once + completions: what was computed
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0.0) + float(value)
        stats["entropy"] = stats.get("entropy", 0.0) + float((entropy * mask).sum())
        return result.numerator, result.denominator

    # -- logging ------------------------------------------------------------------------------
    def log_extras(self) -> dict:
        record: dict = {}
        if self._rollout_stats:
            keys = self._rollout_stats[0].keys()
            record = {k: sum(s[k] for s in self._rollout_stats) / len(self._rollout_stats) for k in keys}
            record["prompts_truncated"] = sum(s["prompts_truncated"] for s in self._rollout_stats)
            generation = sum(s["generation_seconds"] for s in self._rollout_stats)
            seconds = time.perf_counter() - self._window_started - generation
            record["train_tokens_per_second"] = self._window_tokens / max(seconds, 1e-9)
        stats, self._loss_stats, self._rollout_stats = self._loss_stats, {}, []
        self._window_started, self._window_tokens = time.perf_counter(), 0
        if stats:
            tokens = max(stats["tokens"], 1.0)
            record.update({"clip_ratio/low_mean": stats["clip_low"] / tokens,
                           "clip_ratio/high_mean": stats["clip_high"] / tokens,
                           "clip_ratio/region_mean": stats["clip_region"] / tokens,
                           "entropy": stats["entropy"] / tokens})
            if self.args.beta > 0:
                record["kl"] = stats["kl"] / tokens
        if self._reward_failures:
            record["reward_failures"] = dict(self._reward_failures)
        if record:
            self.reward_history.append({"step": self.global_step, **record})
            parts = [f"reward {record['reward']:.3f} ± {record['reward_std']:.3f}"] if "reward" in record else []
            parts += [f"{k.split('/')[1]} {v:.3f}" for k, v in record.items() if k.startswith("rewards/")
                      and k.endswith("/mean")]
            if "completions/mean_length" in record:
                parts.append(f"length {record['completions/mean_length']:.0f}")
                parts.append(f"gen {record['generation_tokens_per_second']:.0f} tok/s")
                parts.append(f"train {record['train_tokens_per_second']:.0f} tok/s")
            log.info("step %d  %s", self.global_step, "  ".join(parts))
        for prompt, text, reward in self._samples:
            question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            log.info("  sample (reward %.2f)  %s\n    -> %s", reward, question[-120:].replace("\n", " "),
                     text[:300].replace("\n", " | "))
        self._samples = []
        return record

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: list[int] | None = None) -> dict:
        """Greedy completions for the eval_dataset, scored by the reward functions: their means and the total."""
        if self.eval_rows is None:
            return {}
        indices = rows if rows is not None else list(range(len(self.eval_rows)))
        size = max(self._prompts_per_rollout(), 8)
        totals, per_function = [], []
        for first in range(0, len(indices), size):
            out = self.rollout(indices[first : first + size], seed=0, split="eval", params=SamplingParams(), n=1)
            totals.append(out["total"])
            per_function.append(out["rewards"])
        total, scores = torch.cat(totals), torch.cat(per_function)
        record = {"eval_reward": total.mean().item()}
        for i, fn in enumerate(self.reward_funcs):
            column = scores[:, i]
            present = column[~column.isnan()]
            record[f"eval_rewards/{_name(fn)}"] = present.mean().item() if present.numel() else float("nan")
        return record

    def _plot(self) -> None:
        """loss.png, and reward.png: total and per-function reward and completion length per step (from
        metrics.jsonl, so a resumed run plots its whole history)."""
        super()._plot()
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            history = [r for r in map(json.loads, f) if "reward" in r]
        if not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in history]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        top.plot(steps, [h["reward"] for h in history], label="total", linewidth=2)
        for fn in self.reward_funcs:
            key = f"rewards/{_name(fn)}/mean"
            top.plot(steps, [h.get(key, float("nan")) for h in history], label=_name(fn), alpha=0.7)
        top.set_ylabel("reward")
        top.legend(fontsize=7)
        bottom.plot(steps, [h["completions/mean_length"] for h in history])
        bottom.set_ylabel("completion length")
        bottom.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(self.args.output_dir, "reward.png"), dpi=100)
        plt.close(fig)

    def resolved_config(self) -> dict:
        return {**self.args.to_dict(), "reward_funcs": [_name(f) for f in self.reward_funcs]}
