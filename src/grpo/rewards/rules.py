"""Rule-based rewards: no model, only the completion's text (and the row's columns).

* ``accuracy``: the completion's final answer — the last ``<answer>…</answer>``, else the last ``\\boxed{…}``,
  else GSM8K's ``#### n`` — against the row's ``answer``: plain numbers and word answers exactly, anything
  else (fractions, LaTeX, percentages) by mathematical equivalence with math-verify
  (:mod:`grpo.rewards.math_answers` reads and compares the answers).
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

import functools
import math
import numbers
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from grpo.errors import RewardError
from grpo.rewards.core import RewardFunc, completion_text, requires_columns
from grpo.rewards.math_answers import (
    ANSWER_SOURCES,
    DEFAULT_TIMEOUT_S,
    EXTRACTORS,
    answers_equivalent,
    extract_answer,
    final_answer,
    reference_answer,
)
from grpo.rewards.math_answers import answers_match as answers_match  # tests/data/test_gsm8k.py reads it


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
