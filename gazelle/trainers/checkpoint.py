"""Training checkpoints: written whole or not at all, read back without pickle.

A checkpoint folder holds trainable.safetensors (the parameters being trained, by name),
optimizer.safetensors + the JSON parts of the optimizer state, rng.safetensors, and
trainer_state.json (step, data position, scheduler, python RNG, the model's fingerprint and the
resolved config). It is written under a temporary name and renamed, so a crash or a kill leaves the
previous checkpoint whole and never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from gazelle.errors import GazelleError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def fingerprint(model) -> dict:
    """What a checkpoint must match to be resumed into this model."""
    cfg = model.config
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    return {"family": cfg.family, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
            "vocab_size": cfg.vocab_size, "trainable": trainable}


def _optimizer_parts(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Split optimizer.state_dict() into named tensors and JSON (numbers, param groups)."""
    state = optimizer.state_dict()
    tensors, numbers = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{names[index]}::{key}"] = value.detach().contiguous().cpu()
            else:
                numbers[f"{names[index]}::{key}"] = value
    return tensors, {"numbers": numbers, "param_groups": state["param_groups"]}


def _param_index_names(optimizer: torch.optim.Optimizer, model) -> dict[int, str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: by_id[id(p)] for i, p in enumerate(flat)}


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return tensors


def save_checkpoint(directory: str, model, optimizer, scheduler, state: dict, extra_save=None) -> str:
    """Write checkpoint `directory` atomically; `extra_save(tmp_dir)` may add files (e.g. the adapter)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, os.path.join(tmp, "trainable.safetensors"))
    names = _param_index_names(optimizer, model)
    tensors, json_part = _optimizer_parts(optimizer, names)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng_tensors(), os.path.join(tmp, "rng.safetensors"))
    full_state = {
        **state,
        "optimizer": json_part,
        "scheduler": scheduler.state_dict(),
        "python_rng": _jsonable(random.getstate()),
        "fingerprint": fingerprint(model),
    }
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(full_state, f, indent=1, default=str)
    if extra_save is not None:
        extra_save(tmp)
    _fsync_dir(tmp)
    if os.path.exists(directory):  # re-saving the same step: swap, then drop the old one
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value):
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest first (temporary folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)
            if os.path.isfile(os.path.join(output_dir, name, STATE_FILE))]


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    if keep is None:
        return
    for path in list_checkpoints(output_dir)[:-keep] if keep > 0 else list_checkpoints(output_dir):
        shutil.rmtree(path)


def load_checkpoint(directory: str, model, optimizer, scheduler) -> dict:
    """Restore parameters, optimizer, scheduler and RNG from `directory`; returns the trainer state."""
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(state_path):
        raise GazelleError(f"{directory} is not a gazelle checkpoint (no {STATE_FILE})")
    with open(state_path) as f:
        state = json.load(f)
    expected, found = fingerprint(model), state.get("fingerprint", {})
    if expected != found:
        differing = sorted(k for k in expected if expected.get(k) != found.get(k))
        raise GazelleError(
            f"{directory} was saved from another model or adapter setup (differs in {', '.join(differing)}); "
            "resume with the model and LoRA settings it was trained with, or start a new output_dir"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(os.path.join(directory, "trainable.safetensors")).items():
            params[name].copy_(value)
    names = _param_index_names(optimizer, model)
    index_of = {n: i for i, n in names.items()}
    tensors = load_file(os.path.join(directory, "optimizer.safetensors"))
    entries: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.split("::")
        entries.setdefault(index_of[name], {})[field] = value
    for key, value in state["optimizer"]["numbers"].items():
        name, field = key.split("::")
        entries.setdefault(index_of[name], {})[field] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(os.path.join(directory, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_tupled(state["python_rng"]))
    return state
