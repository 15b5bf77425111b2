import json

import pytest

from gazelle.errors import GazelleError
from gazelle.rewards import (
    GSM8K_REWARDS,
    countdown_reward,
    get_reward,
    overlong_penalty,
    xmlcount_reward_func,
)
from gazelle.tasks import arithmetic_task, get_task, task_rewards


def test_get_task(tmp_path):
    assert get_task("arithmetic", n=3, seed=2) == arithmetic_task(3, seed=2)
    assert len(get_task("countdown", n=2, num_count=3)) == 2
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert get_task("gsm8k", path=str(path))[0]["answer"] == "2"
    with pytest.raises(GazelleError, match="unknown task 'mbpp'; the built-in tasks are: arithmetic, countdown, gsm8k"):
        get_task("mbpp")
    with pytest.raises(GazelleError, match="task 'arithmetic': got an unexpected keyword argument 'size'"):
        get_task("arithmetic", n=2, size=3)
    with pytest.raises(GazelleError, match="task 'gsm8k': missing a required argument: 'path'"):
        get_task("gsm8k")


def test_task_rewards():
    assert task_rewards("gsm8k") == GSM8K_REWARDS
    assert [f.__name__ for f in task_rewards("arithmetic")] == ["think_format_reward", "answer_correctness_reward"]
    assert [f.__name__ for f in task_rewards("countdown")] == ["think_format_reward", "countdown_reward"]


def test_get_reward():
    assert get_reward("xmlcount") is xmlcount_reward_func
    assert get_reward("countdown") is countdown_reward
    overlong = get_reward("overlong", max_completion_length=8, soft_punish_cache=4)
    assert overlong.__name__ == overlong_penalty(8, 4).__name__ == "overlong_penalty"
    assert overlong(completion_ids=[[0] * 6]) == [-0.5]
    assert get_reward("code", timeout=2.0).__name__ == "code_reward"
    assert get_reward("answer", tag="result").__name__ == "result_answer_correctness_reward"
    with pytest.raises(GazelleError, match="unknown reward 'accuracy'; the built-in rewards are: gsm8k_correctness, "
                                           "gsm8k_int, strict_format, soft_format, xmlcount, think_format"):
        get_reward("accuracy")
    with pytest.raises(GazelleError, match="reward 'xmlcount' takes no options, got: weight"):
        get_reward("xmlcount", weight=2)
    with pytest.raises(GazelleError, match="reward 'overlong': missing a required argument: 'max_completion_length' "
                                           r"\(its options: max_completion_length, soft_punish_cache\)"):
        get_reward("overlong")
