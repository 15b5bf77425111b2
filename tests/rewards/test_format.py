import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.format import (
    answer_correctness_reward,
    answer_reward,
    answer_tag_reward,
    think_format_reward,
)
from gazelle.rewards.text import completion_text


@pytest.mark.parametrize(("text", "score"), [
    ("<think>23 + 58 = 81</think><answer>81</answer>", 1.0),
    ("<think>23 + 58 = 81</think>\n<answer>81</answer>\n", 1.0),
    ("  <think>line one\nline two</think>  <answer>\n81\n</answer>", 1.0),
    ("<think>a</think>", 0.0),
    ("<answer>81</answer>", 0.0),
    ("Sure! <think>a</think><answer>81</answer>", 0.0),
    ("<think>a</think><answer>81</answer> is my answer", 0.0),
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think><think>a</think></think><answer>1</answer>", 0.0),
    ("<think>a</think> so <answer>1</answer>", 0.0),
])
def test_think_format_reward(text, score):
    assert think_format_reward(prompts=["q"], completions=[text]) == [score]


def test_answer_tag_reward():
    texts = ["x <answer>5</answer> y", "<answer>5", "5"]
    assert answer_tag_reward(completions=texts) == [1.0, 0.0, 0.0]


def test_answer_correctness_reward():
    texts = ["<think>.</think><answer>0.5</answer>", "<answer>1/3</answer>", "0.5", "<answer>81</answer>"]
    assert answer_correctness_reward.__name__ == "answer_correctness_reward"
    assert answer_correctness_reward(prompts=[""] * 4, completions=texts, answer=["1/2", "0.5", "0.5", None]) == [
        1.0, 0.0, 0.0, None]
    chat = [[{"role": "assistant", "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "7</answer>"}]}]]
    assert answer_correctness_reward(completions=chat, answer=[7]) == [1.0]


def test_answer_reward_factory():
    reward = answer_reward(tag="result", column="target", score=2.0)
    assert reward.__name__ == "result_target_correctness_reward"
    assert reward(completions=["<result>12</result>", "<answer>12</answer>"], target=[12, 12]) == [2.0, 0.0]
    with pytest.raises(GazelleError, match="result_target_correctness_reward needs dataset column 'target'"):
        reward(completions=["x"], answer=["1"])
    with pytest.raises(GazelleError, match="tag 'a b' is not a valid XML tag name"):
        answer_reward(tag="a b")


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text({"role": "assistant", "content": None}) == ""
    assert completion_text([]) == ""
    with pytest.raises(GazelleError, match="a completion is a float"):
        completion_text(1.5)
