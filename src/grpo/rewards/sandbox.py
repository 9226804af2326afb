"""The code reward's harness: the program that runs one completion's code, confined (see
:mod:`grpo.rewards.code` for the threat model and what is enforced).

The trainer reads this file's source once, when :mod:`grpo.rewards.code` is imported, and runs it as
``python -I -S -B -X utf8 -c <source>`` with a JSON spec on stdin (:data:`SPEC_KEYS`). So it must stay
self-contained: standard library only, never ``grpo`` (the interpreter runs isolated, without the trainer's
packages, and may be the system's rather than the trainer's), and Python 3.8: syntax, and annotations that
it can evaluate (quoted where not). No ``from __future__`` import either: ``compile`` and ``exec`` pass the
harness's future features on to the program's code, which must run as the interpreter runs any script.

Its first process (the trainer's user, trusted, never running the program) makes the namespaces, writes
"<token> ready <isolation>" and waits; the forked program process confines itself and runs the code. In
stdin mode the code runs as ``__main__`` and the interpreter exits as after a script; with tests it runs as
``solution``, then each test, and "<token> result <0/1 per test>" is written to a duplicate of stdout.
Anything on stderr before the program starts is a failure of the sandbox itself.

Importing this module (as its unit tests do) runs nothing: the harness starts only as ``__main__``.
"""

import json
import os
import resource
import signal
import sys
import types

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# What the trainer writes on stdin: the run's token, the uid programs run as when the harness is root,
# whether to make a network namespace, the resource limits by name, the code, and either the tests
# (a list of statements) or the stdin text (tests None; stdin None for /dev/null).
SPEC_KEYS = ("token", "uid", "isolate_network", "limits", "code", "tests", "stdin")
try:
    import ctypes

    LIBC = ctypes.CDLL(None, use_errno=True)
except (ImportError, OSError):
    LIBC = None


def libc(name: str, *args: int) -> bool:
    """Whether the C library's ``name(*args)`` returned 0 (False when there is no C library to call)."""
    return LIBC is not None and getattr(LIBC, name)(*args) == 0


def parse_spec(data: bytes) -> dict:
    """The run's spec from the JSON the trainer wrote; ValueError when it is not an object with every key."""
    spec = json.loads(data)
    if not isinstance(spec, dict):
        raise ValueError(f"the spec must be a JSON object, got {type(spec).__name__}")
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError("the spec lacks " + ", ".join(missing))
    return spec


def namespace_attempts(isolate_network: bool) -> list:
    """The namespaces to try making, best first: the first that ``unshare`` accepts is kept."""
    if isolate_network:
        return [CLONE_NEWPID | CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNET]
    return [CLONE_NEWPID]


def make_namespaces(isolate_network: bool, root: bool) -> int:
    """Move this process into new namespaces (its next child is the first in them); the flags made, 0 if none.

    In a new PID namespace the program's process is the init of its tree: when it ends, the kernel kills
    every process it started. Without root, a new user namespace is what allows the others."""
    own_user = 0 if root else CLONE_NEWUSER
    tries = namespace_attempts(isolate_network)
    return next((flags for flags in tries if libc("unshare", flags | own_user)), 0)


def isolation_report(made: int, user: int) -> dict:
    """What holds for the program, as the trainer's ``Isolation`` reads it."""
    return {"user": user, "network": bool(made & CLONE_NEWNET), "pid_namespace": bool(made & CLONE_NEWPID)}


def ready_line(token: str, isolation: dict) -> bytes:
    """The harness's first line: it started, and what holds."""
    return f"{token} ready {json.dumps(isolation)}\n".encode()


def result_line(token: str, passed: str) -> bytes:
    """The line that reports the tests, a "1" or "0" each: a line of its own even after output the program
    left unterminated."""
    return f"\n{token} result {passed}\n".encode()


def read_ready(header: bytes, token: str) -> "dict | None":
    """For the trainer: the isolation that the harness's first line (:func:`ready_line`) reports; None when
    ``header`` is not that line."""
    ready = f"{token} ready ".encode()
    return json.loads(header[len(ready) :]) if header.startswith(ready) else None


def read_results(output: bytes, token: str, count: int) -> "tuple[bool, ...] | None":
    """For the trainer: which of ``count`` tests passed, by the last :func:`result_line` in the harness's
    ``output``; None without one that has a "0" or "1" per test."""
    marker = f"{token} result ".encode()
    reports = [line[len(marker) :] for line in output.split(b"\n") if line.startswith(marker)]
    if reports and len(reports[-1]) == count and set(reports[-1]) <= set(b"01"):
        return tuple(bit == ord("1") for bit in reports[-1])
    return None


def exit_status(status: int) -> int:
    """The exit code to pass on for a child's wait status: its own, or 128 + the signal that killed it."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def input_file(text: "str | None") -> int:
    """The program's stdin: a sealed (read-only) memory file with the case's input, or /dev/null."""
    if text is None:
        return os.open(os.devnull, os.O_RDONLY)
    import fcntl

    fd = os.memfd_create("stdin", os.MFD_ALLOW_SEALING)
    data = memoryview(text.encode("utf-8"))
    while data:
        data = data[os.write(fd, data) :]
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def capped_limit(value: int, hard: int) -> int:
    """A limit no higher than the current hard one: a process may lower its hard limits, not raise them."""
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def rlimit_settings(limits: dict) -> "list[tuple[int, int]]":
    """(resource, value) for each of ``limits`` (``{"RLIMIT_CPU": seconds, ...}``), capped at this process's
    hard limits; ValueError for a name that is not a resource limit."""
    settings = []
    for name, value in limits.items():
        kind = getattr(resource, name, None) if name.startswith("RLIMIT_") else None
        if not isinstance(kind, int):
            raise ValueError(f"{name!r} is not a resource limit")
        settings.append((kind, capped_limit(value, resource.getrlimit(kind)[1])))
    return settings


def confine(spec: dict, root: bool, stdin: int) -> None:
    """Give up what the program must not have, each step while it is still allowed."""
    if root:
        try:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        except OSError as error:  # e.g. a user namespace that maps root but not this uid
            raise OSError(f"cannot switch to user {spec['uid']}: {error}") from None
        # Best effort: in a user namespace of its own, RLIMIT_NPROC counts this program's processes, not
        # those of every program running as the same user at the same time.
        libc("unshare", CLONE_NEWUSER)
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):
        raise PermissionError(f"user {os.getuid()} cannot read the standard library in {stdlib}")
    # No setuid binary gives privileges back; the process dies with the harness's first one.
    no_new_privs = libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if not (no_new_privs and libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)):
        raise OSError("prctl failed")
    for kind, value in rlimit_settings(spec["limits"]):
        # Soft = hard: the kernel ignores SIGXCPU sent to a namespace's init, but not SIGKILL.
        resource.setrlimit(kind, (value, value))
    os.dup2(stdin, 0)
    os.close(stdin)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def finishes(code, namespace: dict, exec=exec, SystemExit=SystemExit, BaseException=BaseException) -> bool:
    """Whether code runs to its end or exits with 0. Builtins are bound now, before the program runs."""
    try:
        exec(code, namespace)
    except SystemExit as stop:
        return stop.code is None or stop.code == 0
    except BaseException:
        return False
    return True


def run_tests(code: str, tests: list, namespace: dict, check=finishes) -> str:
    """Run ``code`` then each test in ``namespace``: "1" for each test that passed, "0" for the others (all
    "0" when the code itself fails). The tests are compiled before the code runs."""
    steps = [compile(source, f"test_{index}.py", "exec") for index, source in enumerate(tests)]
    ok = check(code, namespace)
    return "".join("1" if ok and check(step, namespace) else "0" for step in steps)


def run(spec: dict) -> None:
    """The program's process, once confined: run the code (and its tests)."""
    tests = spec["tests"]
    module = types.ModuleType("__main__" if tests is None else "solution")
    sys.modules[module.__name__] = module
    if tests is None:
        exec(compile(spec["code"], "solution.py", "exec"), module.__dict__)
        return
    # Bound before the program runs: it may replace builtins and this module's globals.
    write, exit_now, getpid, encode, token = os.write, os._exit, os.getpid, result_line, spec["token"]
    main_pid, results = getpid(), os.dup(1)
    passed = run_tests(spec["code"], tests, module.__dict__)
    if getpid() == main_pid:  # not a process the program forked that came back here
        write(results, encode(token, passed))
    exit_now(0)


def main() -> None:
    with open(0, "rb", closefd=False) as source:
        spec = parse_spec(source.read())
    uid = os.geteuid()
    root = uid == 0
    made = make_namespaces(spec["isolate_network"], root)
    os.write(1, ready_line(spec["token"], isolation_report(made, spec["uid"] if root else uid)))
    stdin = input_file(spec["stdin"])
    pid = os.fork()
    if pid == 0:
        confine(spec, root, stdin)
        run(spec)
    else:
        status = os.waitpid(pid, 0)[1]
        os._exit(exit_status(status))


if __name__ == "__main__":
    main()
