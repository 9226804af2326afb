"""Sandboxed code reward: run each completion's Python against the row's tests and score the fraction passed.

The row's ``tests`` column is either Python statements (a string, or a list of strings) run after the code
in the same program, or stdin/stdout cases ``[{"input": ..., "output": ...}]``, each a run of the program.

Threat model. The code was written by the policy being trained: it may be wrong, hang, or be hostile on
purpose or by accident — fork bombs, memory bombs, endless output, writing or reading files it should not,
reading the trainer's secrets, opening sockets, killing the trainer, leaving processes behind, or printing
"all tests passed". A program gets 0 for whatever it broke and must harm neither the trainer nor the machine.
What is enforced, and where:

* Every program runs in a fresh interpreter in its own session (``start_new_session``), started through a
  small harness (:mod:`grpo.rewards.sandbox`): its first process — trusted, never running the program —
  makes new PID and network namespaces, then forks the program's process, which gives up its privileges,
  sets its resource limits and only then runs the code. RLIMIT_CPU, RLIMIT_AS (``memory_mb``), RLIMIT_FSIZE
  (``max_file_bytes``), RLIMIT_NPROC (``max_processes``), RLIMIT_NOFILE and RLIMIT_CORE are set in it;
  ``no_new_privs`` keeps a setuid binary from giving root back.
* As root, the program runs as ``nobody`` (uid and gid 65534) with no supplementary groups: it can write
  only to its own directory (and world-writable ones such as /tmp, a file at most ``max_file_bytes``), read
  only what any user can, signal none of the trainer's processes, and RLIMIT_NPROC applies (root ignores
  it). If the trainer's interpreter lives where ``nobody`` cannot read it (pyenv under /root), the system's
  ``python3`` runs the programs, with a warning; ``python=`` picks another.
* Not as root, the program runs as the trainer's user: it can read and write that user's files, read the
  trainer's environment in ``/proc/<pid>/environ``, and RLIMIT_NPROC counts all of that user's processes
  unless a user namespace gives the program a count of its own; without a PID namespace it can also signal
  the trainer. Run the trainer as root (in a container) where programs must not touch what is the trainer's.
* The PID namespace (for a non-root user, inside a user namespace) makes the program's process the init of
  its tree: when it ends, the kernel kills every process it started, even those that left its process
  group; the trainer also kills the whole group (SIGKILL) at the wall-clock timeout and after every run.
  Without PID namespaces a process that calls ``setsid`` can outlive the program.
* The network namespace holds only a loopback interface that is down: no connection to the trainer's
  machine (127.0.0.1) or elsewhere. Where namespaces cannot be made (a container's seccomp profile, user
  namespaces turned off), programs keep the network and their strays: making the reward warns once, and
  the reward function's ``isolation`` attribute (an :class:`Isolation`) records what holds.
* The environment is rebuilt from nothing (PATH, LANG, HOME and TMPDIR in its directory): no secret in the
  trainer's environment reaches the program. Python runs isolated (``-I -S``): no site-packages, no
  ``PYTHON*`` variables — programs get the standard library only.
* Output is read as it comes and the program is killed past ``max_output_bytes``; stderr is discarded.
* Tests are compiled and the harness's functions bound before the program runs, and results come back on a
  line that carries a random per-run token: a program cannot pass by printing "all passed" or by replacing
  ``exec``. A program that goes out of its way to read the harness's memory could still find the token;
  one that overrides ``__eq__`` can fool a test. These are reward hacks to watch for, not escapes.

Not enforced: total disk use (``max_file_bytes`` bounds each file, not their number), memory outside the
address space (``/dev/shm``), reading world-readable files and other processes' command lines (keep
secrets in files only their owner reads, and off command lines), and the kernel's own attack surface. For
more, run the trainer in a container or VM.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import numbers
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from grpo.errors import RewardError
from grpo.rewards.core import RewardFunc, completion_text, requires_columns
from grpo.rewards.sandbox import read_ready, read_results

SANDBOX_UID = 65534  # nobody/nogroup: programs run as this user (and group) when the trainer is root
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_OPEN_FILES = 64
PYTHON_TAGS = frozenset({"", "python", "python3", "py"})
FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
EXIT_POLL_S = 0.05  # how often a run that produces no output checks whether its harness has ended
READ_CHUNK = 65536
STDERR_CAP = 65536

# The harness, :mod:`grpo.rewards.sandbox`, run as ``python -I -S -B -X utf8 -c _HARNESS`` with a JSON spec
# on stdin. Its source is read once, now, rather than by each run from the file: the programs' user may be
# able to write the file (a non-root trainer's own checkout), and a harness changed on disk must not run,
# outside the sandbox, the next time.
_HARNESS = resources.files(__package__).joinpath("sandbox.py").read_text(encoding="utf-8")


def extract_code(text: str) -> str | None:
    """The code in a completion: its last fenced block tagged Python (or untagged), else the whole text.
    None when there is none: only whitespace, or fences that all hold another language."""
    blocks = FENCE.findall(text)
    if blocks:
        python = [body for tag, body in blocks if tag.lower() in PYTHON_TAGS]
        if not python:
            return None
        text = python[-1]
    code = textwrap.dedent(text)
    return code if code.strip() else None


@dataclass(frozen=True)
class Isolation:
    """What the sandbox enforces on this machine, found by a trial run when the reward is made."""

    user: int  # the uid programs run as: 65534 when the trainer is root, else the trainer's own
    network: bool  # programs have a network namespace of their own: no network at all
    pid_namespace: bool  # every process a program starts ends with it


@dataclass(frozen=True)
class AssertTests:
    """Python statements run one by one after the code, in its namespace. The top-level asserts are the
    tests; other statements (imports, helpers) run in their place without counting; a string without a
    top-level assert is one test, passed when it runs without error."""

    steps: tuple[str, ...]
    counted: tuple[bool, ...]


@dataclass(frozen=True)
class IOCase:
    """One run of the program with ``input`` on stdin; passes when it exits with 0 and prints ``output``
    (trailing whitespace of each line, and trailing blank lines, aside)."""

    input: str
    output: str


@dataclass(frozen=True)
class _Run:
    """How a program ended: ``stopped`` ("timeout", "output") when it was killed, its exit code, its output
    (stdin mode) and which steps passed (tests mode; None when it never reported)."""

    stopped: str | None
    returncode: int
    output: str
    passed: tuple[bool, ...] | None
    isolation: Isolation | None


def parse_tests(tests: Any, index: int = 0) -> AssertTests | tuple[IOCase, ...] | None:
    """A row's ``tests`` value as assert tests or stdin/stdout cases; None when it has none (the row is not a
    code task). ``index``, the completion's, names it in errors."""
    if tests is None or (isinstance(tests, (str, list, tuple)) and not tests):
        return None
    if isinstance(tests, str) or (
        isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests)
    ):
        return _assert_tests([tests] if isinstance(tests, str) else list(tests), index)
    if isinstance(tests, (list, tuple)) and all(isinstance(t, Mapping) for t in tests):
        cases = []
        for case in tests:
            if not (isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
                raise RewardError(
                    f"tests of completion {index}: a stdin/stdout case needs string 'input' and 'output', "
                    f"got {case!r}"
                )
            cases.append(IOCase(case["input"], case["output"]))
        return tuple(cases)
    raise RewardError(
        f"tests of completion {index}: 'tests' must be Python assert statements (a string or a list of "
        f"strings) or a list of {{'input': ..., 'output': ...}} cases, got {type(tests).__name__}"
    )


def _assert_tests(sources: list[str], index: int) -> AssertTests | None:
    steps: list[str] = []
    counted: list[bool] = []
    for source in sources:
        try:
            body = ast.parse(source).body
        except SyntaxError as error:
            message = f"tests of completion {index}: a test is not valid Python ({error.msg}): {source!r}"
            raise RewardError(message) from None
        if any(isinstance(node, ast.Assert) for node in body):
            steps += [ast.unparse(node) for node in body]
            counted += [isinstance(node, ast.Assert) for node in body]
        elif body:
            steps.append(source)
            counted.append(True)
    return AssertTests(tuple(steps), tuple(counted)) if any(counted) else None


def _fraction(passed: int, suite: AssertTests | tuple[IOCase, ...] | None) -> float | None:
    if suite is None:
        return None
    return passed / (len(suite) if isinstance(suite, tuple) else sum(suite.counted))


def _same_output(printed: str, expected: str) -> bool:
    def normal(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()

    return normal(printed) == normal(expected)


class _Sandbox:
    """Runs one program per :meth:`run`, which only blocks its own thread: the reward runs several at once
    from a thread pool. See the module's docstring for what holds."""

    def __init__(
        self,
        python: str,
        timeout: float,
        limits: Mapping[str, int],
        max_output_bytes: int,
        isolate_network: bool,
    ):
        self.python = python
        self.timeout = timeout
        self.limits = dict(limits)
        self.max_output_bytes = max_output_bytes
        self.isolate_network = isolate_network
        self.root = os.geteuid() == 0

    def run(self, code: str, tests: Sequence[str] | None = None, stdin: str | None = None) -> _Run:
        """Run ``code`` with ``tests`` (statements after it, in one program) or with ``stdin``."""
        token = secrets.token_hex(16)
        spec = {
            "token": token,
            "uid": SANDBOX_UID,
            "isolate_network": self.isolate_network,
            "limits": self.limits,
            "code": code,
            "tests": None if tests is None else list(tests),
            "stdin": stdin,
        }
        # The harness's and tests' own lines on top of what the program may print.
        cap = self.max_output_bytes + 4096 + 2 * len(tests or ())
        workdir = tempfile.mkdtemp(prefix="grpo-code-")
        try:
            if self.root:
                os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
            env = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            deadline = time.monotonic() + self.timeout
            with subprocess.Popen(
                [self.python, "-I", "-S", "-B", "-X", "utf8", "-c", _HARNESS],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                start_new_session=True,
            ) as process:
                try:
                    # The harness reads all of it before the program starts, so this cannot block on it.
                    with contextlib.suppress(BrokenPipeError):
                        process.stdin.write(json.dumps(spec).encode())
                    with contextlib.suppress(BrokenPipeError):  # closed anyway, even when the flush fails
                        process.stdin.close()
                    stdout, stopped = _read_output(process, deadline, cap)
                finally:
                    # Before the harness is reaped, so that its group id cannot have been reused.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                errors = process.stderr.read(STDERR_CAP)
        finally:
            _remove_tree(workdir)
        if errors:
            message = errors.decode(errors="replace").strip().splitlines()[-1]
            raise RewardError(f"the code sandbox failed ({self.python}): {message}")
        header, _, rest = stdout.partition(b"\n")
        report = read_ready(header, token)
        if report is None:
            if stopped:  # killed before the harness got going: an overloaded machine
                return _Run(stopped, process.returncode, "", None, None)
            raise RewardError(
                f"the code sandbox did not start ({self.python}, exit code {process.returncode})"
            )
        passed = None
        if tests is not None and stopped is None:
            passed = read_results(rest, token, len(tests))
        output = rest.decode("utf-8", errors="replace") if tests is None else ""
        return _Run(stopped, process.returncode, output, passed, Isolation(**report))


def _read_output(process: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, str | None]:
    """The harness's stdout, read as it comes so that a flood never piles up in memory, and why it was cut
    short: "timeout" at the deadline, "output" past ``cap`` bytes, None at its end. The end is end of file,
    or, once the harness has exited, whatever is left in the pipe (a process that escaped may hold it)."""
    fd = process.stdout.fileno()
    chunks: list[bytes] = []
    size = 0
    exited = False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), "timeout"
            if not selector.select(0 if exited else min(remaining, EXIT_POLL_S)):
                if exited:
                    return b"".join(chunks), None
                # WNOWAIT leaves it a zombie: its process group stays ours to kill.
                exited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                continue
            data = os.read(fd, READ_CHUNK)
            if not data:
                return b"".join(chunks), None
            size += len(data)
            if size > cap:
                return b"".join(chunks), "output"
            chunks.append(data)


def _remove_tree(path: str) -> None:
    """Delete a program's directory, also where it took its own permissions away (``chmod 000``), which
    stops a non-root owner from listing it."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for directory, subdirectories, _ in os.walk(path):
        for name in subdirectories:
            subdirectory = os.path.join(directory, name)
            if not os.path.islink(subdirectory):
                with contextlib.suppress(OSError):
                    os.chmod(subdirectory, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _interpreters(python: str | None) -> list[str]:
    if python is not None:
        found = shutil.which(python)
        if found is None:
            raise ValueError(f"python: {python!r} is not an executable")
        return [found]
    candidates = [sys.executable, shutil.which("python3", path=SANDBOX_PATH)]
    unique: dict[str, str] = {}
    for candidate in candidates:
        if candidate:
            unique.setdefault(os.path.realpath(candidate), candidate)
    return list(unique.values())


@functools.cache
def _start(python: str | None, isolate_network: bool) -> tuple[str, Isolation]:
    """The interpreter that runs programs, and what the sandbox enforces here: the first candidate that runs
    an empty program, found once per process (a failure is not cached). Warns once of what does not hold."""
    limits = _limits(cpu_seconds=10, memory_mb=512, max_file_bytes=0, max_processes=8)
    failures = []
    candidates = _interpreters(python)
    for candidate in candidates:
        try:
            run = _Sandbox(candidate, 10.0, limits, 4096, isolate_network).run("", tests=())
        except RewardError as error:
            failures.append(str(error))
            continue
        if run.passed != () or run.isolation is None:
            failures.append(f"the code sandbox did not run a trial program with {candidate} ({run.stopped})")
            continue
        if candidate != candidates[0]:
            warnings.warn(
                f"code reward: the sandbox user cannot run {candidates[0]} ({failures[0]}); "
                f"programs run with {candidate}",
                RuntimeWarning,
                stacklevel=3,
            )
        if isolate_network and not run.isolation.network:
            warnings.warn(
                "code reward: no network namespace can be made here; programs keep the network access of "
                f"user {run.isolation.user}",
                RuntimeWarning,
                stacklevel=3,
            )
        if not run.isolation.pid_namespace:
            warnings.warn(
                "code reward: no PID namespace can be made here; a process a program starts in a new session "
                "can outlive it",
                RuntimeWarning,
                stacklevel=3,
            )
        return candidate, run.isolation
    raise RewardError("no Python interpreter can run sandboxed code: " + "; ".join(failures))


def _limits(*, cpu_seconds: float, memory_mb: int, max_file_bytes: int, max_processes: int) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(cpu_seconds),
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_FSIZE": max_file_bytes,
        "RLIMIT_NPROC": max_processes,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,
        "RLIMIT_CORE": 0,
    }


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_code_reward(
    *,
    timeout: float = 10.0,
    cpu_seconds: float | None = None,
    memory_mb: int = 512,
    max_output_bytes: int = 1_000_000,
    max_file_bytes: int = 10_000_000,
    max_processes: int = 32,
    max_parallel: int | None = None,
    python: str | None = None,
    isolate_network: bool = True,
) -> RewardFunc:
    """The ``code`` reward: per completion, the fraction of its row's tests its code passes (see the module's
    docstring for the sandbox and :func:`parse_tests` for the ``tests`` column).

    ``timeout``: wall-clock seconds per program run; ``cpu_seconds``: CPU seconds (default: ``timeout``);
    ``memory_mb``: address space; ``max_output_bytes``: stdout kept before the program is killed;
    ``max_file_bytes``: size of any file it writes; ``max_processes``: processes and threads at once;
    ``max_parallel``: programs run at once (default: the CPUs this process may use); ``python``: the
    interpreter (default: this one, or the system's ``python3`` when the sandbox user cannot run this one);
    ``isolate_network``: run programs without network (where namespaces can be made; else a warning).
    The returned function's ``isolation`` attribute says what the sandbox enforces here.
    """
    # A sandbox that cannot work would score every completion 0 without saying why: refuse it here.
    _check_seconds("timeout", timeout)
    if cpu_seconds is not None:
        _check_seconds("cpu_seconds", cpu_seconds)
    _check_count("memory_mb", memory_mb, 32)  # the interpreter needs part of it just to start
    _check_count("max_output_bytes", max_output_bytes, 1)
    _check_count("max_file_bytes", max_file_bytes, 0)
    _check_count("max_processes", max_processes, 1)
    if max_parallel is not None:
        _check_count("max_parallel", max_parallel, 1)
    if not isinstance(isolate_network, bool):
        raise ValueError(f"isolate_network must be true or false, got {isolate_network!r}")
    if python is not None and not isinstance(python, str):
        raise ValueError(f"python must be the path or name of an interpreter, got {python!r}")
    if not sys.platform.startswith("linux"):
        raise RewardError(f"the code reward's sandbox needs Linux, not {sys.platform}")
    interpreter, isolation = _start(python, isolate_network)
    limits = _limits(
        cpu_seconds=timeout if cpu_seconds is None else cpu_seconds,
        memory_mb=memory_mb,
        max_file_bytes=max_file_bytes,
        max_processes=max_processes,
    )
    sandbox = _Sandbox(interpreter, float(timeout), limits, max_output_bytes, isolate_network)
    workers = max_parallel or len(os.sched_getaffinity(0))

    @requires_columns("tests")
    def code_reward(prompts: list, completions: list, tests: list, **_: Any) -> list[float | None]:
        """The fraction of its row's tests each completion's code passes; None for a row without tests."""
        if len(tests) != len(completions):
            raise RewardError(f"{len(tests)} rows of 'tests' for {len(completions)} completions")
        suites = [parse_tests(row_tests, index) for index, row_tests in enumerate(tests)]
        codes = [extract_code(completion_text(completion)) for completion in completions]
        jobs: list[tuple[int, IOCase | None]] = []  # (completion, case): one program run each
        for index, (code, suite) in enumerate(zip(codes, suites)):
            if code is not None and suite is not None:
                jobs += [(index, case) for case in suite] if isinstance(suite, tuple) else [(index, None)]

        def execute(job: tuple[int, IOCase | None]) -> bool | tuple[bool, ...] | None:
            index, case = job
            if case is None:
                return sandbox.run(codes[index], tests=suites[index].steps).passed
            run = sandbox.run(codes[index], stdin=case.input)
            return run.stopped is None and run.returncode == 0 and _same_output(run.output, case.output)

        with ThreadPoolExecutor(max_workers=min(workers, max(len(jobs), 1))) as pool:
            outcomes = list(pool.map(execute, jobs))
        passed: list[int] = [0] * len(completions)
        for (index, case), outcome in zip(jobs, outcomes):
            if case is not None:
                passed[index] += outcome
            elif outcome is not None:
                passed[index] = sum(ok for ok, counts in zip(outcome, suites[index].counted) if counts)
        return [_fraction(count, suite) for count, suite in zip(passed, suites)]

    code_reward.isolation = isolation
    return code_reward
