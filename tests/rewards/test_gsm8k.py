import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.gsm8k import (
    GSM8K_REWARDS,
    SYSTEM_PROMPT,
    correctness_reward_func,
    count_xml,
    int_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)

CANONICAL = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"


def scores(text, answer="72"):
    """The five rewards of one completion, in GSM8K_REWARDS order."""
    return [f(prompts=["q"], completions=[text], answer=[answer])[0] for f in GSM8K_REWARDS]


def test_order_names_and_prompt():
    assert [f.__name__ for f in GSM8K_REWARDS] == ["xmlcount_reward_func", "soft_format_reward_func",
                                                   "strict_format_reward_func", "int_reward_func",
                                                   "correctness_reward_func"]
    assert "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>" in SYSTEM_PROMPT


def test_canonical_completion_earns_everything():
    assert scores(CANONICAL) == [0.5, 0.5, 0.5, 0.5, 2.0]
    multi_line = "<reasoning>\nstep one\nstep two\n</reasoning>\n<answer>\n72\n</answer>\n"
    assert scores(multi_line) == [0.5, 0.5, 0.5, 0.5, 2.0]


def test_trailing_text_and_missing_final_newline():
    # 3 characters after "\n</answer>\n": each of the two closing-answer parts charges 3 * 0.001.
    assert scores(CANONICAL + "xyz") == [pytest.approx(0.494), 0.5, 0.0, 0.5, 2.0]
    # Ending right at the tag: nothing trails (the recipe would charge the whole length); strict wants the "\n".
    assert scores(CANONICAL[:-1]) == [0.5, 0.5, 0.0, 0.5, 2.0]


def test_loose_formats():
    one_line = "<reasoning>24 + 48</reasoning> <answer>72</answer>"
    assert scores(one_line) == [0.0, 0.5, 0.0, 0.5, 2.0]
    assert scores("Sure! " + one_line) == [0.0, 0.0, 0.0, 0.5, 2.0]  # soft is anchored at the start
    assert scores("The answer is 72") == [0.0, 0.0, 0.0, 0.0, 0.0]
    twice = "<reasoning>\na\n</reasoning>\n<reasoning>\nb\n</reasoning>\n<answer>\n72\n</answer>\n"
    assert count_xml(twice) == pytest.approx(0.25)  # the two reasoning tags appear twice: only the answer tags count


def test_numeric_correctness_and_integers():
    assert scores(CANONICAL.replace("72", "1,000"), answer="1000") == [0.5, 0.5, 0.5, 0.0, 2.0]
    assert scores(CANONICAL.replace("72", "-3"), answer="-3")[3:] == [0.5, 2.0]
    assert scores(CANONICAL.replace("72", "72.0"))[3:] == [0.0, 2.0]
    assert scores(CANONICAL.replace("72", "71"))[3:] == [0.5, 0.0]


def test_chat_completions_and_none_answers():
    chat = [[{"role": "assistant", "content": CANONICAL}], [{"role": "assistant", "content": "no idea"}]]
    assert correctness_reward_func(prompts=[[], []], completions=chat, answer=["72", "72"]) == [2.0, 0.0]
    assert correctness_reward_func(prompts=[[]], completions=[CANONICAL], answer=[None]) == [None]
    assert strict_format_reward_func(completions=chat) == [0.5, 0.0]
    assert soft_format_reward_func(completions=chat) == [0.5, 0.0]
    assert int_reward_func(completions=chat) == [0.5, 0.0]
    assert xmlcount_reward_func(completions=chat) == [0.5, 0.0]


def test_bad_calls_name_the_problem():
    with pytest.raises(GazelleError, match="correctness_reward_func needs dataset column 'answer'; the batch has "
                                           "columns: question"):
        correctness_reward_func(prompts=["q"], completions=[CANONICAL], question=["q"])
    with pytest.raises(GazelleError, match="column 'answer' has 2 values for 1 completions"):
        correctness_reward_func(prompts=["q"], completions=[CANONICAL], answer=["1", "2"])
    with pytest.raises(GazelleError, match="xmlcount_reward_func: completion 1: a completion is a int"):
        xmlcount_reward_func(completions=[CANONICAL, 5])
