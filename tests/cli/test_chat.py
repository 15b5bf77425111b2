"""gazelle chat: streamed replies, the conversation kept across turns, commands, Ctrl-C, a model without a template."""

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from gazelle.cli import chat
from gazelle.cli.chat import ReplyParams, build_messages, render, reply
from gazelle.generation.sampling import SamplingParams
from tests.tiny import tiny_hf_model

QUESTIONS = ["What is 2+2?", "What did I just ask you?"]
PARAMS = ReplyParams(SamplingParams(), max_new_tokens=24)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gazelle.cli.main", "chat", *args]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from gazelle.fast import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_gguf, dtype=torch.float32, device_map="cpu")
    return FastLanguageModel.for_inference(model), tokenizer


@pytest.fixture(scope="module")
def two_turns(smollm2):
    """The two greedy replies to QUESTIONS, the first with the text pieces as on_text received them."""
    model, tokenizer = smollm2
    pieces: list[str] = []
    first = reply(model, tokenizer, build_messages([], QUESTIONS[0], None), PARAMS, pieces.append)
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first}]
    second = reply(model, tokenizer, build_messages(history, QUESTIONS[1], None), PARAMS, lambda _: None)
    return first, pieces, second


def test_reply_streams_in_pieces(two_turns):
    first, pieces, _ = two_turns
    assert "4" in first
    assert len(pieces) > 3 and all(pieces)
    assert "".join(pieces) == first


def test_the_second_prompt_holds_the_first_exchange(smollm2, two_turns):
    _, tokenizer = smollm2
    first, _, _ = two_turns
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first}]
    messages = build_messages(history, QUESTIONS[1], "Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    text = render(tokenizer, messages)
    assert text.index("Be brief.") < text.index(QUESTIONS[0]) < text.index(first) < text.index(QUESTIONS[1])
    assert text.endswith("<|im_start|>assistant\n")  # add_generation_prompt


def test_piped_cli_keeps_the_conversation(smollm2_gguf, two_turns):
    first, _, second = two_turns
    stdin = "\n".join([QUESTIONS[0], "", QUESTIONS[1], "/exit", "never read"]) + "\n"
    out = subprocess.run(cli("--model", smollm2_gguf, "--max-new-tokens", "24"), input=stdin, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # Greedy and the same fp32 CPU numerics: the CLI's second reply is the one generated after the first exchange.
    assert out.stdout == f"{first}\n{second}\n"


def test_loop_commands_and_interrupted_reply(monkeypatch, capsys):
    seen = []

    def fake_reply(model, tokenizer, messages, params, on_text):
        seen.append(messages)
        on_text("par")
        on_text("tial")
        if messages[-1]["content"] == "stop":
            raise KeyboardInterrupt
        return "partial answer"

    monkeypatch.setattr(chat, "reply", fake_reply)
    lines = ["hi", "", "stop", "again", "/reset", "/system Be brief.", "after", "/bogus", "/quit", "unread"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    chat.converse(None, None, PARAMS, system="S")
    user = lambda text: {"role": "user", "content": text}
    bot = lambda text: {"role": "assistant", "content": text}
    assert seen == [
        [{"role": "system", "content": "S"}, user("hi")],
        [{"role": "system", "content": "S"}, user("hi"), bot("partial answer"), user("stop")],
        [{"role": "system", "content": "S"}, user("hi"), bot("partial answer"), user("stop"), bot("partial"),
         user("again")],
        [{"role": "system", "content": "Be brief."}, user("after")],
    ]
    out = capsys.readouterr()
    assert out.out == "partial\n" * 4 and "unknown command /bogus" in out.err


def read_until(fd: int, marker: str, timeout: float = 120) -> list[str]:
    """Chunks read from the pty until their text contains marker."""
    chunks: list[str] = []
    deadline = time.monotonic() + timeout
    while marker not in "".join(chunks):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(fd, 4096).decode(errors="replace") if ready else ""
        except OSError:  # the other end closed
            chunk = ""
        assert chunk, f"no {marker!r} in {''.join(chunks)!r}"
        chunks.append(chunk)
    return chunks


def test_terminal_session_streams_and_handles_ctrl_c(smollm2_gguf):
    master, slave = pty.openpty()
    # As from a terminal: Ctrl-C raises. A shell that started this suite in the background (`cmd &`) passes SIGINT on
    # as ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen(cli("--model", smollm2_gguf, "--max-new-tokens", "300"), stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    try:
        read_until(master, "> ")
        os.write(master, f"{QUESTIONS[0]}\n".encode())
        chunks = read_until(master, "> ")
        assert "4" in "".join(chunks)
        # Tokens arrive while the reply is being generated: several reads hold nothing but reply text.
        assert len([c for c in chunks if c.strip() and "2+2" not in c and ">" not in c]) >= 2, chunks

        os.write(master, b"Write a very long story about a cat.\n")
        read_until(master, "cat.")
        read_until(master, " ")  # the reply has started
        proc.send_signal(signal.SIGINT)  # Ctrl-C mid-reply: back to the prompt
        # The marker first: the reply's own text may hold "> ", and only the prompt after it is the prompt.
        after = "".join(read_until(master, "(stopped)", timeout=30)).split("(stopped)", 1)[1]
        if "> " not in after:
            read_until(master, "> ", timeout=30)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: a clean exit
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


def test_model_without_chat_template_is_a_one_line_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_hf_model("llama").save_pretrained(tmp_path)
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(tmp_path)
    out = subprocess.run(cli("--model", str(tmp_path)), input="hello\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0, out.stderr
    assert "no chat template" in out.stderr and str(tmp_path) in out.stderr and "gazelle generate" in out.stderr
