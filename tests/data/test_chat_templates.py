import copy

import datasets
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from gazelle.data.chat_templates import (
    ALIASES,
    CHAT_TEMPLATES,
    format_conversations,
    get_chat_template,
    response_only_labels,
    standardize_sharegpt,
    to_sharegpt,
    train_on_responses_only,
)
from gazelle.errors import GazelleError

CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
    {"role": "user", "content": "U3"},
]
SHAREGPT = [
    {"from": "system", "value": "S"},
    {"from": "human", "value": "U1"},
    {"from": "gpt", "value": "A1"},
]


def tiny_tokenizer(bos=None, eos=None, extra=()):
    """A WordLevel tokenizer with just the special tokens a format needs (rendering never looks at the vocab)."""
    tokens = ["[UNK]", *(t for t in (bos, eos) if t), *extra]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="[UNK]")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from gazelle.models.builtin import smollm2_gguf_path
    from gazelle.models.loading import load_tokenizer

    return load_tokenizer(smollm2_gguf_path())


@pytest.fixture
def smol(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)  # get_chat_template mutates the tokenizer


# name -> (bos, eos of the family's tokenizer, rendering of CHAT, rendering of CHAT[1:] + generation prompt)
EXPECTED = {
    "chatml": (
        None, None,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n<|im_start|>user\nU3<|im_end|>\n",
        "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n<|im_start|>user\nU3<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "llama-3": (
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU3<|eot_id|>",
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU3<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-3.1": (
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU3<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU3<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "<s>", "</s>",
        "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>[INST] U3 [/INST]",
        "<s>[INST] U1 [/INST]A1</s>[INST] U2 [/INST]A2</s>[INST] U3 [/INST]",
    ),
    "zephyr": (
        "<s>", "</s>",
        "<|system|>\nS</s>\n<|user|>\nU1</s>\n<|assistant|>\nA1</s>\n<|user|>\nU2</s>\n<|assistant|>\nA2</s>\n"
        "<|user|>\nU3</s>\n",
        "<|user|>\nU1</s>\n<|assistant|>\nA1</s>\n<|user|>\nU2</s>\n<|assistant|>\nA2</s>\n<|user|>\nU3</s>\n"
        "<|assistant|>\n",
    ),
    "alpaca": (
        "<s>", "</s>",
        "S\n\n### Instruction:\nU1\n\n### Response:\nA1</s>\n\n### Instruction:\nU2\n\n### Response:\nA2</s>\n\n"
        "### Instruction:\nU3\n\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nU1\n\n### Response:\nA1</s>\n\n### Instruction:\nU2\n\n### Response:\nA2</s>\n\n"
        "### Instruction:\nU3\n\n### Response:\n",
    ),
    "vicuna": (
        "<s>", "</s>",
        "S USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT: A2</s>USER: U3 ",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT: A2</s>USER: U3 ASSISTANT:",
    ),
    "vicuna_old": (
        "<s>", "</s>",
        "S\n### Human: U1\n### Assistant: A1</s>\n### Human: U2\n### Assistant: A2</s>\n### Human: U3\n",
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n"
        "### Human: U1\n### Assistant: A1</s>\n### Human: U2\n### Assistant: A2</s>\n### Human: U3\n### Assistant:",
    ),
    "gemma": (
        "<bos>", "<eos>",
        "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n<start_of_turn>user\nU3<end_of_turn>\n",
        "<bos><start_of_turn>user\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n<start_of_turn>user\nU3<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    "phi-3": (
        None, None,
        "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n<|assistant|>\nA2<|end|>\n"
        "<|user|>\nU3<|end|>\n",
        "<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n<|assistant|>\nA2<|end|>\n<|user|>\nU3<|end|>\n"
        "<|assistant|>\n",
    ),
    "phi-4": (
        None, None,
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>U1<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A1<|im_end|><|im_start|>user<|im_sep|>U2<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A2<|im_end|><|im_start|>user<|im_sep|>U3<|im_end|>",
        "<|im_start|>user<|im_sep|>U1<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A1<|im_end|><|im_start|>user<|im_sep|>U2<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A2<|im_end|><|im_start|>user<|im_sep|>U3<|im_end|><|im_start|>assistant<|im_sep|>",
    ),
    "qwen-2.5": (
        None, None,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n<|im_start|>user\nU3<|im_end|>\n",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n<|im_start|>user\nU3<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "deepseek-r1": (
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>S<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜>"
        "<｜User｜>U2<｜Assistant｜>A2<｜end▁of▁sentence｜><｜User｜>U3",
        "<｜begin▁of▁sentence｜><｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜>"
        "<｜User｜>U2<｜Assistant｜>A2<｜end▁of▁sentence｜><｜User｜>U3<｜Assistant｜><think>\n",
    ),
}


def test_every_template_has_an_expected_rendering():
    assert set(EXPECTED) | set(ALIASES) == set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED) + sorted(ALIASES))
def test_template_renders_the_documented_format(name):
    bos, eos, with_system, with_prompt = EXPECTED[ALIASES.get(name, name)]
    tok = get_chat_template(tiny_tokenizer(bos, eos), name)
    assert tok.apply_chat_template(CHAT, tokenize=False) == with_system
    assert tok.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=True) == with_prompt


def test_llama31_date_can_be_passed():
    tok = get_chat_template(tiny_tokenizer("<|begin_of_text|>"), "llama-3.1")
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n\nS<|eot_id|>" in text


def test_formats_without_a_role_reject_it():
    tok = get_chat_template(tiny_tokenizer("<bos>"), "gemma")
    with pytest.raises(Exception, match="no role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_unknown_template_lists_the_known_names():
    with pytest.raises(GazelleError, match=r"unknown chat_template 'llama-9'; known: .*chatml.*gemma3.*qwen2\.5"):
        get_chat_template(tiny_tokenizer(), "llama-9")


def test_system_message_replaces_the_default():
    tok = get_chat_template(tiny_tokenizer(), "qwen-2.5", system_message="Be brief.")
    assert tok.apply_chat_template(CHAT[1:2], tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
    )
    assert tok.apply_chat_template(CHAT[:2], tokenize=False).startswith("<|im_start|>system\nS<|im_end|>")
    # A format without a default gets one; quotes and newlines survive the trip through the Jinja literal.
    tok = get_chat_template(tiny_tokenizer("<bos>"), "gemma", system_message="Don't\nramble.")
    assert tok.apply_chat_template(CHAT[1:2], tokenize=False) == (
        "<bos><start_of_turn>user\nDon't\nramble.\n\nU1<end_of_turn>\n"
    )
    with pytest.raises(GazelleError, match="default_system_message"):
        get_chat_template(tiny_tokenizer(), ("{{ messages[0]['content'] }}", None), system_message="x")


def test_tuple_template_and_eos_mapping():
    tok = tiny_tokenizer(eos="</s>", extra=["<END>"])
    get_chat_template(tok, ("{% for m in messages %}{{ m['content'] }}<END>{% endfor %}", "<END>"))
    assert tok.eos_token == "<END>"
    assert tok.apply_chat_template(CHAT[1:3], tokenize=False) == "U1<END>A1<END>"


def test_map_eos_token_sets_the_end_of_turn_token(smol):
    smol.eos_token = "<|endoftext|>"
    get_chat_template(smol, "chatml", map_eos_token=False)
    assert smol.eos_token == "<|endoftext|>"
    get_chat_template(smol, "chatml")
    assert smol.eos_token == "<|im_end|>" and smol.eos_token_id == 2
    tok = get_chat_template(tiny_tokenizer(eos="</s>"), "llama-3")  # <|eot_id|> is not in this vocabulary
    assert tok.eos_token == "</s>"


def test_mapping_reads_sharegpt_keys_directly(smol):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    get_chat_template(smol, "chatml", mapping=mapping)
    assert smol.apply_chat_template(SHAREGPT, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smol.apply_chat_template(SHAREGPT, tokenize=True, return_dict=False)
    assert ids[:1] == [1] and 2 in ids  # the special tokens encode as themselves
    tok = get_chat_template(tiny_tokenizer("<bos>"), "gemma", mapping=mapping)
    assert tok.apply_chat_template(SHAREGPT, tokenize=False) == (
        "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
    )


def test_standardize_sharegpt_on_list_and_dataset():
    rows = [{"conversations": SHAREGPT, "id": 7}]
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}]
    assert standardize_sharegpt(rows) == [{"conversations": expected, "id": 7}]
    assert rows[0]["conversations"] is SHAREGPT  # the input is left alone
    ds = standardize_sharegpt(datasets.Dataset.from_list(rows))
    assert isinstance(ds, datasets.Dataset) and ds[0] == {"conversations": expected, "id": 7}
    with pytest.raises(GazelleError, match="row 0: unknown speaker from='bot'"):
        standardize_sharegpt([{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(GazelleError, match="needs column 'conversations'; the dataset has: text"):
        standardize_sharegpt([{"text": "x"}])


def test_format_conversations(smol):
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    convo = standardize_sharegpt([{"conversations": SHAREGPT}])
    assert format_conversations(convo, smol) == [expected]
    assert format_conversations({"conversations": [convo[0]["conversations"]] * 2}, smol) == [expected] * 2


# --- to_sharegpt

ALPACA_ROWS = [
    {"instruction": "Add", "input": "1 2", "output": "3"},
    {"instruction": "Greet", "input": "", "output": "Hi"},
    {"instruction": "Wait", "input": None, "output": "Ok"},
]


def test_to_sharegpt_keeps_optional_sections_only_when_filled():
    out = to_sharegpt(ALPACA_ROWS, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert [row["conversations"] for row in out] == [
        [{"from": "human", "value": "Add\nInput: 1 2"}, {"from": "gpt", "value": "3"}],
        [{"from": "human", "value": "Greet"}, {"from": "gpt", "value": "Hi"}],
        [{"from": "human", "value": "Wait"}, {"from": "gpt", "value": "Ok"}],
    ]
    ds = to_sharegpt(datasets.Dataset.from_list(ALPACA_ROWS), merged_prompt="Do: {instruction}[[ on {input}]].")
    assert ds.column_names == ["conversations"]
    assert [c[0]["value"] for c in ds["conversations"]] == ["Do: Add on 1 2.", "Do: Greet.", "Do: Wait."]


def test_to_sharegpt_conversation_extension_is_seeded():
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(6)]
    first = to_sharegpt(rows, "{q}", "a", conversation_extension=3, random_state=1)
    assert first == to_sharegpt(rows, "{q}", "a", conversation_extension=3, random_state=1)
    assert first != to_sharegpt(rows, "{q}", "a", conversation_extension=3, random_state=2)
    for i, row in enumerate(first):
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"] == f"q{i}"  # each row opens its own conversation
        # every turn pair still belongs together
        assert all(q["value"][1:] == a["value"][1:] for q, a in zip(turns[::2], turns[1::2]))
    # each shuffle is a permutation: every row appears once per position
    for position in (2, 4):
        assert sorted(row["conversations"][position]["value"] for row in first) == [f"q{i}" for i in range(6)]


def test_to_sharegpt_missing_column_is_named():
    with pytest.raises(GazelleError, match="needs column 'question'; the dataset has: instruction, input, output"):
        to_sharegpt(ALPACA_ROWS, merged_prompt="{question}")
    with pytest.raises(GazelleError, match="needs column 'answer'"):
        to_sharegpt(datasets.Dataset.from_list(ALPACA_ROWS), merged_prompt="{instruction}", output_column_name="answer")


# --- response-only labels

def test_response_only_labels_on_hand_made_ids():
    instruction, response = [7, 8], [9, 10]
    ids = [1, 7, 8, 20, 21, 9, 10, 30, 31, 2, 7, 8, 22, 9, 10, 32, 2]
    assert response_only_labels(ids, instruction, response) == (
        [-100] * 7 + [30, 31, 2] + [-100] * 5 + [32, 2]
    )
    assert response_only_labels([1, 7, 8, 9, 20], instruction, response, ignore_index=-1) == [-1] * 5  # 9 alone
    assert response_only_labels([7, 8, 20], instruction, response) == [-100] * 3


def smol_turns(tok):
    """SmolLM2's rendering of a two-answer chat, cut where the labels switch on and off."""
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": " It is 6."}]
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    pieces = [
        (system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        (" It is 6.<|im_end|>\n", True),
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "".join(piece for piece, _ in pieces)
    ids = tok.encode(text, add_special_tokens=False)
    expected = []
    for piece, trained in pieces:
        piece_ids = tok.encode(piece, add_special_tokens=False)
        expected += piece_ids if trained else [-100] * len(piece_ids)
    assert len(expected) == len(ids)  # the pieces tokenize as they do in context
    return ids, expected


def test_response_only_labels_on_smollm2_chat(smol):
    ids, expected = smol_turns(smol)
    instruction = smol.encode("<|im_start|>user\n", add_special_tokens=False)
    response = smol.encode("<|im_start|>assistant\n", add_special_tokens=False)
    labels = response_only_labels(ids, instruction, response)
    assert labels == expected
    # Each answer is trained with its <|im_end|> and the newline chatml writes after it.
    kept = smol.decode([t for t in labels if t != -100])
    assert kept == "4.<|im_end|>\n It is 6.<|im_end|>\n"


def test_train_on_responses_only_on_a_dataset(smol, capfd):
    ids, expected = smol_turns(smol)
    no_answer = smol.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    ds = datasets.Dataset.from_dict({"input_ids": [ids, no_answer]})
    out = train_on_responses_only(ds, "<|im_start|>user\n", "<|im_start|>assistant\n", tokenizer=smol)
    assert out["labels"] == [expected, [-100] * len(no_answer)]
    assert "1 of 2 rows contain no response_part" in capfd.readouterr().err
    rows = train_on_responses_only([{"input_ids": ids}], "<|im_start|>user\n", "<|im_start|>assistant\n", tokenizer=smol)
    assert rows == [{"input_ids": ids, "labels": expected}]
    with pytest.raises(GazelleError, match="occurs in none of the 1 rows"):
        train_on_responses_only([{"input_ids": ids}], "<|im_start|>user\n", "<|im_start|>bot\n", tokenizer=smol)
    with pytest.raises(GazelleError, match="needs column 'input_ids'"):
        train_on_responses_only([{"text": "x"}], "a", "b", tokenizer=smol)
    with pytest.raises(GazelleError, match="tokenizer="):
        train_on_responses_only(ds, "a", "b")


def test_train_on_responses_only_on_a_trainer(smol):
    class FakeTrainer:
        def __init__(self, tokenizer):
            self.tokenizer, self.transforms = tokenizer, []

        def add_label_transform(self, fn):
            self.transforms.append(fn)

    ids, expected = smol_turns(smol)
    trainer = FakeTrainer(smol)
    assert train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n") is trainer
    (transform,) = trainer.transforms
    assert transform(ids) == expected
    assert transform([5, 6, 7]) == [-100] * 3
    assert (transform.rows, transform.rows_without_response) == (2, 1)
