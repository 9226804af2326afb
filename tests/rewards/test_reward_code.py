"""The sandboxed code reward, on real programs: scoring (asserts, stdin/stdout cases, parallel runs) and
hostile code (fork and memory bombs, endless loops and output, escapes, secrets, network, killing the
trainer, stray processes), which must score 0 and leave the trainer and the machine as they were."""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from grpo.errors import RewardError
from grpo.rewards import code as code_module
from grpo.rewards import sandbox
from grpo.rewards.code import _start, extract_code, make_code_reward

# The trainer's interpreter may be one the sandbox user cannot read (pyenv under /root): that warning is
# checked by its own test.
pytestmark = pytest.mark.filterwarnings("ignore:code reward:RuntimeWarning")

TIMEOUT = 2.0
SLACK = 1.5  # start-up, clean-up and a busy machine
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reward():
    return make_code_reward(timeout=TIMEOUT, memory_mb=256, max_output_bytes=100_000)


@pytest.fixture
def workdirs(monkeypatch, tmp_path_factory) -> Path:
    """The programs' working directories are made here, so that their processes can be found by theirs."""
    tmp_path_factory.getbasetemp()  # fixed before tempfile's directory moves, or pytest's moves with it
    base = Path(tempfile.mkdtemp(prefix="grpo-code-test-"))
    base.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base)


def score(reward, code: str, tests) -> float | None:
    (value,) = reward(["prompt"], [code], [tests])
    return value


def timed_score(reward, code: str, tests) -> tuple[float | None, float]:
    start = time.monotonic()
    value = score(reward, code, tests)
    return value, time.monotonic() - start


def processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is inside ``directory`` (a zombie has none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(directory)):
                found.append(int(entry.name))
    return found


def left_behind(directory: Path, within: float = 3.0) -> list[int]:
    """The processes still in ``directory`` after ``within`` seconds (SIGKILL takes a moment to land)."""
    deadline = time.monotonic() + within
    while (found := processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def readable_by_others(directory: Path) -> bool:
    """Whether users other than the owner can list ``directory`` and reach it (search every parent)."""
    reachable = all(part.stat().st_mode & stat.S_IXOTH for part in [directory, *directory.parents])
    return reachable and bool(directory.stat().st_mode & stat.S_IROTH)


# --- extract_code -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("Here:\n```python\nx = 1\n```\nthen\n```python\nx = 2\n```\ndone", "x = 2\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```py\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),
        ("  ```python\n  x = 1\n  ```", "x = 1\n"),
        ("```bash\nrm -rf /\n```", None),
        ("   \n", None),
        ("```python\n```", None),
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


# --- scoring ------------------------------------------------------------------------------------------------
ADD = "def add(a, b):\n    return a + b\n"


def test_a_correct_solution_scores_one(reward):
    assert score(reward, ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]) == 1.0


def test_a_half_correct_solution_scores_half(reward):
    code = "def add(a, b):\n    return a * b\n"  # right for (2, 2), wrong for (1, 2)
    assert score(reward, code, ["assert add(2, 2) == 4", "assert add(1, 2) == 3"]) == 0.5


def test_a_failing_assert_does_not_hide_the_others(reward):
    tests = ["assert add(1, 1) == 3", "assert add(1, 1) == 2", "assert 1 / 0", "assert add(2, 2) == 4"]
    assert score(reward, ADD, tests) == 0.5


def test_one_string_of_asserts_counts_each_assert_and_not_its_setup(reward):
    tests = "import math\nassert add(1, 2) == 3\nv = add(2, 2)\nassert v == 5\nassert math.isclose(v, 4)"
    assert score(reward, ADD, tests) == pytest.approx(2 / 3)


def test_a_test_without_a_top_level_assert_is_one_test(reward):
    check = (
        "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 1\ncheck(add)"
    )
    assert score(reward, ADD, [check, "assert add(0, 0) == 0"]) == 0.5


@pytest.mark.parametrize(
    "code",
    [
        "def add(a, b) return a + b",  # a syntax error
        "def add(a, b):\n    return a + b\nraise ValueError('crash at import')",
        "import sys\ndef add(a, b):\n    return a + b\nsys.exit(3)",
        "",  # no code
        "```bash\necho 3\n```",  # no Python code
        "I cannot solve this.",
    ],
)
def test_code_that_does_not_run_scores_zero(reward, code):
    assert score(reward, code, ["assert add(1, 2) == 3"]) == 0.0


def test_the_code_is_not_run_as_main(reward):
    code = ADD + "if __name__ == '__main__':\n    print(add(int(input()), 1))\n"
    assert score(reward, code, ["assert add(1, 2) == 3"]) == 1.0


def test_stdin_stdout_cases(reward):
    code = "```python\nn = int(input())\nprint(n * 2, ' ')\nprint()\n```"
    cases = [
        {"input": "2\n", "output": "4"},  # trailing spaces and blank lines do not matter
        {"input": "5", "output": "10\n"},
        {"input": "1\n", "output": "3"},
        {"input": "x\n", "output": ""},  # a crash fails its case
    ]
    assert score(reward, code, cases) == 0.5


def test_a_stdin_program_runs_as_main_and_must_exit_with_zero(reward):
    main = (
        "import sys\ndef main():\n    print(sys.stdin.read().upper())\nif __name__ == '__main__':\n    main()"
    )
    assert score(reward, main, [{"input": "abc", "output": "ABC"}]) == 1.0
    assert score(reward, "print('ABC')\nraise SystemExit(1)", [{"input": "", "output": "ABC"}]) == 0.0
    assert score(reward, "print('ABC')\nraise SystemExit(0)", [{"input": "", "output": "ABC"}]) == 1.0


def test_chat_message_completions(reward):
    messages = [{"role": "user", "content": "add"}, {"role": "assistant", "content": f"```python\n{ADD}```"}]
    assert reward(["prompt"], [messages], [["assert add(2, 3) == 5"]]) == [1.0]


def test_each_completion_is_scored_against_its_own_row(reward):
    wrong = "def add(a, b):\n    return a - b\n"
    tests = [["assert add(1, 2) == 3"], ["assert add(1, 2) == 3"], [{"input": "7", "output": "7"}], None, []]
    scores = reward(["p"] * 5, [ADD, wrong, "print(input())", ADD, ADD], tests)
    assert scores == [1.0, 0.0, 1.0, None, None]  # a row without tests is not a code task


def test_programs_run_in_parallel(reward):
    fast = make_code_reward(timeout=5, max_parallel=4)
    start = time.monotonic()
    scores = fast(["p"] * 4, ["import time\ntime.sleep(1)"] * 4, [["assert True"]] * 4)
    elapsed = time.monotonic() - start
    assert scores == [1.0] * 4
    assert elapsed < 2.5  # one after the other: at least 4 s


def test_max_parallel_bounds_the_programs_running_at_once():
    serial = make_code_reward(timeout=5, max_parallel=1)
    start = time.monotonic()
    assert serial(["p"] * 3, ["import time\ntime.sleep(0.4)"] * 3, [["assert True"]] * 3) == [1.0] * 3
    assert time.monotonic() - start >= 1.2


def test_reasonable_memory_files_and_threads_are_allowed(reward):
    code = textwrap.dedent(
        """
        import threading
        data = bytearray(64 * 2**20)
        with open("scratch.bin", "wb") as f:
            f.write(bytes(2**20))
        threads = [threading.Thread(target=lambda: None) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        """
    )
    tests = ["assert len(data) == 64 * 2**20", "import os\nassert os.path.getsize('scratch.bin') == 2**20"]
    assert score(reward, code, tests) == 1.0


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        (42, "must be Python assert statements"),
        ([{"input": "1"}], "needs string 'input' and 'output'"),
        (["assert ("], "not valid Python"),
        ([{"input": "1", "output": "1"}, "assert True"], "must be Python assert statements"),
    ],
)
def test_malformed_tests_are_a_reward_error(reward, tests, message):
    with pytest.raises(RewardError, match=message):
        score(reward, ADD, tests)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": -1}, "timeout must be a positive number"),
        ({"timeout": "5"}, "timeout must be a positive number"),
        ({"timeout": float("inf")}, "timeout must be a positive number"),
        ({"cpu_seconds": 0}, "cpu_seconds must be a positive number"),
        ({"memory_mb": 8}, "memory_mb must be an integer >= 32"),
        ({"memory_mb": 256.0}, "memory_mb must be an integer"),
        ({"max_output_bytes": 0}, "max_output_bytes must be an integer >= 1"),
        ({"max_file_bytes": -1}, "max_file_bytes must be an integer >= 0"),
        ({"max_processes": 0}, "max_processes must be an integer >= 1"),
        ({"max_parallel": 0}, "max_parallel must be an integer >= 1"),
        ({"max_parallel": True}, "max_parallel must be an integer"),
        ({"isolate_network": "yes"}, "isolate_network must be true or false"),
        ({"python": "/nonexistent/python3"}, "is not an executable"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        make_code_reward(**options)


def test_a_program_gets_the_standard_library_only(reward):
    """The harness runs isolated: not the trainer's packages, nor the modules beside the harness's source
    (rewards/code.py would shadow the standard library's ``code``)."""
    code = textwrap.dedent(
        """
        import code, importlib.util, os
        print(importlib.util.find_spec("grpo"), importlib.util.find_spec("sandbox"))
        print(os.path.dirname(code.__file__) == os.path.dirname(os.__file__))
        """
    )
    assert score(reward, code, [{"input": "", "output": "None None\nTrue"}]) == 1.0


def test_a_program_runs_without_the_harnesss_future_features(reward):
    code = "def f(x: int) -> None:\n    pass\nprint(f.__annotations__)"  # not strings, as they would be
    assert score(reward, code, [{"input": "", "output": "{'x': <class 'int'>, 'return': None}"}]) == 1.0
    assert score(reward, code, ["assert f.__annotations__ == {'x': int, 'return': None}"]) == 1.0


def test_the_reward_declares_its_column_and_isolation(reward):
    assert reward.required_columns == ("tests",)
    if os.geteuid() == 0:
        assert reward.isolation.user == 65534


def test_an_interpreter_the_sandbox_user_cannot_read_is_replaced_with_a_warning():
    stdlib = Path(os.__file__).resolve().parent
    if os.geteuid() != 0 or readable_by_others(stdlib):
        pytest.skip("only a root trainer whose interpreter other users cannot read falls back")
    _start.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="cannot run .*; programs run with"):
            make_code_reward()
        with pytest.raises(RewardError, match="cannot read the standard library"):
            make_code_reward(python=sys.executable)
    finally:
        _start.cache_clear()


def test_without_namespaces_the_reward_warns_and_the_group_kill_still_cleans_up(monkeypatch, workdirs):
    """Where no namespace can be made (a container's seccomp profile, user namespaces turned off), the reward
    says so when it is made, and killing the process group still ends what a program left running."""
    made = 'libc("unshare", flags | own_user)'
    assert made in inspect.getsource(sandbox.make_namespaces)
    assert inspect.getsource(sandbox) == code_module._HARNESS  # what the trainer runs as the harness
    monkeypatch.setattr(code_module, "_HARNESS", code_module._HARNESS.replace(made, "False"))
    _start.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as warned:
            degraded = make_code_reward(timeout=TIMEOUT)
        messages = " ".join(str(warning.message) for warning in warned)
        assert "no network namespace" in messages
        assert "no PID namespace" in messages
        assert not degraded.isolation.network
        assert not degraded.isolation.pid_namespace
        sleep = "[sys.executable, '-c', 'import time; time.sleep(60)']"
        sleeper = f"import subprocess, sys, time\nsubprocess.Popen({sleep})\ntime.sleep(0.3)\n"
        value, elapsed = timed_score(degraded, ADD + sleeper, ["assert add(1, 2) == 3"])
        assert value == 1.0
        assert elapsed < 1.5  # the child holds stdout open: the harness's exit ends the run, not end of file
        assert left_behind(workdirs) == []
    finally:
        _start.cache_clear()


# --- hostile programs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ],
    ids=["fork-bomb", "fork-bomb-that-keeps-trying"],
)
def test_a_fork_bomb_scores_zero_and_leaves_nothing_behind(reward, workdirs, code):
    value, elapsed = timed_score(reward, code, ["assert True"])
    assert value == 0.0
    assert elapsed < TIMEOUT + SLACK
    assert left_behind(workdirs) == []
    assert subprocess.run(["true"]).returncode == 0  # the machine can still start processes


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**11)", "x = []\nwhile True:\n    x.append(bytearray(10**7))"],
    ids=["one-allocation", "growing-list"],
)
def test_a_memory_bomb_scores_zero(reward, code):
    value, elapsed = timed_score(reward, code, ["assert x"])
    assert value == 0.0
    assert elapsed < TIMEOUT  # the memory limit stops it, not the timeout


def test_an_endless_loop_is_killed_at_the_timeout(reward, workdirs):
    value, elapsed = timed_score(reward, ADD + "while True:\n    pass", ["assert add(1, 2) == 3"])
    assert value == 0.0
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK
    assert left_behind(workdirs) == []


def test_the_cpu_limit_stops_a_loop_before_the_timeout():
    limited = make_code_reward(timeout=5, cpu_seconds=1)
    value, elapsed = timed_score(limited, "while True:\n    pass", [{"input": "", "output": ""}])
    assert value == 0.0
    assert elapsed < 3


@pytest.mark.parametrize("tests", [["assert True"], [{"input": "", "output": ""}]], ids=["asserts", "stdin"])
def test_endless_output_is_cut_off(reward, tests):
    value, elapsed = timed_score(reward, "while True:\n    print('x' * 1000)", tests)
    assert value == 0.0
    assert elapsed < TIMEOUT  # killed at max_output_bytes, long before the timeout


def test_files_are_limited_to_max_file_bytes():
    limited = make_code_reward(timeout=TIMEOUT, max_file_bytes=1_000_000)
    code = textwrap.dedent(
        """
        def write(size):
            try:
                with open("big.bin", "wb") as f:
                    f.write(bytes(size))
                return True
            except OSError:
                return False
        """
    )
    assert score(limited, code, ["assert write(500_000)", "assert write(2_000_000)"]) == 0.5


def test_max_processes_bounds_the_processes_a_program_starts():
    limited = make_code_reward(timeout=TIMEOUT, max_processes=8)
    code = textwrap.dedent(
        """
        import os, time
        children = 0
        try:
            while children < 100:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError:
            pass
        """
    )
    assert score(limited, code, ["assert 0 < children < 8"]) == 1.0  # the program itself is one of the 8


def test_output_within_the_cap_is_kept(reward):
    code = "print('x' * 50_000)"
    assert score(reward, code, [{"input": "", "output": "x" * 50_000}]) == 1.0


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root trainer can run programs as another user")
def test_a_program_cannot_write_outside_its_directory(reward, workdirs, tmp_path):
    name = f"grpo-escape-{secrets.token_hex(4)}"
    outside = [tmp_path / name, Path("/etc") / name, PROJECT / name, Path.home() / name]
    code = textwrap.dedent(
        """
        def write(path):
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                return True
            except OSError:
                return False
        """
    )
    tests = [f"assert write({str(path)!r})" for path in outside] + ["assert write('inside.txt')"]
    try:
        assert score(reward, code, tests) == 1 / 5  # it ran, and only its own directory took the write
        assert [path for path in outside if path.exists()] == []
    finally:
        for path in outside:
            path.unlink(missing_ok=True)
    assert list(workdirs.glob("grpo-code-*")) == []  # its directory is gone


def test_a_program_cannot_read_the_trainers_secrets(reward, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("GRPO_TEST_SECRET", secret)
    leaks = textwrap.dedent(
        f"""
        import os
        found = [key for key, value in os.environ.items() if key == "GRPO_TEST_SECRET" or {secret!r} in value]
        print(found, sorted(os.environ))
        """
    )
    assert score(reward, leaks, [{"input": "", "output": "[] ['HOME', 'LANG', 'PATH', 'TMPDIR']"}]) == 1.0
    asserts_secret = [f"import os\nassert os.environ.get('GRPO_TEST_SECRET') == {secret!r}"]
    assert score(reward, "import os", asserts_secret) == 0.0


@pytest.mark.skipif(
    os.geteuid() != 0, reason="a non-root trainer's programs can read its /proc/<pid>/environ"
)
def test_a_program_cannot_read_the_trainers_environment_through_proc(reward):
    code = textwrap.dedent(
        f"""
        try:
            open("/proc/{os.getpid()}/environ").read()
            print("read")
        except OSError:
            print("denied")
        """
    )
    assert score(reward, code, [{"input": "", "output": "denied"}]) == 1.0


def test_a_program_cannot_open_a_socket(reward):
    if not reward.isolation.network:
        pytest.skip("no network namespace on this machine")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = textwrap.dedent(
            """
            import socket
            def reach(host, port):
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    return True
                except OSError:
                    return False
            """
        )
        tests = [f"assert reach('127.0.0.1', {port})", "assert reach('1.1.1.1', 53)"]
        assert score(reward, code, tests) == 0.0
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection ever arrived


def test_a_program_cannot_kill_the_trainer(reward, workdirs):
    if os.geteuid() != 0 and not reward.isolation.pid_namespace:
        pytest.skip("a non-root trainer without PID namespaces shares its user with its programs")
    code = textwrap.dedent(
        f"""
        import os
        attempts = [
            lambda: os.kill(os.getppid(), 9),
            lambda: os.kill({os.getpid()}, 9),
            lambda: os.killpg({os.getpgid(0)}, 9),
            lambda: os.kill(-1, 9),
        ]
        for attempt in attempts:
            try:
                attempt()
            except OSError:
                pass
        """
    )
    # It ran to its end: no attempt reached anything (and this process is still here to check).
    assert score(reward, ADD + code, ["assert add(1, 2) == 3"]) == 1.0
    assert left_behind(workdirs) == []


SPAWN_SLEEPERS = textwrap.dedent(
    """
    import os, subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    subprocess.Popen(sleep)
    subprocess.Popen(sleep, start_new_session=True)  # leaves the process group
    if os.fork() == 0:  # a daemon: double fork and a new session
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, sleep)
        os._exit(0)
    time.sleep(0.5)
    """
)


@pytest.mark.parametrize(
    "ending",
    ["", "while True:\n    pass\n", "os.setsid()\nwhile True:\n    pass\n"],
    ids=["ends", "times-out", "leaves-its-group-and-times-out"],
)
def test_no_process_a_program_started_outlives_it(reward, workdirs, ending):
    if not reward.isolation.pid_namespace:
        pytest.skip("without a PID namespace a process in a new session can outlive its program")
    value, elapsed = timed_score(reward, SPAWN_SLEEPERS + ending, ["assert True"])
    assert value == (0.0 if ending else 1.0)
    assert elapsed < TIMEOUT + SLACK
    assert left_behind(workdirs) == []


def test_a_program_cannot_forge_its_results(reward):
    code = textwrap.dedent(
        """
        import builtins, os, sys
        for fd in range(3, 64):
            try:
                os.write(fd, b"\\n" + b"0" * 32 + b" result 1\\n")
            except OSError:
                pass
        print("result 1")
        builtins.exec = lambda *args, **kwargs: None
        builtins.compile = lambda *args, **kwargs: None
        sys.modules["__main__"].finishes = lambda *args, **kwargs: True
        """
    )
    assert score(reward, code, ["assert False"]) == 0.0
