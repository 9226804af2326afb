"""Math answers: a completion's final answer, a row's reference answer, and whether the two are equal.

Answers are read from the last ``<answer>…</answer>``, else the last ``\\boxed{…}``, else GSM8K's ``#### n``.
Plain numbers and word answers compare exactly, without math-verify; anything else (fractions, LaTeX,
percentages) by mathematical equivalence with math-verify, which runs in a helper process so that an answer
whose evaluation never ends can be stopped from any thread. The ``accuracy`` reward
(:mod:`grpo.rewards.rules`) and evaluation read and compare answers with these.
"""

from __future__ import annotations

import atexit
import json
import re
import selectors
import subprocess
import sys
import threading
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from grpo.errors import RewardError

# --- finding the final answer ---------------------------------------------------------------------------
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")
ANSWER_SOURCES = ("answer_tag", "boxed", "gsm8k")


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` block, stripped; None when there is none.

    Blocks are read left to right, each from an ``<answer>`` to the next ``</answer>`` (as a lazy regular
    expression would, but in one pass: ``re.findall`` takes quadratic time on a completion that repeats an
    unclosed ``<answer>`` to the length limit)."""
    found, position = None, 0
    while (start := text.find("<answer>", position)) >= 0:
        end = text.find("</answer>", start)
        if end < 0:
            break
        found, position = text[start + len("<answer>") : end], end + len("</answer>")
    return found.strip() if found is not None else None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{…}`` (or ``\\fbox{…}``), stripped; None when there is none.

    Braces are balanced rather than matched by a regular expression, so ``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``; a box cut off by the length limit does not count. One pass over the text, however
    many unclosed boxes a degenerate completion repeats."""
    starts = [found.end() for found in BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}  # the position after each "{" -> the position of its "}"
    open_braces: list[int] = []
    for position in range(starts[0] - 1, len(text)):
        if text[position] == "{":
            open_braces.append(position + 1)
        elif text[position] == "}" and open_braces:
            closing[open_braces.pop()] = position
    closed = [start for start in starts if start in closing]
    return text[closed[-1] : closing[closed[-1]]].strip() if closed else None


def extract_gsm8k(text: str) -> str | None:
    """What follows the last ``####`` on its line (GSM8K's answer marker), stripped; None without one."""
    found = GSM8K_ANSWER.findall(text)
    return found[-1].strip() if found else None


EXTRACTORS = {"answer_tag": extract_answer, "boxed": extract_boxed, "gsm8k": extract_gsm8k}


def final_answer(text: str, sources: Iterable[str] = ANSWER_SOURCES) -> str | None:
    """The answer from the first of ``sources`` that holds a non-empty one; None when none does."""
    for source in sources:
        found = EXTRACTORS[source](text)
        if found:
            return found
    return None


def reference_answer(reference: Any) -> str:
    """The answer part of a row's reference: after ``####`` for GSM8K's worked solutions, the last box of a
    MATH-style solution, else the whole reference (a plain answer, the usual case)."""
    text = str(reference).strip()
    return final_answer(text, ("gsm8k", "boxed")) or text


# --- comparing answers ------------------------------------------------------------------------------------
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# "1,200" and "-12,345.5" are numbers with thousands separators; "1,2" is not.
THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Letters and spaces only: math-verify would read "Paris" as the product p·a·r·i·s and match "Pairs".
WORDS = re.compile(r"[^\W\d_]+(?:\s+[^\W\d_]+)*")
# Asked for a number, a bare arithmetic expression of numbers ("47 + 38", "17 \\times 5", "100 ÷ 4")
# restates the question: math-verify would evaluate it and pay the reward. A fraction ("1/2",
# "\\frac{1}{2}"), a power (3 \\times 10^{8}), units and equations ("x = 5") are not bare arithmetic.
LATEX_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~|\$")
OPERATORS = {r"\times": "*", r"\cdot": "*", r"\div": "*", "×": "*", "·": "*", "÷": "*", "−": "-"}
OPERAND = r"\(*\s*-?\d+(?:\.\d+)?\s*\)*"
BARE_ARITHMETIC = re.compile(rf"{OPERAND}(?:\s*[-+*/]\s*{OPERAND})+")
FRACTION = re.compile(rf"{OPERAND}/{OPERAND}")


def is_bare_arithmetic(text: str) -> bool:
    text = LATEX_SPACING.sub(" ", text)
    for operator, plain in OPERATORS.items():
        text = text.replace(operator, plain)
    text = text.strip()
    return BARE_ARITHMETIC.fullmatch(text) is not None and FRACTION.fullmatch(text.replace(" ", "")) is None


# Seconds a math-verify comparison may take: far more than an ordinary answer needs, so that only one
# whose evaluation runs away is cut off.
DEFAULT_TIMEOUT_S = 1.0


def _as_number(text: str) -> str | None:
    """``text`` as a plain decimal number without thousands separators, or None if it is not one."""
    text = text.replace(",", "") if THOUSANDS_NUMBER.fullmatch(text) else text
    return text if NUMBER.fullmatch(text) else None


def answers_match(predicted: str, reference: str) -> bool:
    """Numbers compare exactly by value ("12" = "12.0", "1,200" = "1200"); other text after normalising."""
    predicted, reference = predicted.strip(), str(reference).strip()
    values = [_as_number(predicted), _as_number(reference)]
    if None not in values:
        return Decimal(values[0]) == Decimal(values[1])
    return " ".join(predicted.lower().split()) == " ".join(reference.lower().split())


def answers_equivalent(predicted: str, reference: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers are equal: exactly for plain numbers and word answers (fast, and
    math-verify would only blur them), by math-verify's mathematical equivalence otherwise —
    ``\\frac{1}{2}`` = 0.5, ``\\sqrt{2}/2`` = ``\\frac{\\sqrt{2}}{2}``, 50\\% = 0.5. An equivalence check
    that runs past ``timeout`` seconds counts as no match. Where the reference is a plain number, an
    arithmetic expression ("47 + 38", ``17 \\times 5``) is not an answer, whatever its value."""
    predicted, reference = predicted.strip(), reference.strip()
    if not predicted:
        return False
    if answers_match(predicted, reference):
        return True
    plain_numbers = _as_number(predicted) is not None and _as_number(reference) is not None
    if plain_numbers or WORDS.fullmatch(predicted) or WORDS.fullmatch(reference):
        return False
    if _as_number(reference) is not None and is_bare_arithmetic(predicted):
        return False
    return _MATH_VERIFY.equivalent(reference, predicted, timeout)


# The helper process: reads [reference, predicted] JSON lines, answers 1 or 0. Parses are wrapped in
# \boxed{} so that math-verify reads the whole answer as LaTeX (bare "\sqrt{2}/2" finds nothing). Its own
# timeouts stay off (they use SIGALRM); the parent kills the process instead. References' parses are cached:
# each row's reference is compared with every completion of its group.
_WORKER_SOURCE = r"""
import functools, json, sys
try:
    from math_verify import parse, verify
except ImportError as error:
    print(json.dumps(str(error)), flush=True)
    sys.exit(1)

def as_math(text):
    return parse("\\boxed{" + text + "}", parsing_timeout=None)

parse_reference = functools.lru_cache(maxsize=100_000)(as_math)
verify(as_math("x^2-1"), as_math("(x-1)(x+1)"), timeout_seconds=None)  # SymPy's lazy imports, off the clock
print("ready", flush=True)
for line in sys.stdin:
    reference, predicted = json.loads(line)
    print(int(verify(parse_reference(reference), as_math(predicted), timeout_seconds=None)), flush=True)
"""
_WORKER_START_TIMEOUT_S = 60.0


class MathVerifier:
    """math-verify in a helper process, one comparison at a time.

    math-verify bounds its own time with ``signal.alarm``, which works only in the main thread — and rewards
    run in a worker thread whenever ``reward_timeout`` is set. Worse, some answers (``10^{10^{10^{10}}}``)
    make SymPy compute a huge integer in C while holding the GIL, where no exception injected from another
    thread can stop it. A separate process can always be stopped: past its deadline it is killed, the
    comparison counts as no match, and the next comparison starts a fresh process (which imports SymPy
    again: a cost paid only after such a kill).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def equivalent(self, reference: str, predicted: str, timeout: float) -> bool:
        """Whether math-verify finds ``predicted`` equal to ``reference`` within ``timeout`` seconds. A helper
        that dies before answering (killed from outside, or out of memory) is replaced and asked once more."""
        request = json.dumps([reference, predicted]) + "\n"
        with self._lock:
            for _ in range(2):
                reply = self._ask(request, timeout)
                if reply in ("0", "1"):
                    return reply == "1"
                self.close()
                if reply is None:  # past the deadline: no second chance
                    break
            return False

    def close(self) -> None:
        """Stop the helper process, if one runs."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdin.close()
            self._process.stdout.close()
            self._process = None

    def _ask(self, request: str, timeout: float) -> str | None:
        """The helper's reply to one request: its line, "" if it died, None past ``timeout`` seconds."""
        if self._process is None:
            self._start()
        try:
            self._process.stdin.write(request)
            self._process.stdin.flush()
        except BrokenPipeError:
            return ""
        return self._read_line(timeout)

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # math-verify's warnings about unparsable answers
            text=True,
        )
        reply = self._read_line(_WORKER_START_TIMEOUT_S)
        if reply != "ready":
            self.close()
            detail = json.loads(reply) if reply and reply.startswith('"') else "it did not start"
            raise RewardError(
                f"comparing answers needs math-verify ({detail}): pip install 'math-verify>=0.9'"
            )

    def _read_line(self, timeout: float) -> str | None:
        """The helper's next line, stripped ("" once it has exited), or None if none comes in time."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return None
        return self._process.stdout.readline().strip()


_MATH_VERIFY = MathVerifier()
