import json

import datasets
import pytest

from gazelle.data.formats import alpaca_prompt, column_names, format_alpaca, load_dataset_file, require_columns, rows
from gazelle.errors import GazelleError

ROWS = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "input": "", "output": "Hi"}]


def write(path, fmt):
    if fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        path.write_text('instruction,input,output\nAdd,1 2,3\nGreet,"",Hi\n')
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_load_dataset_file(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    write(path, fmt)
    ds = load_dataset_file(path)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["instruction", "input", "output"]
    assert [r["instruction"] for r in ds] == ["Add", "Greet"]
    assert ds[0]["input"] == "1 2" and ds[1]["output"] == "Hi"


def test_load_dataset_file_errors(tmp_path):
    with pytest.raises(GazelleError, match=r"dataset file .*nope\.jsonl not found"):
        load_dataset_file(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(GazelleError, match=r"data\.txt: unknown extension '\.txt'; use one of \.json, \.jsonl, \.csv, \.parquet"):
        load_dataset_file(tmp_path / "data.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GazelleError, match=r"cannot read .*bad\.json as json"):
        load_dataset_file(tmp_path / "bad.json")


def test_alpaca_prompt_and_format():
    assert alpaca_prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert format_alpaca(ROWS[0], "</s>") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3</s>"
    )
    assert "### Input:\n\n\n### Response:\nOk<eos>" in format_alpaca({"instruction": "W", "input": None, "output": "Ok"}, "<eos>")
    with pytest.raises(GazelleError, match="no 'output' column; it has: instruction"):
        format_alpaca({"instruction": "x"}, "</s>")


def test_columns_and_rows_on_dataset_and_list():
    ds = datasets.Dataset.from_list(ROWS)
    assert column_names(ds) == column_names(ROWS) == ["instruction", "input", "output"]
    assert column_names([{"a": 1, "b": 2}, {"a": 3}]) == ["a"]  # only what every row has
    assert list(rows(ds)) == list(rows(ROWS)) == ROWS
    require_columns(ds, ["instruction", "output"], "SFT")
    with pytest.raises(GazelleError, match="SFT needs column 'text'; the dataset has: instruction, input, output"):
        require_columns(ROWS, ["text"], "SFT")
    with pytest.raises(GazelleError, match="pick one, e.g. dataset\\['train'\\]"):
        require_columns(datasets.DatasetDict(train=ds), ["text"], "SFT")
    with pytest.raises(GazelleError, match="row 1 is a str"):
        list(rows([{"a": 1}, "b"]))
