"""Rule-based rewards on realistic inputs: math answers (GSM8K, boxed LaTeX, math-verify's equivalence and
its helper process), format layouts with partial credit, language consistency by script, DAPO's overlong
penalty."""

from __future__ import annotations

import math
import threading
import time

import pytest

from grpo.errors import RewardError
from grpo.rewards import build_rewards, math_answers, score
from grpo.rewards.math_answers import final_answer, reference_answer
from grpo.rewards.rules import (
    accuracy_reward,
    format_reward,
    make_accuracy,
    make_format,
    make_language_consistency,
    make_overlong_penalty,
    script_words,
)

GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def chat(text: str, role: str = "assistant") -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def accuracy(completion, reference, reward=accuracy_reward) -> float:
    (value,) = reward(["prompt"], [completion], answer=[reference])
    return value


@pytest.fixture(scope="module", autouse=True)
def warm_math_verify():
    """Start the math-verify helper once, so that timings below measure comparisons, not its start."""
    assert accuracy(r"\boxed{\frac{1}{2}}", "0.5") == 1.0


# --- finding the answer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("working\n<answer>7</answer>", "7"),
        (r"so \boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \fbox{2}", "2"),
        (r"\boxed{3} then a cut-off \boxed{\frac{4", "3"),
        ("48 + 24 = 72\n#### 72", "72"),
        ("#### 1,200\n", "1,200"),
        (r"<answer>8</answer> \boxed{7} #### 6", "8"),
        (r"<answer> </answer> \boxed{7}", "7"),
        (r"\boxed{7} #### 6", "7"),
        ("the answer is 7", None),
        ("", None),
    ],
)
def test_final_answer_prefers_the_answer_tag_then_the_box_then_gsm8k(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (GSM8K_REFERENCE, "72"),
        (r"Half of it: $\frac{4}{8} = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (" 1,200 ", "1,200"),
        (42, "42"),
    ],
)
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


# --- accuracy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        # GSM8K: a worked reference, completions ending in "#### n", a box or tags
        ("She sold 48/2 = 24 clips in May, 48 + 24 = 72 in all.\n#### 72", GSM8K_REFERENCE, 1.0),
        (r"So she sold $\boxed{72}$ clips.", GSM8K_REFERENCE, 1.0),
        ("<answer>72</answer>", GSM8K_REFERENCE, 1.0),
        ("She sold 48 + 48 = 96.\n#### 96", GSM8K_REFERENCE, 0.0),
        ("She sold 72 clips.", GSM8K_REFERENCE, 0.0),
        (r"<answer>\$1,200</answer>", "#### 1200", 1.0),
        # equal by value
        ("<answer>1,200</answer>", "1200", 1.0),
        (r"The probability is \boxed{\frac{1}{2}}.", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        ("<answer>1/2</answer>", "0.5", 1.0),
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\dfrac{1}{\sqrt{2}}", 1.0),
        (r"\boxed{(x-1)(x+1)}", "x^2-1", 1.0),
        (r"\boxed{50\%}", "0.5", 1.0),
        (r"\boxed{\dfrac{\pi}{2}}", r"\frac{\pi}{2}", 1.0),
        # not equal
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"\boxed{\sqrt{3}/2}", r"\frac{\sqrt{2}}{2}", 0.0),
        (r"\boxed{x^2+1}", "x^2-1", 0.0),
        ("<answer>0.33</answer>", r"\frac{1}{3}", 0.0),
        # asked for a number, an expression of the right value restates the question: not an answer
        ("<answer>47 + 38</answer>", "85", 0.0),
        ("<answer>80+5</answer>", "85", 0.0),
        ("<answer>90 - 5</answer>", "85", 0.0),
        (r"\boxed{17 \times 5}", "85", 0.0),
        (r"<answer>47\,+\,38</answer>", "85", 0.0),
        ("<answer>100 − 15</answer>", "85", 0.0),
        ("<answer>170 ÷ 2</answer>", "85", 0.0),
        (r"\boxed{(40 + 45)}", "85", 0.0),
        ("<answer>-85</answer>", "-85", 1.0),
        # ... but a number's forms, units and equations stay answers
        ("<answer>47 + 38 = 85</answer>", "85", 1.0),
        (r"\boxed{30^\circ}", "30", 1.0),
        (r"\boxed{3 \times 10^{8}}", "300000000", 1.0),
        (r"\boxed{x_1 = 5}", "5", 1.0),
        ("<answer>170/2</answer>", "85", 1.0),
        # words compare as text: math-verify would read both as the product p·a·r·i·s
        ("<answer>Pairs</answer>", "Paris", 0.0),
        ("<answer>paris</answer>", "Paris", 1.0),
        # no answer, or an empty one
        ("I am not sure.", "7", 0.0),
        (r"\boxed{}", "7", 0.0),
        ("<answer></answer>", "7", 0.0),
    ],
)
def test_accuracy(completion, reference, expected):
    assert accuracy(completion, reference) == expected
    assert accuracy(chat(completion), reference) == expected


def test_accuracy_sources_choose_where_the_answer_may_be():
    tags_only = make_accuracy(sources=["answer_tag"])
    assert accuracy(r"\boxed{72}", "72", tags_only) == 0.0
    assert accuracy("<answer>72</answer>", "72", tags_only) == 1.0
    boxed_first = make_accuracy(sources=["boxed", "answer_tag"])
    assert accuracy(r"<answer>71</answer> \boxed{72}", "72", boxed_first) == 1.0
    assert accuracy("#### 72", "72", make_accuracy(sources="gsm8k")) == 1.0


def test_accuracy_with_default_options_is_the_builtin_function():
    assert make_accuracy() is accuracy_reward
    assert make_accuracy(timeout=2.0) is not accuracy_reward
    assert make_accuracy(timeout=2.0).required_columns == ("answer",)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sources": ["boxed", "latex"]}, "'latex' unknown"),
        ({"sources": []}, "sources must name some of answer_tag, boxed, gsm8k"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": -1.0}, "timeout must be a positive number"),
        ({"timeout": math.inf}, "timeout must be a positive number"),
        ({"timeout": "1"}, "timeout must be a positive number"),
        ({"timeout": True}, "timeout must be a positive number"),
    ],
)
def test_accuracy_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        make_accuracy(**options)


def test_accuracy_options_from_a_config_entry():
    (reward,) = build_rewards([{"name": "accuracy", "sources": ["boxed"], "timeout": 2}])
    scores = score(
        [reward], ["p", "p"], [r"\boxed{\tfrac{3}{4}}", "<answer>0.75</answer>"], {"answer": ["0.75"] * 2}
    )
    assert scores.values.flatten().tolist() == [1.0, 0.0]
    with pytest.raises(RewardError, match="reward 'accuracy': sources must name some of"):
        build_rewards([{"name": "accuracy", "sources": ["latex"]}])


def test_an_answer_whose_evaluation_never_ends_scores_zero_within_its_timeout():
    reward = make_accuracy(timeout=0.5)
    start = time.perf_counter()
    # SymPy would compute 10^(10^(10^10)) in C, holding the GIL: only killing the helper process stops it.
    assert accuracy(r"\boxed{10^{10^{10^{10}}}}", "10", reward) == 0.0
    assert time.perf_counter() - start < 1.0
    assert accuracy(r"\boxed{\frac{2}{4}}", "0.5", reward) == 1.0  # a fresh helper took over


def test_accuracy_works_off_the_main_thread():
    """Rewards run in a worker thread when reward_timeout is set; signal-based timeouts would fail there."""
    results = []
    completions = [r"\boxed{\frac{1}{2}}", r"\boxed{9^{9^{9^{9}}}}", "#### 1,200", r"\boxed{\frac{1}{3}}"]
    reward = make_accuracy(timeout=0.5)
    worker = threading.Thread(
        target=lambda: results.append(reward(["p"] * 4, completions, answer=["0.5", "9", "1200", "0.5"]))
    )
    worker.start()
    worker.join(timeout=10)
    assert results == [[1.0, 0.0, 1.0, 0.0]]


def test_accuracy_survives_its_helper_being_killed():
    assert accuracy(r"\boxed{0.25}", r"\frac{1}{4}") == 1.0
    math_answers._MATH_VERIFY._process.kill()
    assert accuracy(r"\boxed{0.25}", r"\frac{1}{4}") == 1.0


def test_accuracy_without_math_verify_stops_with_a_clear_error(monkeypatch):
    missing = "from math_verify_not_installed import"
    broken = math_answers._WORKER_SOURCE.replace("from math_verify import", missing)
    monkeypatch.setattr(math_answers, "_WORKER_SOURCE", broken)
    verifier = math_answers.MathVerifier()
    with pytest.raises(RewardError, match=r"math-verify \(No module named 'math_verify_not_installed'\)"):
        verifier.equivalent("0.5", r"\frac{1}{2}", timeout=1.0)


def test_plain_numbers_never_start_math_verify(monkeypatch):
    """The default task's answers are whole numbers: they compare exactly, without the helper process."""

    def unreachable(*args):
        raise AssertionError("math-verify was called")

    monkeypatch.setattr(math_answers._MATH_VERIFY, "equivalent", unreachable)
    completions = ["3 + 4 = 7\n<answer>7</answer>", "<answer>8</answer>", "<answer>seven</answer>", "7"]
    assert accuracy_reward(["p"] * 4, completions, answer=["7"] * 4) == [1.0, 0.0, 0.0, 0.0]


# --- format -----------------------------------------------------------------------------------------------

THINK_ANSWER = ["think", "answer"]
REASONING = r"<reasoning>.+</reasoning>\s*<answer>\d+</answer>"


@pytest.mark.parametrize(
    ("options", "completion", "expected"),
    [
        # the default layout: working, then one non-empty answer block, then nothing
        ({}, "3 + 4 = 7\n<answer>7</answer>\n", 1.0),
        ({}, "<answer>7</answer> because 3 + 4 = 7", 0.0),
        ({"partial_credit": True}, "3 + 4 = 7\n<answer>7</answer>", 1.0),
        ({"partial_credit": True}, "<answer>7</answer> because 3 + 4 = 7", 2 / 3),
        ({"partial_credit": True}, "<answer>7", 1 / 3),
        ({"partial_credit": True}, "<answer>6</answer><answer>7</answer>", 0.0),
        ({"partial_credit": True}, "7", 0.0),
        # R1's layout: <think> then <answer>, nothing around them
        ({"tags": THINK_ANSWER}, "<think>3 + 4 = 7</think>\n<answer>7</answer>", 1.0),
        ({"tags": THINK_ANSWER}, "\n<think>\nadd them\n</think>\n\n<answer>\n7\n</answer>\n", 1.0),
        ({"tags": THINK_ANSWER}, "<answer>7</answer><think>3 + 4 = 7</think>", 0.0),
        ({"tags": THINK_ANSWER}, "Sure! <think>3 + 4 = 7</think><answer>7</answer>", 0.0),
        ({"tags": THINK_ANSWER}, "<think>3 + 4 = 7</think><answer> </answer>", 0.0),
        ({"tags": THINK_ANSWER}, "<think>a<answer>7</answer></think><answer>7</answer>", 0.0),
        ({"tags": THINK_ANSWER}, "3 + 4 = 7\n<answer>7</answer>", 0.0),
        # partial credit for two tags: a fifth per marker seen exactly once, the last fifth for the layout
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>3 + 4</think>\n<answer>7</answer>", 1.0),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<answer>7</answer><think>3 + 4</think>", 0.8),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>3 + 4</think><answer>7</answer> ok?", 0.8),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>3 + 4</think><answer></answer>", 0.8),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>a<think>b</think><answer>7</answer>", 0.6),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>3 + 4 = 7</think> 7", 0.4),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "<think>3 + 4 = 7", 0.2),
        ({"tags": THINK_ANSWER, "partial_credit": True}, "7", 0.0),
        ({"tags": "answer"}, "<answer>7</answer>", 1.0),
        ({"tags": "answer"}, "3 + 4 = 7 <answer>7</answer>", 0.0),
        # a pattern, matched against the whole (stripped) completion
        ({"pattern": REASONING}, "<reasoning>a\nb</reasoning> <answer>7</answer>", 1.0),
        ({"pattern": REASONING}, "<reasoning>a</reasoning><answer>seven</answer>", 0.0),
        ({"pattern": r"\d+"}, "  42\n", 1.0),
        ({"pattern": r"\d+"}, "42 apples", 0.0),
    ],
)
def test_format(options, completion, expected):
    reward = make_format(**options)
    for wrap in (str, chat):
        assert reward(["p"], [wrap(completion)]) == [pytest.approx(expected)]


def test_format_with_default_options_is_the_builtin_function():
    assert make_format() is format_reward


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pattern": "x", "tags": ["answer"]}, "either pattern or tags"),
        ({"pattern": "x", "partial_credit": True}, "partial_credit needs tags"),
        ({"pattern": "(unclosed"}, "not a regular expression"),
        ({"pattern": 42}, "not a regular expression"),
        ({"tags": []}, "tags must be a list of tag names"),
        ({"tags": ["<think>"]}, "tags must be a list of tag names"),
        ({"tags": ["answer", "answer"]}, "tags must not repeat"),
        ({"partial_credit": "yes"}, "partial_credit must be true or false"),
    ],
)
def test_format_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        make_format(**options)


def test_format_options_from_a_config_entry():
    (reward,) = build_rewards([{"name": "format", "tags": THINK_ANSWER, "partial_credit": True}])
    completions = ["<think>a</think><answer>7</answer>", "<think>a</think>"]
    assert score([reward], ["p", "p"], completions, {}).values.flatten().tolist() == pytest.approx([1.0, 0.4])


# --- language consistency ---------------------------------------------------------------------------------

ENGLISH = "How many clips did Natalia sell altogether?"
CHINESE = "娜塔莉亚一共卖了多少个发夹？"
RUSSIAN = "Сколько всего заколок продала Наталья?"


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        (ENGLISH, "She sold 48 + 24 = 72 clips.", 1.0),
        (ENGLISH, "她一共卖了72个。", 0.0),
        (ENGLISH, "Она продала 72 заколки.", 0.0),
        (CHINESE, "她一共卖了72个。", 1.0),
        (CHINESE, "She sold 72 clips.", 0.0),
        (CHINESE, "她卖了 72 clips。", 0.75),  # 她 卖 了 are three words, "clips" one
        (RUSSIAN, "Она продала 72 заколки.", 1.0),
        (RUSSIAN, "Она sold 72 заколки.", 2 / 3),
        (ENGLISH, "The answer is 四, that is four.", 6 / 7),
        # code and LaTeX math are in no language
        (
            CHINESE,
            "```python\nprint(sum([48, 24]))\n```\n答案是 $x_{all} = 72$，即 \\(\\frac{144}{2}\\)。",
            1.0,
        ),
        (RUSSIAN, "Итого: `clips = 48 + 24`, то есть $$\\text{clips} = 72$$.", 1.0),
        # Japanese is kana and kanji together
        ("日本の首都はどこですか？", "東京です。", 1.0),
        ("日本の首都はどこですか？", "Tokyo.", 0.0),
        # nothing to judge: no words in the completion, or none in the prompt
        (ENGLISH, "48 + 24 = 72", None),
        ("48 + 24 = ?", "72 clips", None),
    ],
)
def test_language_consistency(prompt, completion, expected):
    (value,) = make_language_consistency()([prompt], [completion])
    assert value == (None if expected is None else pytest.approx(expected))


def test_language_consistency_reads_the_last_user_message_of_a_chat():
    prompt = [
        {"role": "system", "content": "You are a helpful assistant. Answer in the language of the question."},
        *chat("What is 2 + 2?", "user"),
        *chat("4", "assistant"),
        *chat(CHINESE, "user"),
    ]
    reward = make_language_consistency()
    assert reward([prompt, prompt], [chat("一共七十二个。"), chat("72 in all.")]) == [1.0, 0.0]


def test_language_consistency_target_overrides_the_prompt():
    reward = make_language_consistency(target="Latin")
    assert reward([CHINESE, CHINESE], ["She sold 72 clips.", "她卖了72个"]) == [1.0, 0.0]
    assert make_language_consistency(target="japanese")(["?"], ["東京です"]) == [1.0]


@pytest.mark.parametrize("target", ["klingon", "", 3])
def test_language_consistency_target_is_checked(target):
    with pytest.raises(ValueError, match="target must be one of latin, greek, cyrillic"):
        make_language_consistency(target=target)


def test_script_words_counts_words_not_letters():
    counts = script_words("नमस्ते दुनिया! Hello, ＷＯＲＬＤ — 你好 $5 and $10")
    assert counts == {"DEVANAGARI": 2, "LATIN": 3, "HAN": 2}


# --- overlong penalty -------------------------------------------------------------------------------------


def test_overlong_penalty_at_the_boundaries():
    # max_length 10, cache 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
    reward = make_overlong_penalty(max_length=10, cache_length=4)
    lengths = [0, 6, 7, 8, 9, 10, 11, 500]
    values = reward(["p"] * 8, ["c"] * 8, completion_ids=[[1] * n for n in lengths])
    assert values == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]


def test_overlong_penalty_with_a_buffer_as_long_as_the_limit():
    reward = make_overlong_penalty(max_length=4, cache_length=4)
    assert reward(["p"] * 3, ["c"] * 3, completion_ids=[[], [7, 7], [7] * 4]) == [0.0, -0.5, -1.0]


def test_overlong_penalty_needs_completion_ids():
    reward = make_overlong_penalty(max_length=10, cache_length=4)
    with pytest.raises(RewardError, match="needs the completions' token ids"):
        reward(["p"], ["c"])
    with pytest.raises(RewardError, match="2 completion_ids for 1 completions"):
        reward(["p"], ["c"], completion_ids=[[1], [2]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_length": 0, "cache_length": 0}, "max_length must be a positive whole number"),
        ({"max_length": 100, "cache_length": 0}, "cache_length must be a positive whole number"),
        ({"max_length": 100.5, "cache_length": 10}, "max_length must be a positive whole number"),
        ({"max_length": True, "cache_length": 1}, "max_length must be a positive whole number"),
        ({"max_length": 10, "cache_length": 20}, r"cache_length \(20\) must not exceed max_length \(10\)"),
    ],
)
def test_overlong_penalty_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        make_overlong_penalty(**options)


# --- degenerate completions -------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["<answer>", r"\boxed{", "<think>", r"\(", "$$", "####"])
def test_a_degenerate_completion_is_scored_in_linear_time(unit):
    """A policy can repeat an unclosed marker up to the length limit; quadratic scans would stall the step."""
    completion = unit * 20_000
    start = time.perf_counter()
    accuracy(completion, "7")
    make_format(tags=THINK_ANSWER, partial_credit=True)(["p"], [completion])
    make_language_consistency()([ENGLISH], [completion])
    assert time.perf_counter() - start < 1.0
