"""Dataset plumbing shared by the trainers: local files, column checks, uniform row access, Alpaca text."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from gazelle.errors import GazelleError

# The Alpaca prompt as Unsloth's Alpaca notebook fills it: instruction, input, response.
alpaca_prompt = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)

# File extension -> the `datasets` packaged builder that reads it (JSON Lines is read by the json builder).
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def format_alpaca(row: Mapping[str, Any], eos_token: str) -> str:
    """An Alpaca row (instruction, optional input, output) -> training text ending in `eos_token`.

    The EOS is what teaches the model to stop after its response.
    """
    for column in ("instruction", "output"):
        if column not in row:
            raise GazelleError(f"Alpaca row has no {column!r} column; it has: {_names(row)}")
    return alpaca_prompt.format(row["instruction"], row.get("input") or "", row["output"]) + eos_token


def load_dataset_file(path: str | os.PathLike, split: str = "train"):
    """A local .json, .jsonl, .csv or .parquet file -> `datasets.Dataset`."""
    import datasets

    path = os.path.expanduser(os.fspath(path))
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise GazelleError(f"cannot read {path}: unknown extension {ext or '(none)'!r}; use one of {', '.join(FILE_BUILDERS)}")
    if not os.path.isfile(path):
        raise GazelleError(f"dataset file {path} not found")
    try:
        return datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, split=split)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        while e.__cause__ is not None:  # datasets wraps the parser's error, which is the one that says what is wrong
            e = e.__cause__
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GazelleError(f"cannot read {path} as {ext[1:]}: {reason}") from None


def column_names(dataset) -> list[str]:
    """The columns of a Dataset, or the keys every row of a list of dicts has (in the first row's order)."""
    if hasattr(dataset, "column_names") and not isinstance(dataset.column_names, dict):
        return list(dataset.column_names or [])
    if isinstance(dataset, Mapping):
        # A DatasetDict (or any dict of splits) is the usual slip: load_dataset without split=.
        raise GazelleError(f"expected one split, got a dict of splits {list(dataset)}; pick one, e.g. dataset['train']")
    rows_ = list(rows(dataset))
    if not rows_:
        return []
    return [name for name in rows_[0] if all(name in row for row in rows_[1:])]


def require_columns(dataset, columns: Iterable[str], what: str) -> None:
    """Raise naming the first column `what` needs that the dataset lacks, listing the ones it has."""
    available = column_names(dataset)
    for column in columns:
        if column not in available:
            raise GazelleError(f"{what} needs column {column!r}; the dataset has: {_names(available)}")


def rows(dataset) -> Iterator[dict]:
    """Iterate the rows of a `datasets.Dataset` or a list of dicts as dicts."""
    if isinstance(dataset, Mapping):
        raise GazelleError(f"expected rows, got a dict with keys {list(dataset)}; pass a Dataset or a list of dicts")
    for i, row in enumerate(dataset):
        if not isinstance(row, Mapping):
            raise GazelleError(f"row {i} is a {type(row).__name__}, not a dict of columns")
        yield dict(row)


def _names(columns: Sequence[str] | Mapping) -> str:
    return ", ".join(map(str, columns)) or "(no columns)"
