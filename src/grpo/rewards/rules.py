"""Rule-based rewards: no model, only the completion's text (and the row's columns).

* ``accuracy``: the completion's final answer — the last ``<answer>…</answer>``, else the last ``\\boxed{…}``,
  else GSM8K's ``#### n`` — against the row's ``answer``. Plain numbers and word answers compare exactly, in
  microseconds; anything else (fractions, LaTeX, percentages) by mathematical equivalence with math-verify,
  which runs in a helper process so that an answer whose evaluation never ends can be stopped from any thread.
* ``format``: the layout of the completion — working then one ``<answer>`` block (default), given tags in
  order (``<think>…</think><answer>…</answer>``), or a regular expression; optionally with partial credit.
* ``language_consistency``: the share of the completion's words written in the prompt's script (as
  DeepSeek-R1 used against language mixing in its reasoning).
* ``overlong``: DAPO's soft punishment of completions that near or pass the length limit.

Each ``make_*`` factory takes a config entry's options, checks them (``ValueError`` naming the option) and
returns the reward function; with no options, ``make_accuracy`` and ``make_format`` return the module's
``accuracy_reward`` and ``format_reward``.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import numbers
import re
import selectors
import subprocess
import sys
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from grpo.errors import RewardError
from grpo.rewards.core import RewardFunc, completion_text, requires_columns

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
# Seconds a math-verify comparison may take: ordinary answers take milliseconds.
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
    that runs past ``timeout`` seconds counts as no match."""
    predicted, reference = predicted.strip(), reference.strip()
    if not predicted:
        return False
    if answers_match(predicted, reference):
        return True
    plain_numbers = _as_number(predicted) is not None and _as_number(reference) is not None
    if plain_numbers or WORDS.fullmatch(predicted) or WORDS.fullmatch(reference):
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
    comparison counts as no match, and the next one starts a fresh process (about a second).
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


# --- accuracy -------------------------------------------------------------------------------------------
def _accuracy_scores(
    completions: list, references: list, sources: Sequence[str], timeout: float
) -> list[float]:
    scores = []
    for completion, reference in zip(completions, references):
        predicted = final_answer(completion_text(completion), sources)
        expected = reference_answer(reference)
        scores.append(float(predicted is not None and answers_equivalent(predicted, expected, timeout)))
    return scores


@requires_columns("answer")
def accuracy_reward(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
    """1.0 when the completion's final answer (last ``<answer>`` block, else last ``\\boxed{}``, else
    ``#### n``) equals the row's ``answer`` — mathematically, see :func:`answers_equivalent` — else 0.0."""
    return _accuracy_scores(completions, answer, ANSWER_SOURCES, DEFAULT_TIMEOUT_S)


def make_accuracy(
    *, sources: Sequence[str] | str = ANSWER_SOURCES, timeout: float = DEFAULT_TIMEOUT_S
) -> RewardFunc:
    """The accuracy reward reading the answer from ``sources`` (in order of preference; some of
    ``answer_tag``, ``boxed``, ``gsm8k``, or one as a string), giving each math-verify comparison ``timeout``
    seconds."""
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    unknown = [s for s in sources if s not in EXTRACTORS]
    if not sources or unknown:
        raise ValueError(
            f"sources must name some of {', '.join(ANSWER_SOURCES)}; got {list(sources)}"
            + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
        )
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if sources == ANSWER_SOURCES and timeout == DEFAULT_TIMEOUT_S:
        return accuracy_reward

    @requires_columns("answer")
    def accuracy(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
        """1.0 when the completion's final answer equals the row's ``answer``, else 0.0."""
        return _accuracy_scores(completions, answer, sources, timeout)

    return accuracy


# --- format ---------------------------------------------------------------------------------------------
# Free text (the working), then exactly one answer block, then nothing but whitespace.
ANSWER_FORMAT = re.compile(r"(?:(?!<answer>).)*<answer>(?:(?!</?answer>).)+</answer>\s*", re.DOTALL)
TAG_NAME = re.compile(r"[A-Za-z_][\w-]*")


def _default_format(text: str) -> bool:
    return ANSWER_FORMAT.fullmatch(text) is not None and bool(extract_answer(text))


def format_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 when the completion is working followed by exactly one non-empty ``<answer>…</answer>`` and
    nothing after it, else 0.0."""
    return [float(_default_format(completion_text(c).strip())) for c in completions]


def _tags_format(tags: Sequence[str]) -> re.Pattern[str]:
    """Each tag's block in order, separated only by whitespace, none holding a tag of ``tags``."""
    any_tag = "|".join(map(re.escape, tags))
    body = rf"((?:(?!</?(?:{any_tag})>).)*)"
    return re.compile(r"\s*".join(rf"<{re.escape(t)}>{body}</{re.escape(t)}>" for t in tags), re.DOTALL)


def make_format(
    *, pattern: str | None = None, tags: Sequence[str] | None = None, partial_credit: bool = False
) -> RewardFunc:
    """The format reward: 1.0 for a completion (stripped of surrounding whitespace) of the right layout.

    * default: working, then exactly one non-empty ``<answer>…</answer>``, then nothing
      (:func:`format_reward`);
    * ``tags=["think", "answer"]``: only these blocks, in this order, each once and non-empty, with nothing
      but whitespace around them (DeepSeek-R1's layout); ``tags="answer"`` for one;
    * ``pattern``: a regular expression the whole completion must match (``re.fullmatch``, ``re.DOTALL``).

    ``partial_credit`` (tags or default) rewards getting closer: with n tags there are 2n markers
    (``<t>``, ``</t>``), and a completion of the wrong layout scores k / (2n + 1), k being the markers that
    appear exactly once; only the exact layout scores 1. Two tags: 0, 0.2, 0.4, 0.6, 0.8, 1. A pattern has no
    parts to credit, so it takes no ``partial_credit``.
    """
    if pattern is not None and tags is not None:
        raise ValueError("give either pattern or tags, not both")
    if not isinstance(partial_credit, bool):
        raise ValueError(f"partial_credit must be true or false, got {partial_credit!r}")
    if pattern is not None:
        if partial_credit:
            raise ValueError("partial_credit needs tags (or the default layout); a pattern has no parts")
        try:
            regex = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as error:
            raise ValueError(f"pattern {pattern!r} is not a regular expression: {error}") from None

        def matches(text: str) -> bool:
            return regex.fullmatch(text) is not None

        markers: tuple[str, ...] = ()
    elif tags is not None:
        tags = [tags] if isinstance(tags, str) else list(tags)
        if not tags or not all(isinstance(t, str) and TAG_NAME.fullmatch(t) for t in tags):
            raise ValueError(f"tags must be a list of tag names such as [think, answer], got {tags!r}")
        if len(set(tags)) != len(tags):
            raise ValueError(f"tags must not repeat, got {tags!r}")
        layout = _tags_format(tags)

        def matches(text: str) -> bool:
            found = layout.fullmatch(text)
            return found is not None and all(block.strip() for block in found.groups())

        markers = tuple(m for t in tags for m in (f"<{t}>", f"</{t}>"))
    elif not partial_credit:
        return format_reward
    else:
        matches, markers = _default_format, ("<answer>", "</answer>")

    def format_score(text: str) -> float:
        if matches(text):
            return 1.0
        if not partial_credit:
            return 0.0
        return sum(text.count(m) == 1 for m in markers) / (len(markers) + 1)

    def format_(prompts: list, completions: list, **_: Any) -> list[float]:
        """1.0 for the configured layout, else 0.0 (or the partial credit)."""
        return [format_score(completion_text(c).strip()) for c in completions]

    return format_


# --- language consistency -------------------------------------------------------------------------------
# Not language: code, LaTeX math ($…$ only when it hugs its content, so "$5 and $10" stays text) and
# LaTeX commands. An unclosed code block or display runs to the end, which also keeps the scan linear.
NOT_LANGUAGE = re.compile(
    r"```.*?(?:```|\Z)|`[^`\n]*`|\$\$.*?(?:\$\$|\Z)|\$(?=\S)[^$\n]*?(?<=\S)\$"
    r"|\\\(.*?(?:\\\)|\Z)|\\\[.*?(?:\\\]|\Z)|\\[A-Za-z]+",
    re.DOTALL,
)
# The script of a letter is the first word of its Unicode name ("CYRILLIC SMALL LETTER A"), after these.
SCRIPT_ALIASES = {
    "CJK": "HAN",
    "IDEOGRAPHIC": "HAN",
    "HIRAGANA": "KANA",
    "KATAKANA": "KANA",
    "KATAKANA-HIRAGANA": "KANA",  # the long-vowel mark ー
}
WIDTH_PREFIXES = ("FULLWIDTH ", "HALFWIDTH ")
# Scripts written without spaces between words: each letter counts as a word.
UNSPACED = {"HAN", "KANA"}
SCRIPTS = [
    *("latin", "greek", "cyrillic", "armenian", "georgian", "hebrew", "arabic", "syriac", "thaana"),
    *("devanagari", "bengali", "gurmukhi", "gujarati", "oriya", "tamil", "telugu", "kannada", "malayalam"),
    *("sinhala", "thai", "lao", "tibetan", "myanmar", "khmer", "ethiopic", "mongolian"),
    *("hangul", "han", "kana"),
]
# Japanese writes with kana and kanji (Han) together; "japanese" as a target accepts both.
JAPANESE = frozenset({"HAN", "KANA"})
TARGETS = {**{s: frozenset({s.upper()}) for s in SCRIPTS}, "japanese": JAPANESE}


@functools.lru_cache(maxsize=65536)
def letter_script(char: str) -> str:
    """The script of a letter, as an upper-case name: ``"LATIN"``, ``"HAN"``, ``"KANA"``, ``"CYRILLIC"``…"""
    name = unicodedata.name(char, "UNKNOWN")
    for prefix in WIDTH_PREFIXES:
        name = name.removeprefix(prefix)
    first = name.split(" ", 1)[0]
    return SCRIPT_ALIASES.get(first, first)


def script_words(text: str) -> Counter[str]:
    """Words per script. A word is a run of letters of one script (combining marks, such as Devanagari's
    vowel signs, belong to the letter before them); in Han and kana each letter is a word. Digits,
    punctuation, code and LaTeX math are not counted."""
    counts: Counter[str] = Counter()
    previous = None
    for char in NOT_LANGUAGE.sub(" ", text):
        category = unicodedata.category(char)
        if category.startswith("M") and previous:
            continue
        if not category.startswith("L"):
            previous = None
            continue
        script = letter_script(char)
        if script != previous or script in UNSPACED:
            counts[script] += 1
        previous = script
    return counts


def prompt_text(prompt: Any) -> str:
    """The text that sets a prompt's language: the whole of a string prompt, a chat's last user message."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""
    return str(prompt)


@functools.lru_cache(maxsize=4096)  # a prompt comes once per completion of its group
def text_language(text: str) -> frozenset[str] | None:
    """The scripts a text's language is written in: its dominant script, with Han and kana together for
    Japanese; None when the text has no words."""
    counts = script_words(text)
    if not counts:
        return None
    dominant = counts.most_common(1)[0][0]
    return JAPANESE if dominant in JAPANESE and counts["KANA"] else frozenset({dominant})


def make_language_consistency(*, target: str | None = None) -> RewardFunc:
    """The share of the completion's words in the prompt's script (or ``target``'s), from 0 to 1.

    The language is told by its script, with the standard library only: English and French are both Latin,
    Russian is Cyrillic, Chinese is Han, Japanese is Han and kana. ``target`` (``latin``, ``cyrillic``,
    ``han``, ``japanese``…) fixes it for every row, for prompts in one language that ask for answers in
    another. A completion without words, or a prompt without words and no ``target``, gets None (not
    applicable): a bare number is in no language, so it neither earns nor loses anything.
    """
    if target is not None and (not isinstance(target, str) or target.lower() not in TARGETS):
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    fixed = TARGETS[target.lower()] if target is not None else None

    def language_consistency(prompts: list, completions: list, **_: Any) -> list[float | None]:
        """The share of each completion's words in its prompt's language; None without words."""
        scores: list[float | None] = []
        for prompt, completion in zip(prompts, completions):
            accepted = fixed or text_language(prompt_text(prompt))
            counts = script_words(completion_text(completion))
            total = sum(counts.values())
            if accepted is None or not total:
                scores.append(None)
            else:
                scores.append(sum(counts[s] for s in accepted) / total)
        return scores

    return language_consistency


# --- length ---------------------------------------------------------------------------------------------
def make_overlong_penalty(*, max_length: int, cache_length: int) -> RewardFunc:
    """DAPO's soft overlong punishment, on the completion's length L in tokens:

    * 0 for L ≤ max_length − cache_length;
    * (max_length − cache_length − L) / cache_length inside the last ``cache_length`` tokens, falling
      linearly from 0 to −1 at L = max_length;
    * −1 beyond ``max_length``.

    Truncated completions get no reward for their (missing) answer anyway; this also tells the policy that
    nearing the limit costs, before it hits it. Set ``max_length`` to the run's ``max_completion_length``.
    Lengths come from ``completion_ids``, which the trainer passes to every reward function.
    """
    for option, value in (("max_length", max_length), ("cache_length", cache_length)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{option} must be a positive whole number of tokens, got {value!r}")
    if cache_length > max_length:
        raise ValueError(f"cache_length ({cache_length}) must not exceed max_length ({max_length})")
    start = max_length - cache_length

    def overlong_penalty(
        prompts: list, completions: list, completion_ids: Sequence[Sequence[int]] | None = None, **_: Any
    ) -> list[float]:
        """0 up to the buffer, falling to -1 through it, -1 past ``max_length`` tokens."""
        if completion_ids is None:
            raise RewardError(
                "the overlong penalty needs the completions' token ids (completion_ids), which grpo's "
                "trainer passes; call it with completion_ids=[[token ids] per completion]"
            )
        if len(completion_ids) != len(completions):
            raise RewardError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
        lengths = [len(ids) for ids in completion_ids]
        return [0.0 if n <= start else max(-1.0, (start - n) / cache_length) for n in lengths]

    return overlong_penalty
