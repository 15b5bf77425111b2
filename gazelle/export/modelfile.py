"""An Ollama Modelfile next to an exported GGUF: FROM, TEMPLATE, PARAMETER stop and SYSTEM.

Ollama renders prompts with Go's text/template, given `.System` (the system messages joined, or the
Modelfile's SYSTEM when a request has none) and `.Messages` (each with `.Role` and `.Content`). The
chat formats below are written once as data; each becomes a Go template, and is accepted for a
tokenizer only after rendering probe conversations the same way its Jinja chat template does.

Supported formats: chatml (Qwen 2/2.5/3, SmolLM2), llama-3, llama-3.1, mistral, gemma, phi-3. A chat
template that matches none of them, or differs from the one it resembles, gets a Modelfile without
TEMPLATE (Ollama then picks a template from the GGUF's own tokenizer.chat_template) and a warning:
an export never fails over the Modelfile.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from gazelle.errors import GazelleError
from gazelle.utils.logging import get_logger

log = get_logger(__name__)
S, C = "{S}", "{C}"  # where the system text and a message's content go in a format's pieces


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as the pieces around each turn; "{eos}" stands for the tokenizer's EOS text."""

    name: str
    markers: tuple[str, ...]
    """Texts whose presence in a Jinja chat template identifies the format (all must occur)."""
    user: str
    generation: str
    """What opens an assistant turn (the generation prompt)."""
    assistant_end: str
    """What closes an assistant turn: the assistant turn is generation + content + assistant_end."""
    system: str = ""
    """A system turn (with {S}); empty when the format puts the system text into the first user turn instead."""
    system_in_user: str = ""
    """For formats without a system turn: what precedes the first user message's content ({S})."""
    always_system: bool = False
    """The system turn is written even without a system message (llama-3.1's date header)."""
    stop: tuple[str, ...] = ()


FORMATS = (
    ChatFormat(
        "llama-3.1", ("<|start_header_id|>", "Cutting Knowledge Date"),
        user="<|start_header_id|>user<|end_header_id|>\n\n{C}<|eot_id|>",
        generation="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_end="<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               "Today Date: 26 Jul 2024\n\n{S}<|eot_id|>",
        always_system=True, stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFormat(
        "llama-3", ("<|start_header_id|>",),
        user="<|start_header_id|>user<|end_header_id|>\n\n{C}<|eot_id|>",
        generation="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_end="<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>",
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFormat(
        "chatml", ("<|im_start|>",),
        user="<|im_start|>user\n{C}<|im_end|>\n", generation="<|im_start|>assistant\n", assistant_end="<|im_end|>\n",
        system="<|im_start|>system\n{S}<|im_end|>\n", stop=("<|im_start|>", "<|im_end|>"),
    ),
    ChatFormat(
        "mistral", ("[INST]",),
        user="[INST] {C} [/INST]", generation="", assistant_end="{eos}", system_in_user="{S}\n\n",
        stop=("[INST]", "[/INST]"),
    ),
    ChatFormat(
        "gemma", ("<start_of_turn>",),
        user="<start_of_turn>user\n{C}<end_of_turn>\n", generation="<start_of_turn>model\n",
        assistant_end="<end_of_turn>\n", system_in_user="{S}\n\n", stop=("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatFormat(
        "phi-3", ("<|assistant|>", "<|end|>"),
        user="<|user|>\n{C}<|end|>\n", generation="<|assistant|>\n", assistant_end="<|end|>\n",
        system="<|system|>\n{S}<|end|>\n", stop=("<|end|>", "<|user|>", "<|assistant|>"),
    ),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
# Model families -> the format their instruct checkpoints use (for `family=` when a tokenizer has no template).
FAMILY_FORMATS = {"llama": "llama-3", "mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml", "gemma2": "gemma",
                  "gemma3_text": "gemma", "gemma3": "gemma", "phi3": "phi-3"}
# Probe conversations: distinctive texts that no template adds or trims.
PROBE_SYSTEM, PROBE_TURNS = "Probe system text.", ("First probe question?", "First probe answer.", "Second probe question?")


def write_modelfile(
    directory: str | os.PathLike,
    gguf_filename: str,
    tokenizer,
    system: str | None = None,
    family: str | None = None,
) -> str:
    """Write `directory`/Modelfile for `gguf_filename` (a file in that folder); returns its path.

    system: the SYSTEM line (the default system message when a request has none). Without it, a chat
        template that inserts a default system message (Qwen 2.5, SmolLM2) gets that message as SYSTEM.
    family: a format name (chatml, llama-3, llama-3.1, mistral, gemma, phi-3) or a model family (qwen2,
        gemma2, ...) to use instead of detecting the format from the tokenizer's chat template; it is still
        checked against the template when the tokenizer has one.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, gguf_filename)):
        raise GazelleError(f"Modelfile: {gguf_filename} is not in {directory}; write the GGUF first")
    lines = [f"FROM ./{gguf_filename}", ""]
    chat_format, default_system, reason = _match_format(tokenizer, family)
    eos = getattr(tokenizer, "eos_token", None) or ""
    if chat_format is not None:
        lines += [f'TEMPLATE """{go_template(chat_format, _literal_prefix(tokenizer), eos)}"""', ""]
        stops = [*chat_format.stop, eos]
    else:
        log.warning("Modelfile without TEMPLATE: %s; Ollama will choose a template from the GGUF's chat template", reason)
        lines += [f"# TEMPLATE left out: {reason}; Ollama takes it from the GGUF's tokenizer.chat_template", ""]
        stops = [eos]
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(s for s in stops if s)]
    system = system if system is not None else default_system
    if system:
        if '"""' in system:
            raise GazelleError('Modelfile: the system message cannot contain """ (the Modelfile quote)')
        lines += ["", f'SYSTEM """{system}"""']
    path = os.path.join(directory, "Modelfile")
    fd, tmp = tempfile.mkstemp(prefix=".Modelfile.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def go_template(chat_format: ChatFormat, prefix: str = "", eos: str = "") -> str:
    """The format as an Ollama (Go text/template) TEMPLATE.

    Each user turn is followed by the generation prompt, and an assistant turn is its content and closing
    piece, so a conversation ending in a user message ends with the generation prompt. Messages of other
    roles are skipped: system text comes from .System, which Ollama fills from the system messages.
    """
    fill = lambda piece, value: piece.replace("{eos}", eos).replace(S, value).replace(C, value)
    out = prefix
    if chat_format.system:
        turn = fill(chat_format.system, "{{ .System }}")
        out += turn if chat_format.always_system else "{{ if .System }}" + turn + "{{ end }}"
    user_open, _, user_close = chat_format.user.partition(C)
    first = "{{ $first := true }}" if chat_format.system_in_user else ""
    out += first + "{{ range .Messages }}{{ if eq .Role \"user\" }}" + fill(user_open, "")
    if chat_format.system_in_user:  # the system text opens the first user message
        out += "{{ if and $first $.System }}" + fill(chat_format.system_in_user, "{{ $.System }}") + "{{ end }}"
        out += "{{ $first = false }}"
    out += "{{ .Content }}" + fill(user_close + chat_format.generation, "")
    out += "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + fill(chat_format.assistant_end, "")
    return out + "{{ end }}{{ end }}"


def render(chat_format: ChatFormat, messages: list[dict], prefix: str = "", eos: str = "") -> str:
    """What go_template renders for `messages` ending in a user turn (Python twin, for the probe check)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    fill = lambda piece, content: piece.replace("{eos}", eos).replace(S, system).replace(C, content)
    out = prefix
    if chat_format.system and (system or chat_format.always_system):
        out += fill(chat_format.system, "")
    first = True
    for message in messages:
        if message["role"] == "user":
            lead = fill(chat_format.system_in_user, "") if first and system and chat_format.system_in_user else ""
            user_open, _, user_close = chat_format.user.partition(C)
            out += fill(user_open, "") + lead + message["content"] + fill(user_close + chat_format.generation, "")
            first = False
        elif message["role"] == "assistant":
            out += message["content"] + fill(chat_format.assistant_end, "")
    return out


def _match_format(tokenizer, family: str | None) -> tuple[ChatFormat | None, str | None, str]:
    """(format, default system message, reason when None) for a tokenizer's chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if family is not None:
        name = FAMILY_FORMATS.get(family, family)
        if name not in FORMAT_NAMES:
            raise GazelleError(f"Modelfile: unknown chat format {family!r}; use one of {', '.join(FORMAT_NAMES)} "
                               f"or a model family ({', '.join(FAMILY_FORMATS)})")
        candidates = [f for f in FORMATS if f.name == name]
        if not template:
            return candidates[0], None, ""
    elif not template:
        return None, None, "the tokenizer has no chat template"
    else:
        candidates = [f for f in FORMATS if all(m in template for m in f.markers)][:1]
        if not candidates:
            return None, None, f"its chat template is none of the supported formats ({', '.join(FORMAT_NAMES)})"
    chat_format = candidates[0]
    default_system, problem = _check(chat_format, tokenizer)
    if problem:
        return None, None, f"the chat template looks like {chat_format.name} but {problem}"
    return chat_format, default_system, ""


def _jinja(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check(chat_format: ChatFormat, tokenizer) -> tuple[str | None, str]:
    """Render probe conversations with the Jinja template and the format; (default system message, problem)."""
    prefix, eos = _literal_prefix(tokenizer), getattr(tokenizer, "eos_token", None) or ""
    turns = [{"role": role, "content": text} for role, text in zip(("user", "assistant", "user"), PROBE_TURNS)]
    with_system = [{"role": "system", "content": PROBE_SYSTEM}, *turns]
    try:
        expected = _strip_bos(tokenizer, _jinja(tokenizer, with_system))
    except Exception:  # noqa: BLE001 - some templates refuse a system role (Gemma 2); then only chats without one
        expected = None
    if expected is not None and expected != render(chat_format, with_system, prefix, eos):
        return None, "renders a conversation with a system message differently"
    expected = _strip_bos(tokenizer, _jinja(tokenizer, turns))
    if expected == render(chat_format, turns, prefix, eos):
        return None, ""
    default = _default_system(chat_format, expected, prefix, eos)
    if default is not None and expected == render(chat_format, [{"role": "system", "content": default}, *turns],
                                                   prefix, eos):
        return default, ""
    return None, "renders a conversation without a system message differently"


def _default_system(chat_format: ChatFormat, rendered: str, prefix: str, eos: str) -> str | None:
    """The system text a template inserts by itself, read from where the format puts system text."""
    if chat_format.system:
        before, _, after = chat_format.system.partition(S)
    else:
        before, _, after = (chat_format.user.partition(C)[0] + chat_format.system_in_user).partition(S)
    before, after = prefix + before.replace("{eos}", eos), after.replace("{eos}", eos)
    if not rendered.startswith(before) or after not in rendered[len(before):]:
        return None
    return rendered[len(before): rendered.index(after, len(before))] or None


def _auto_bos(tokenizer) -> str:
    """The BOS text when encoding adds BOS by itself (llama.cpp and Ollama do the same from the GGUF), else ''."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    return bos if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def _strip_bos(tokenizer, text: str) -> str:
    bos = _auto_bos(tokenizer)
    return text[len(bos):] if bos and text.startswith(bos) else text


def _literal_prefix(tokenizer) -> str:
    """A BOS the chat template writes but tokenization does not add must be written by the TEMPLATE itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or _auto_bos(tokenizer) or "bos_token" not in str(template):
        return ""
    probe = _jinja(tokenizer, [{"role": "user", "content": PROBE_TURNS[0]}])
    return bos if probe.startswith(bos) else ""
