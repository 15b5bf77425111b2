"""GSM8K-format files -> GRPO rows: {"question", "answer": "...worked solution...\\n#### 72"} -> answer "72".

Reads .jsonl (one object per line), .json (a list of objects, or JSON Lines under a .json name) and .parquet.
The final answer is the text after the last "####" with commas and "$" removed (`extract_hash_answer`). Errors name
the file and the line (.jsonl, 1-based) or row (.json, .parquet, 0-based).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from gazelle.errors import GazelleError
from gazelle.rewards.gsm8k import GSM8K_REWARDS, SYSTEM_PROMPT
from gazelle.rewards.math import extract_hash_answer
from gazelle.tasks.common import chat_prompt

EXTENSIONS = (".jsonl", ".json", ".parquet")


def load_gsm8k(path: str | os.PathLike, system_prompt: str | None = SYSTEM_PROMPT,
               limit: int | None = None) -> list[dict]:
    """Rows {"prompt": [system, user], "question", "answer": final number as text} from a local GSM8K-format file."""
    path = os.path.expanduser(os.fspath(path))
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise GazelleError(f"cannot read {path}: unsupported extension {ext or '(none)'!r}; use {', '.join(EXTENSIONS)}")
    if not os.path.isfile(path):
        raise GazelleError(f"GSM8K file {path} not found")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise GazelleError(f"load_gsm8k: limit must be an integer >= 0 or None, got {limit!r}")
    rows = []
    for where, record in _records(path, ext):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(record, dict):
            raise GazelleError(f"{path}: {where} is a {type(record).__name__}, not an object with question and answer")
        for name in ("question", "answer"):
            if name not in record:
                raise GazelleError(f"{path}: {where} has no {name!r} column; it has: {', '.join(record) or '(none)'}")
            if not isinstance(record[name], str):
                raise GazelleError(f"{path}: {where}: {name!r} is a {type(record[name]).__name__}, not text")
        answer = extract_hash_answer(record["answer"])
        if answer is None:
            raise GazelleError(f'{path}: {where}: the answer has no final "#### <number>" line')
        question = record["question"]
        rows.append({"prompt": chat_prompt(system_prompt, [], question), "question": question, "answer": answer})
    return rows


def gsm8k_rewards() -> list:
    """The rewards for GSM8K: the recipe's five (xmlcount, soft, strict, int, correctness)."""
    return list(GSM8K_REWARDS)


def _records(path: str, ext: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of the file, `where` as an error message names it."""
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise GazelleError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
        for i, record in enumerate(table.to_pylist()):
            yield f"row {i}", record
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GazelleError(f"cannot read {path}: {e}") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines under a .json name
        if isinstance(data, list):
            for i, record in enumerate(data):
                yield f"row {i}", record
            return
        if isinstance(data, dict) and "question" not in data:
            raise GazelleError(f"{path}: expected a list of objects (or one object per line), got one object "
                               f"with keys {', '.join(data)}")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GazelleError(f"{path}: line {number} is not valid JSON: {e.msg}") from None
        yield f"line {number}", record
