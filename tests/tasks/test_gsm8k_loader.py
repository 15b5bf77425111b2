import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.gsm8k import SYSTEM_PROMPT
from gazelle.tasks.gsm8k import load_gsm8k

RECORDS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72"},
    {"question": "A car costs $1,080 more than a bike. ...", "answer": "1000 + 80 = 1080\n#### 1,080"},
    {"question": "What is the change?", "answer": "It is $5 less.\n#### $-5"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats(tmp_path):
    jsonl = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    as_list = tmp_path / "train.json"
    as_list.write_text(json.dumps(RECORDS))
    lines_named_json = write_jsonl(tmp_path / "lines.json", RECORDS)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), parquet)
    for path in (jsonl, as_list, lines_named_json, parquet):
        rows = load_gsm8k(path)
        assert [r["answer"] for r in rows] == ["72", "1080", "-5"]
        assert rows[1]["question"] == RECORDS[1]["question"]
        assert rows[0]["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": RECORDS[0]["question"]}]
    assert len(load_gsm8k(jsonl, limit=2)) == 2
    assert load_gsm8k(jsonl, system_prompt=None)[2]["prompt"] == [{"role": "user", "content": "What is the change?"}]
    (tmp_path / "gaps.jsonl").write_text("\n" + json.dumps(RECORDS[0]) + "\n\n")
    assert [r["answer"] for r in load_gsm8k(tmp_path / "gaps.jsonl")] == ["72"]


def test_errors_name_file_and_row(tmp_path):
    with pytest.raises(GazelleError, match=r"GSM8K file .*missing\.jsonl not found"):
        load_gsm8k(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(GazelleError, match=r"data\.csv: unsupported extension '\.csv'; use \.jsonl, \.json, \.parquet"):
        load_gsm8k(tmp_path / "data.csv")
    no_answer = write_jsonl(tmp_path / "a.jsonl", [RECORDS[0], {"question": "q", "solution": "#### 1"}])
    with pytest.raises(GazelleError, match=r"a\.jsonl: line 2 has no 'answer' column; it has: question, solution"):
        load_gsm8k(no_answer)
    no_hash = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(GazelleError, match=r'b\.jsonl: line 1: the answer has no final "#### <number>" line'):
        load_gsm8k(no_hash)
    (tmp_path / "c.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(GazelleError, match=r"c\.jsonl: line 2 is not valid JSON"):
        load_gsm8k(tmp_path / "c.jsonl")
    (tmp_path / "d.json").write_text(json.dumps(["not an object"]))
    with pytest.raises(GazelleError, match=r"d\.json: row 0 is a str, not an object"):
        load_gsm8k(tmp_path / "d.json")
    pq.write_table(pa.Table.from_pylist([RECORDS[0], {"question": "q", "answer": "none"}]), tmp_path / "e.parquet")
    with pytest.raises(GazelleError, match=r'e\.parquet: row 1: the answer has no final "####'):
        load_gsm8k(tmp_path / "e.parquet")
    (tmp_path / "f.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(GazelleError, match=r"cannot read .*f\.parquet as parquet"):
        load_gsm8k(tmp_path / "f.parquet")
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": 3, "answer": "#### 3"}))
    with pytest.raises(GazelleError, match=r"g\.jsonl: line 1: 'question' is a int, not text"):
        load_gsm8k(tmp_path / "g.jsonl")
    with pytest.raises(GazelleError, match="limit must be an integer >= 0 or None, got -1"):
        load_gsm8k(tmp_path / "g.jsonl", limit=-1)
