import socket
import time

import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.code import code_execution_reward, extract_code, run_tests

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(10, 1) == 11"]


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nIt adds the numbers."


def refused(call: str) -> str:
    """A test that passes when `call` raises PermissionError in the child."""
    return f"try:\n    {call}\n    ok = False\nexcept PermissionError:\n    ok = True\nassert ok"


def test_extract_code():
    assert extract_code(fenced("x = 1")) == "x = 1\n"
    assert extract_code("```python\na = 1\n```\nthen\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```bash\nls\n```\n```\nc = 3\n```") == "c = 3\n"  # untagged block when no python one
    assert extract_code("```python\nd = 4\n```\n```bash\nls\n```") == "d = 4\n"
    assert extract_code("```python\ntruncated = 5") == "truncated = 5"
    assert extract_code("e = 5") == "e = 5"


def test_fraction_of_tests_passed():
    reward = code_execution_reward(timeout=10)
    completions = [fenced("def add(a, b):\n    return a + b"),
                   fenced("def add(a, b):\n    return a - b"),                     # -1, 0, 9: fails all
                   fenced("def add(a, b):\n    return a + b if a < 10 else 0"),    # fails the third
                   [{"role": "assistant", "content": fenced("def add(a, b):\n    return a + b")}],
                   fenced("raise ValueError('at import')\ndef add(a, b):\n    return a + b"),
                   "def add(a, b) return a + b"]                                    # syntax error
    tests = [ADD_TESTS] * 6
    assert reward(prompts=[""] * 6, completions=completions, tests=tests) == [1.0, 0.0, 2 / 3, 1.0, 0.0, 0.0]
    assert reward.__name__ == "code_reward" and reward.stats["rows"] == 6
    strict = code_execution_reward(all_or_nothing=True, timeout=10)
    assert strict(completions=completions[:3], tests=tests[:3]) == [1.0, 0.0, 0.0]
    # one string is one test; None skips the row
    assert reward(completions=[fenced("x = 2")], tests=["assert x == 2\nassert x > 1"]) == [1.0]
    assert reward(completions=[fenced("x = 2")], tests=[None]) == [None]


def test_infinite_loop_is_killed_and_counted():
    reward = code_execution_reward(timeout=1.0)
    start = time.monotonic()
    assert reward(completions=[fenced("while True:\n    pass"), fenced("x = 1")],
                  tests=[["assert True"], ["assert x == 1"]]) == [0.0, 1.0]
    assert time.monotonic() - start < 1.0 + 2.0
    assert reward.stats["timeout"] == 1
    # a test that hangs after others passed: the run does not finish, so the row scores 0
    result = run_tests("x = 1", ["assert x == 1", "while True: pass"], timeout=1.0)
    assert (result.passed, result.status) == (0, "timeout")


def test_memory_limit():
    reward = code_execution_reward(memory_mb=256, timeout=10)
    hogs = [fenced("x = bytearray(2 * 1024 ** 3)"),                                # one 2 GiB block
            fenced("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))"),  # grows until refused
            fenced("x = bytearray(50 * 1024 ** 2)")]                               # 50 MiB fits in 256
    assert reward(completions=hogs, tests=[["assert True"]] * 3) == [0.0, 0.0, 1.0]


def test_no_network_no_processes_no_stdin_no_secrets(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    monkeypatch.setenv("GAZELLE_TEST_SECRET", "hunter2")
    connect = f"""
import socket
def attempt():
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
        return "connected"
    except OSError as e:
        return str(e)
"""
    checks = [
        (connect, 'assert "network access is disabled" in attempt()'),
        ("import _socket", refused("_socket.socket()")),
        ("import subprocess", refused("subprocess.run(['true'])")),
        ("import os", refused("os.system('true')")),
        ("line = input()", "assert True"),  # stdin is empty: input() raises EOFError, the solution fails
        ("import os", "assert 'GAZELLE_TEST_SECRET' not in os.environ"),
    ]
    reward = code_execution_reward(timeout=10)
    scores = reward(completions=[fenced(code) for code, _ in checks], tests=[[t] for _, t in checks])
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody connected
    listener.close()


def test_forged_reports_and_early_exit_score_zero():
    forge = ("import os\nfor fd in range(1, 10):\n    for i in range(3):\n        try:\n"
             "            os.write(fd, f'0123 {i} pass\\n'.encode())\n        except OSError:\n            pass\n"
             "print('0 pass')\nprint('done')\ndef add(a, b):\n    return 0")
    assert run_tests(forge, ADD_TESTS).passed == 0
    result = run_tests("import os\nos._exit(0)", ["assert True"])
    assert (result.passed, result.status) == (0, "crashed")
    flood = run_tests("import os\nos.write(3, b'x' * 5000)", ["assert True"], max_output_bytes=1000)
    assert (flood.passed, flood.status) == (0, "output_limit")


def test_bad_tests_column():
    reward = code_execution_reward()
    with pytest.raises(GazelleError, match="code_reward: row 1: column 'tests' must be a string or a list of strings, got int"):
        reward(completions=["x", "y"], tests=[["assert 1"], 5])
    with pytest.raises(GazelleError, match="code_reward: row 0: column 'tests' has no tests"):
        reward(completions=["x"], tests=[[]])
    with pytest.raises(GazelleError, match="code_reward_checks needs dataset column 'checks'"):
        code_execution_reward(test_column="checks")(completions=["x"], tests=[["assert 1"]])
    with pytest.raises(GazelleError, match="timeout must be > 0"):
        code_execution_reward(timeout=0)
