"""The code sandbox's harness, piece by piece and in this process: what it reads, reports and computes. The
confinement itself (namespaces, setuid, limits) only holds in a child: tests/rewards/test_reward_code.py
runs real programs through it."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.rewards import code as code_module
from grpo.rewards import sandbox
from grpo.rewards.sandbox import (
    CLONE_NEWNET,
    CLONE_NEWPID,
    SPEC_KEYS,
    capped_limit,
    exit_status,
    finishes,
    input_file,
    isolation_report,
    namespace_attempts,
    parse_spec,
    read_ready,
    read_results,
    ready_line,
    result_line,
    rlimit_settings,
    run_tests,
)

TOKEN = "0123456789abcdef" * 2
SPEC = {
    "token": TOKEN,
    "uid": 65534,
    "isolate_network": True,
    "limits": {},
    "code": "",
    "tests": [],
    "stdin": None,
}


# --- what the child runs ------------------------------------------------------------------------------------
def test_the_trainer_runs_this_modules_source():
    assert Path(sandbox.__file__).read_text(encoding="utf-8") == code_module._HARNESS


def test_the_harness_is_self_contained():
    """The child runs isolated (``-I -S``), perhaps with the system's interpreter: the standard library only,
    nothing of grpo, and syntax that Python 3.8 reads."""
    tree = ast.parse(code_module._HARNESS, feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            imported.add(node.module.split(".")[0])
    assert imported
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_the_harness_passes_no_future_feature_on_to_the_program():
    """``compile`` and ``exec`` give the code they run the caller's ``from __future__`` features: the harness
    has none, so the program runs as any script does. Without them, its annotations are evaluated when it is
    defined: only names that Python 3.8 can evaluate, or quoted."""
    tree = ast.parse(code_module._HARNESS)
    nodes = list(ast.walk(tree))
    assert not [node for node in nodes if isinstance(node, ast.ImportFrom) and node.module == "__future__"]
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            arguments += [node.args.vararg, node.args.kwarg]
            annotations = [a.annotation for a in arguments if a is not None] + [node.returns]
            for annotation in filter(None, annotations):
                evaluable = isinstance(annotation, (ast.Name, ast.Constant))
                assert evaluable, f"{node.name}: {ast.unparse(annotation)}"


def test_the_harness_refuses_a_malformed_spec_before_it_starts():
    """Run as the trainer runs it: a spec without its keys fails on stderr, before the "ready" line."""
    command = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", code_module._HARNESS]
    done = subprocess.run(command, input=b'{"token": "t"}', capture_output=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode().strip().splitlines()[-1] == (
        "ValueError: the spec lacks uid, isolate_network, limits, code, tests, stdin"
    )


# --- the spec -----------------------------------------------------------------------------------------------
def test_parse_spec_reads_the_trainers_json():
    assert parse_spec(json.dumps(SPEC).encode()) == SPEC
    assert set(SPEC) == set(SPEC_KEYS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "the spec must be a JSON object, got list"),
        (
            json.dumps({k: v for k, v in SPEC.items() if k not in ("code", "stdin")}).encode(),
            "lacks code, stdin",
        ),
        (b"{", "Expecting"),
    ],
)
def test_parse_spec_refuses_what_is_not_a_spec(data, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(data)


# --- namespaces and what the harness reports ----------------------------------------------------------------
def test_namespace_attempts_try_the_most_isolation_first():
    assert namespace_attempts(True) == [CLONE_NEWPID | CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNET]
    assert namespace_attempts(False) == [CLONE_NEWPID]


@pytest.mark.parametrize(
    ("made", "network", "pid_namespace"),
    [
        (CLONE_NEWPID | CLONE_NEWNET, True, True),
        (CLONE_NEWPID, False, True),
        (CLONE_NEWNET, True, False),
        (0, False, False),
    ],
)
def test_isolation_report(made, network, pid_namespace):
    assert isolation_report(made, 65534) == {
        "user": 65534,
        "network": network,
        "pid_namespace": pid_namespace,
    }


def test_the_ready_line_reads_back_as_the_trainers_isolation():
    report = isolation_report(CLONE_NEWPID, 1000)
    line = ready_line(TOKEN, report)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    header = line.rstrip(b"\n")
    assert read_ready(header, TOKEN) == report
    assert code_module.Isolation(**read_ready(header, TOKEN)) == code_module.Isolation(1000, False, True)


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"Traceback (most recent call last):",
        ready_line("f" * 32, {}).rstrip(),
        f"{TOKEN} result 1".encode(),
    ],
)
def test_read_ready_refuses_any_other_first_line(header):
    assert read_ready(header, TOKEN) is None


def test_a_result_line_stands_on_its_own_line_after_unterminated_output():
    output = b"no newline at the end" + result_line(TOKEN, "101")
    assert read_results(output, TOKEN, 3) == (True, False, True)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (b"", None),
        (b"all tests passed\n", None),
        (result_line(TOKEN, "11"), None),  # one bit per test, no fewer
        (result_line(TOKEN, "1111"), None),  # and no more
        (result_line(TOKEN, "1x1"), None),
        (result_line("f" * 32, "111"), None),  # another run's token: a forgery
        (f"{TOKEN} result 111 ".encode(), None),
        (result_line(TOKEN, "111") + result_line(TOKEN, "000"), (False, False, False)),  # the last one counts
        (result_line(TOKEN, "010") + b"printed after\n", (False, True, False)),
    ],
)
def test_read_results(output, expected):
    assert read_results(output, TOKEN, 3) == expected


# --- the program's process ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "code"),
    [(0, 0), (3 << 8, 3), (255 << 8, 255), (signal.SIGKILL, 128 + signal.SIGKILL), (signal.SIGXCPU, 152)],
)
def test_exit_status_passes_on_the_programs_exit_code_or_signal(status, code):
    assert exit_status(status) == code


def test_input_file_is_the_cases_input_sealed():
    fd = input_file("héllo\nwörld")
    try:
        assert os.read(fd, 100) == "héllo\nwörld".encode()
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_SEAL, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE):
            assert seals & seal
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_input_file_without_input_is_empty():
    fd = input_file(None)
    try:
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("value", "hard", "expected"),
    [(10, 100, 10), (100, 10, 10), (10, 10, 10), (10**9, resource.RLIM_INFINITY, 10**9), (0, 5, 0)],
)
def test_capped_limit_never_asks_above_the_hard_limit(value, hard, expected):
    assert capped_limit(value, hard) == expected


def test_rlimit_settings_for_the_trainers_limits():
    limits = code_module._limits(cpu_seconds=1.5, memory_mb=64, max_file_bytes=0, max_processes=4)
    settings = rlimit_settings(limits)
    assert [kind for kind, _ in settings] == [getattr(resource, name) for name in limits]
    for (kind, value), requested in zip(settings, limits.values()):
        assert value == capped_limit(requested, resource.getrlimit(kind)[1])
    assert limits["RLIMIT_CPU"] == 2  # whole seconds, rounded up
    assert limits["RLIMIT_AS"] == 64 * 2**20


def test_rlimit_settings_cap_at_this_process_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit on open files here")
    assert rlimit_settings({"RLIMIT_NOFILE": hard + 1}) == [(resource.RLIMIT_NOFILE, hard)]


@pytest.mark.parametrize("name", ["RLIMIT_NOT_A_LIMIT", "getrlimit", "RLIM_INFINITY"])
def test_rlimit_settings_refuse_what_is_not_a_limit(name):
    with pytest.raises(ValueError, match="is not a resource limit"):
        rlimit_settings({name: 1})


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = 1", True),
        ("raise SystemExit", True),
        ("raise SystemExit(0)", True),
        ("import sys\nsys.exit(None)", True),
        ("raise SystemExit(1)", False),
        ("raise SystemExit('failed')", False),
        ("raise ValueError", False),
        ("raise KeyboardInterrupt", False),
        ("1 / 0", False),
    ],
)
def test_finishes(code, expected):
    assert finishes(code, {}) is expected


def test_run_tests_runs_the_code_then_each_test_in_its_namespace():
    namespace = {}
    tests = ["assert x == 1", "assert x == 2", "y = x + 1", "assert y == 2", "raise SystemExit(3)"]
    assert run_tests("x = 1", tests, namespace) == "10110"
    assert namespace["y"] == 2


def test_run_tests_fails_every_test_when_the_code_fails():
    assert run_tests("x = 1\nraise RuntimeError", ["assert x == 1", "assert True"], {}) == "00"


def test_run_tests_compiles_the_tests_before_the_code_runs():
    namespace = {}
    with pytest.raises(SyntaxError):
        run_tests("ran = True", ["assert True", "assert ("], namespace)
    assert "ran" not in namespace


def test_run_tests_is_not_fooled_by_code_that_replaces_the_harnesss_functions(monkeypatch):
    monkeypatch.setattr(sandbox, "finishes", sandbox.finishes)  # put back after the code replaces it
    code = "import grpo.rewards.sandbox as harness\nharness.finishes = lambda *args: True"
    assert run_tests(code, ["assert False", "assert True"], {}) == "01"
    assert sandbox.finishes is not finishes  # the code did replace it
