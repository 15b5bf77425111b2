"""Chat formats of the common model families, ShareGPT conversion, and response-only labels.

Every template in CHAT_TEMPLATES follows one convention so that get_chat_template can adapt it:
it starts with `{% set default_system_message = '...' %}` (empty where the format has none) and reads
messages through `message['role']` / `message['content']` with roles system, user and assistant.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gazelle.data.formats import require_columns, rows
from gazelle.errors import GazelleError
from gazelle.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}
IGNORE_INDEX = -100


def _head(default_system: str = "") -> str:
    """Splits a leading system message off into `system_message`; the rest of the chat is `turns`."""
    return (
        "{% set default_system_message = " + repr(default_system) + " %}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system_message = default_system_message %}{% set turns = messages %}{% endif %}"
    )


def _only(role: str) -> str:
    return "{{ raise_exception('this chat format has no role ' + message['role'] + '; use " + role + "') }}"


# Raw strings throughout: Jinja decodes the \n escapes inside its own string literals.
CHATML = _head() + (
    r"{% if system_message %}{{ '<|im_start|>system\n' + system_message + '<|im_end|>\n' }}{% endif %}"
    r"{% for message in turns %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25 = CHATML.replace(_head(), _head("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."))

_LLAMA3_TURNS = (
    r"{% for message in turns %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3 = _head() + (
    r"{{ bos_token }}{% if system_message %}"
    r"{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system_message | trim + '<|eot_id|>' }}{% endif %}"
) + _LLAMA3_TURNS

# Llama 3.1 always writes a system header carrying the knowledge cutoff and a date (date_string, which the
# caller may pass; Meta's template defaults it to 26 Jul 2024), then the system message, possibly empty.
LLAMA31 = _head() + (
    r"{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    r"{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    r"Today Date: ' + date_string + '\n\n' + system_message | trim + '<|eot_id|>' }}"
) + _LLAMA3_TURNS

# Mistral has no system role: the system text opens the first user turn, as Llama 2 did.
MISTRAL = _head() + (
    r"{{ bos_token }}{% set prefix = system_message + '\n\n' if system_message else '' %}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}"
    r"{{ '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
)

ZEPHYR = _head() + (
    r"{% if system_message %}{{ '<|system|>\n' + system_message + eos_token + '\n' }}{% endif %}"
    r"{% for message in turns %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Phi-3 (and 3.5) is Zephyr's layout with its own <|end|> closing every turn.
PHI3 = ZEPHYR.replace("eos_token", "'<|end|>'")

PHI4 = _head() + (
    r"{% if system_message %}{{ '<|im_start|>system<|im_sep|>' + system_message + '<|im_end|>' }}{% endif %}"
    r"{% for message in turns %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Multi-turn Alpaca: the preamble, then alternating Instruction / Response sections.
ALPACA = _head("Below is an instruction that describes a task. Write a response that appropriately completes the request.") + (
    r"{% if system_message %}{{ system_message + '\n\n' }}{% endif %}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# FastChat's vicuna_v1.1: "SYSTEM USER: u ASSISTANT: a</s>USER: u ASSISTANT:".
VICUNA = _head(
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
) + (
    r"{% if system_message %}{{ system_message + ' ' }}{% endif %}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    r"{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# FastChat's vicuna_v0: "### Human:" / "### Assistant:" lines; the assistant's line ends in EOS.
VICUNA_OLD = _head(
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
) + (
    r"{% if system_message %}{{ system_message + '\n' }}{% endif %}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + eos_token + '\n' }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)

# Gemma has no system role: its template puts the system text, then a blank line, at the top of the first turn.
GEMMA = _head() + (
    r"{{ bos_token }}{% set prefix = system_message + '\n\n' if system_message else '' %}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}"
    r"{{ '<start_of_turn>user\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '<start_of_turn>model\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# DeepSeek-R1: the generation prompt opens the reasoning block ("<think>\n") so the model always reasons first.
# Assistant turns are written as given (reasoning included): training data should keep its <think> part.
DEEPSEEK_R1 = _head() + (
    r"{{ bos_token }}{{ system_message }}"
    r"{% for message in turns %}{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    r"{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    r"{% else %}" + _only("user or assistant") + "{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)

# name -> (template, end-of-turn token to make the EOS; None where the template ends turns in the model's own EOS).
CHAT_TEMPLATES: dict[str, tuple[str, str | None]] = {
    "chatml": (CHATML, "<|im_end|>"),
    "llama-3": (LLAMA3, "<|eot_id|>"),
    "llama-3.1": (LLAMA31, "<|eot_id|>"),
    "mistral": (MISTRAL, None),
    "zephyr": (ZEPHYR, None),
    "alpaca": (ALPACA, None),
    "vicuna": (VICUNA, None),
    "vicuna_old": (VICUNA_OLD, None),
    "gemma": (GEMMA, "<end_of_turn>"),
    "phi-3": (PHI3, "<|end|>"),
    "phi-4": (PHI4, "<|im_end|>"),
    "qwen-2.5": (QWEN25, "<|im_end|>"),
    "deepseek-r1": (DEEPSEEK_R1, "<｜end▁of▁sentence｜>"),
}
ALIASES = {
    "llama3": "llama-3", "llama-31": "llama-3.1", "gemma2": "gemma", "gemma-3": "gemma", "gemma3": "gemma",
    "phi-35": "phi-3", "qwen25": "qwen-2.5", "qwen2.5": "qwen-2.5",
}
CHAT_TEMPLATES.update({alias: CHAT_TEMPLATES[name] for alias, name in ALIASES.items()})

_DEFAULT_SYSTEM = re.compile(r"""(\{%-?\s*set default_system_message = )('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _remap(mapping: Mapping[str, str]) -> str:
    """A template prelude that rewrites `messages` from the dataset's keys and role names into role/content."""
    roles = {mapping.get(r, r): r for r in ("user", "assistant", "system")}
    role, content = repr(mapping.get("role", "role")), repr(mapping.get("content", "content"))
    return (
        "{% set remapped = namespace(messages=[]) %}{% for m in messages %}"
        f"{{% set remapped.messages = remapped.messages + [{{'role': {roles!r}.get(m[{role}], m[{role}]), "
        f"'content': m[{content}]}}] %}}"
        "{% endfor %}{% set messages = remapped.messages %}"
    )


def get_chat_template(
    tokenizer,
    chat_template: str | tuple[str, str | None] = "chatml",
    mapping: Mapping[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Give `tokenizer` a chat format (a name from CHAT_TEMPLATES or a (template, eos_token) pair); returns it.

    `mapping` names the message keys and role values the data uses, e.g. ShareGPT's
    {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}. `system_message` replaces the
    format's default system message. With `map_eos_token`, the format's end-of-turn token (when the vocabulary has
    it) becomes the tokenizer's EOS, so generation and EOS-appending code stop at the end of a turn.
    """
    if isinstance(chat_template, str):
        if chat_template not in CHAT_TEMPLATES:
            raise GazelleError(
                f"unknown chat_template {chat_template!r}; known: {', '.join(sorted(CHAT_TEMPLATES))} "
                "(or pass a (jinja_template, eos_token) pair)"
            )
        template, eos = CHAT_TEMPLATES[chat_template]
    elif isinstance(chat_template, Sequence) and len(chat_template) == 2 and isinstance(chat_template[0], str):
        template, eos = chat_template
        eos = None if eos == "eos_token" else eos  # "eos_token" means: the model's own EOS
    else:
        raise GazelleError("chat_template must be a name like 'chatml' or a (jinja_template, eos_token) pair")

    if system_message is not None:
        if not _DEFAULT_SYSTEM.search(template):
            raise GazelleError(
                "system_message needs a template that starts with {% set default_system_message = '...' %}; "
                "put a system message in the conversation instead"
            )
        template = _DEFAULT_SYSTEM.sub(lambda m: m.group(1) + repr(system_message), template, count=1)
    if mapping is not None and {**DEFAULT_MAPPING, **mapping} != DEFAULT_MAPPING:
        template = _remap({**DEFAULT_MAPPING, **mapping}) + template

    tokenizer.chat_template = template
    if map_eos_token and eos is not None:
        if eos in tokenizer.get_vocab():
            tokenizer.eos_token = eos
        else:
            log.warning("the chat format ends turns with %r, which this tokenizer's vocabulary lacks; EOS unchanged", eos)
    return tokenizer


# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}


def _standardize_conversation(conversation, row: int) -> list[dict]:
    out = []
    for turn in conversation:
        if "role" in turn and "content" in turn:  # already standard
            out.append({"role": turn["role"], "content": turn["content"]})
            continue
        if "from" not in turn or "value" not in turn:
            raise GazelleError(f"row {row}: a conversations turn has keys {sorted(turn)}; expected 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise GazelleError(
                f"row {row}: unknown speaker from={turn['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def standardize_sharegpt(dataset, column: str = "conversations"):
    """ShareGPT turns {"from": "human"|"gpt"|"system", "value"} -> {"role": "user"|"assistant"|"system", "content"}.

    A Dataset comes back as a Dataset, a list of dicts as a list.
    """
    require_columns(dataset, [column], "standardize_sharegpt")
    if isinstance(dataset, list):
        return [{**row, column: _standardize_conversation(row[column], i)} for i, row in enumerate(rows(dataset))]
    return dataset.map(
        lambda row, i: {column: _standardize_conversation(row[column], i)}, with_indices=True,
        desc="standardize_sharegpt",
    )


_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_FIELD = re.compile(r"\{([^{}\n]+)\}")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _fill(prompt: str, row: Mapping[str, Any]) -> str:
    # Optional sections first: one is kept (unbracketed) only when every column it names has a value.
    prompt = _OPTIONAL.sub(lambda m: "" if any(_empty(row[c]) for c in _FIELD.findall(m.group(1))) else m.group(1), prompt)
    return _FIELD.sub(lambda m: str(row[m.group(1)]), prompt)


def to_sharegpt(
    dataset,
    merged_prompt: str = "{instruction}[[\nYour input is:\n{input}]]",
    output_column_name: str = "output",
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """Columns -> a "conversations" column of human/gpt turns: the prompt filled from `merged_prompt`, then the output.

    `{column}` fields are filled from the row; a `[[...]]` section is dropped when a column it names is empty.
    With conversation_extension=N each conversation continues with the turns of N-1 other rows, chosen by
    seeded shuffles so the result is reproducible. Returns a Dataset for a Dataset, a list for a list.
    """
    if conversation_extension < 1:
        raise GazelleError(f"conversation_extension must be >= 1, got {conversation_extension}")
    needed = list(dict.fromkeys(_FIELD.findall(merged_prompt) + [output_column_name]))
    require_columns(dataset, needed, "to_sharegpt")

    pairs = [
        [{"from": "human", "value": _fill(merged_prompt, row)}, {"from": "gpt", "value": str(row[output_column_name])}]
        for row in rows(dataset)
    ]
    rng = random.Random(random_state)
    orders = []
    for _ in range(conversation_extension - 1):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        orders.append(order)
    conversations = [pairs[i] + [turn for order in orders for turn in pairs[order[i]]] for i in range(len(pairs))]

    if isinstance(dataset, list):
        return [{"conversations": c} for c in conversations]
    import datasets

    return datasets.Dataset.from_dict({"conversations": conversations})


def format_conversations(rows_or_batch, tokenizer, column: str = "conversations") -> list[str]:
    """Render each row's conversation with the tokenizer's chat template (no generation prompt).

    Takes a batch dict as `Dataset.map(batched=True)` passes it, a Dataset, or a list of dicts.
    """
    if isinstance(rows_or_batch, Mapping):
        if column not in rows_or_batch:
            raise GazelleError(f"format_conversations needs column {column!r}; the batch has: {', '.join(rows_or_batch)}")
        conversations = rows_or_batch[column]
    else:
        require_columns(rows_or_batch, [column], "format_conversations")
        conversations = [row[column] for row in rows(rows_or_batch)]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations]


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A prompt's token ids for generation: a chat (message list) through the chat template with the generation
    prompt; a string as it is, with the tokenizer's special tokens unless it already starts with BOS."""
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    if not isinstance(prompt, list):
        raise GazelleError(f"'prompt' is a {type(prompt).__name__}; use a string or a list of {{'role', 'content'}} "
                           "messages")
    if not tokenizer.chat_template:
        raise GazelleError("the prompt is a chat but the tokenizer has no chat template; set one with "
                           "gazelle.chat_templates.get_chat_template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _find(ids: list[int], part: list[int], start: int) -> bool:
    return ids[start:start + len(part)] == part


def response_only_labels(
    input_ids: list[int], instruction_ids: list[int], response_ids: list[int], ignore_index: int = IGNORE_INDEX
) -> list[int]:
    """Labels that train only on responses: the tokens after each `response_ids` match, up to the next
    `instruction_ids` match; everything else (markers included) is `ignore_index`."""
    labels = [ignore_index] * len(input_ids)
    in_response, i = False, 0
    while i < len(input_ids):
        if _find(input_ids, response_ids, i):
            in_response, i = True, i + len(response_ids)
        elif in_response and _find(input_ids, instruction_ids, i):
            in_response, i = False, i + len(instruction_ids)
        else:
            if in_response:
                labels[i] = input_ids[i]
            i += 1
    return labels


class ResponseOnlyLabels:
    """`input_ids -> labels` for a trainer; counts the rows that end up with nothing to train on."""

    def __init__(self, instruction_ids: list[int], response_ids: list[int]):
        self.instruction_ids, self.response_ids = instruction_ids, response_ids
        self.rows = self.rows_without_response = 0

    def __call__(self, input_ids: list[int]) -> list[int]:
        labels = response_only_labels(list(input_ids), self.instruction_ids, self.response_ids)
        self.rows += 1
        if all(label == IGNORE_INDEX for label in labels):
            if not self.rows_without_response:  # a wrong response_part would silently train on nothing: say so once
                log.warning("a row has no response_part tokens, so nothing in it is trained on (more may follow)")
            self.rows_without_response += 1
        return labels


def _encode_part(tokenizer, text: str, name: str) -> list[int]:
    if not text:
        raise GazelleError(f"{name} is empty; pass the text that opens that turn in the chat template")
    return list(tokenizer.encode(text, add_special_tokens=False))


def train_on_responses_only(trainer_or_dataset, instruction_part: str, response_part: str, tokenizer=None):
    """Train only on the assistant turns: every other token's label becomes -100.

    `instruction_part` / `response_part` are the texts that open a user / assistant turn in the chat template,
    e.g. "<|im_start|>user\\n" and "<|im_start|>assistant\\n"; they are matched as token sequences. A trainer gets
    the masking through `add_label_transform` and is returned; a Dataset or list of dicts with "input_ids"
    comes back with a "labels" column.
    """
    target = trainer_or_dataset
    is_trainer = hasattr(target, "add_label_transform")
    tokenizer = tokenizer or (getattr(target, "tokenizer", None) if is_trainer else None)
    if tokenizer is None:
        raise GazelleError("train_on_responses_only needs tokenizer= to encode instruction_part and response_part")
    instruction_ids = _encode_part(tokenizer, instruction_part, "instruction_part")
    response_ids = _encode_part(tokenizer, response_part, "response_part")
    if is_trainer:
        target.add_label_transform(ResponseOnlyLabels(instruction_ids, response_ids))
        return target

    require_columns(target, ["input_ids"], "train_on_responses_only")

    def add_labels(row):
        return {"labels": response_only_labels(list(row["input_ids"]), instruction_ids, response_ids)}

    if isinstance(target, list):
        result = [{**row, **add_labels(row)} for row in rows(target)]
    else:
        result = target.map(add_labels, desc="train_on_responses_only")
    empty = sum(all(label == IGNORE_INDEX for label in row["labels"]) for row in rows(result))
    if empty and empty == len(result):
        raise GazelleError(
            f"response_part {response_part!r} occurs in none of the {len(result)} rows; "
            "it must be the exact text that opens an assistant turn in the chat template"
        )
    if empty:
        log.warning("%d of %d rows contain no response_part %r and train on nothing", empty, len(result), response_part)
    return result
