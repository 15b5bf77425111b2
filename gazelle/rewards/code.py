"""A code-execution reward: run the completion's Python against the row's test asserts in a limited subprocess.

For each completion: the code is the last ```python (or ```py, ```python3) fenced block, else the last untagged
fenced block, else the whole text. It runs in a fresh `python -I` child in an empty temporary directory, with

- a wall-clock timeout: past it the child's whole process group is killed, and the row scores 0 (counted in
  `stats["timeout"]` of the reward function);
- RLIMIT_AS (address space, `memory_mb`), RLIMIT_CPU (timeout + 1 s) and RLIMIT_FSIZE (files it writes) set by the
  child itself before the untrusted code runs (not in a preexec_fn, which is unsafe in the threads that run rows
  in parallel); a MemoryError ends the run like any other exception;
- no network and no new processes, enforced by a Python audit hook (`sys.addaudithook`, which cannot be removed)
  that refuses every socket operation and fork/exec/spawn/system/Popen with PermissionError. This is Python-level
  isolation, not a security boundary: native code (ctypes, C extensions) can get around it. Run untrusted code at
  scale inside a container or VM as well;
- stdin from /dev/null, the code's own stdout/stderr discarded, a small environment (no inherited secrets), and
  at most `max_output_bytes` read back from it (more is a failed run).

Scoring: the solution is executed once (as module "solution", so an `if __name__ == "__main__":` block does not
run); then each test (one string of the row's list, or the row's single string
as one test) runs separately in the solution's namespace, and passes when it raises nothing. The score is the
fraction of tests passed (or, with all_or_nothing=True, 1.0 when all pass, else 0.0). A solution that raises at
top level, a crash, or a run that does not finish scores 0. The child reports "<nonce> <test> pass|fail" lines on
a copy of its stdout taken before the code runs; the nonce is random per run and handed over in a file the
child deletes before running the code, so printed or forged lines without it are ignored. A solution can still
game weak tests (e.g. return an object whose __eq__ is always True): write tests accordingly.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gazelle.errors import GazelleError
from gazelle.rewards.text import column, completion_texts

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
PYTHON_FENCES = ("python", "py", "python3")
FILE_SIZE_LIMIT = 16 << 20

# The child: read the job, limit itself, block network and processes, run the solution and each test, report.
# Everything lives in a function so the nonce is a local, not a global of __main__ the code could import.
HARNESS = r'''
def _main():
    import json, os, resource, signal, sys

    path = sys.argv[1]
    with open(path) as f:
        job = json.load(f)
    os.remove(path)
    nonce, code, tests = job["nonce"], job["code"], job["tests"]
    memory, cpu = job["memory_bytes"], job["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_bytes"], job["file_bytes"]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the file limit raises instead of killing

    write, run, exit_now = os.write, exec, os._exit  # the code may rebind module attributes; keep ours
    report = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    processes = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                 "subprocess.Popen", "pty.spawn"}

    def refuse(event, args):
        if event.startswith("socket."):
            raise PermissionError("network access is disabled in the gazelle code sandbox")
        if event in processes:
            raise PermissionError("starting processes is disabled in the gazelle code sandbox")

    sys.addaudithook(refuse)
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        run(compile(code, "<solution>", "exec"), namespace)
        solved = True
    except BaseException:
        solved = False
    for i, test in enumerate(tests):
        passed = False
        if solved:
            try:
                run(compile(test, f"<test {i}>", "exec"), namespace)
                passed = True
            except BaseException:
                pass
        write(report, f"{nonce} {i} {'pass' if passed else 'fail'}\n".encode())
    write(report, f"{nonce} done\n".encode())
    exit_now(0)  # skip atexit handlers and waiting on threads the code started


_main()
'''


@dataclass
class RunResult:
    """What one sandboxed run gave: tests passed of total, and how it ended (ok, timeout, output_limit, crashed)."""
    passed: int
    total: int
    status: str


def extract_code(text: str) -> str:
    """The last ```python block of a completion, else its last untagged ``` block, else the whole text.

    A block left open at the end (a truncated completion) runs to the end of the text.
    """
    blocks = [(m[1].lower(), m[2]) for m in _FENCE.finditer(text)]
    for wanted in (PYTHON_FENCES, ("",)):
        found = [body for language, body in blocks if language in wanted]
        if found:
            return found[-1]
    return text


def run_tests(code: str, tests: Sequence[str], timeout: float = 5.0, memory_mb: int = 1024,
              max_output_bytes: int = 1 << 20) -> RunResult:
    """Run `code` then each of `tests` in one sandboxed child (see the module docstring); count the passes."""
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": code, "tests": list(tests), "memory_bytes": int(memory_mb) << 20,
           "cpu_seconds": math.ceil(timeout) + 1, "file_bytes": FILE_SIZE_LIMIT}
    with tempfile.TemporaryDirectory(prefix="gazelle-code-", ignore_cleanup_errors=True) as folder:
        job_path = os.path.join(folder, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        deadline = time.monotonic() + timeout
        child = subprocess.Popen([sys.executable, "-I", "-c", HARNESS, job_path], cwd=folder,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env=_child_environment(folder), start_new_session=True)
        try:
            output, status = _read_until(child, deadline, max_output_bytes)
        finally:
            try:  # the whole group, before reaping the leader (so its id cannot have been reused)
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
            child.stdout.close()
    results: dict[int, bool] = {}
    done = False
    for line in output.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields == [nonce, "done"]:
            done = True
        elif len(fields) == 3 and fields[0] == nonce and fields[1].isdigit() and fields[2] in ("pass", "fail"):
            results.setdefault(int(fields[1]), fields[2] == "pass")
    if status == "ok" and not done:
        status = "crashed"
    passed = sum(results.get(i, False) for i in range(len(tests))) if status == "ok" else 0
    return RunResult(passed, len(tests), status)


def code_execution_reward(test_column: str = "tests", timeout: float = 5.0, memory_mb: int = 1024,
                          max_workers: int | None = None, all_or_nothing: bool = False,
                          max_output_bytes: int = 1 << 20) -> Callable[..., list[float | None]]:
    """A reward running each completion's code against dataset column `test_column` (see the module docstring).

    The column holds, per row, a list of test strings (usually asserts) or one string (one test); None skips the
    row (score None). Rows run in parallel on `max_workers` threads (default: the CPU count, at most 8). The
    function is named "code_reward" (for test_column "tests", else "code_reward_<column>") and keeps running
    counts in its `stats` attribute: rows, timeout, output_limit, crashed.
    """
    if not timeout > 0:
        raise GazelleError(f"code_execution_reward: timeout must be > 0 seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise GazelleError(f"code_execution_reward: memory_mb must be an integer >= 64, got {memory_mb!r}")
    workers = max_workers or min(8, os.cpu_count() or 1)
    name = "code_reward" if test_column == "tests" else f"code_reward_{test_column}"
    stats: Counter = Counter()
    lock = threading.Lock()

    def score(job: tuple[str, list[str] | None]) -> float | None:
        code, tests = job
        if tests is None:
            return None
        result = run_tests(code, tests, timeout, memory_mb, max_output_bytes)
        with lock:
            stats["rows"] += 1
            if result.status != "ok":
                stats[result.status] += 1
        if all_or_nothing:
            return 1.0 if result.passed == result.total else 0.0
        return result.passed / result.total

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        texts = completion_texts(completions, name)
        tests = column(columns, test_column, len(texts), name)
        jobs = [(extract_code(text), _row_tests(row_tests, i, test_column, name))
                for i, (text, row_tests) in enumerate(zip(texts, tests))]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(score, jobs))

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"Fraction of column {test_column!r}'s tests the completion's code passes in a sandbox."
    reward.stats = stats
    return reward


def _row_tests(value, row: int, test_column: str, reward: str) -> list[str] | None:
    if value is None:
        return None
    tests = [value] if isinstance(value, str) else value
    if not isinstance(tests, Sequence) or not all(isinstance(t, str) for t in tests):
        raise GazelleError(f"{reward}: row {row}: column {test_column!r} must be a string or a list of strings, "
                           f"got {type(value).__name__}")
    if not tests:
        raise GazelleError(f"{reward}: row {row}: column {test_column!r} has no tests")
    return list(tests)


def _read_until(child: subprocess.Popen, deadline: float, limit: int) -> tuple[bytes, str]:
    """The child's stdout until it closes, the deadline passes (timeout) or it says more than `limit` bytes.

    The child is not reaped here: until the caller has killed its process group, the group id stays reserved.
    """
    output = bytearray()
    fd = child.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(output), "timeout"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        output += chunk
        if len(output) > limit:
            return bytes(output), "output_limit"
    return bytes(output), "ok"  # end of output: the harness has exited (the caller kills the group, then reaps)


def _child_environment(folder: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


code_reward = code_execution_reward()
