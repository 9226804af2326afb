"""The warning signs of grpo.runs.diagnostics on hand-made histories: each fires when it should, with the
step and the numbers, and all stay silent on a healthy run."""

from __future__ import annotations

import json
from pathlib import Path

from grpo.runs.diagnostics import (
    Watch,
    diagnose,
    entropy_collapse,
    held_out_scores,
    kl_explosion,
    length_runaway,
    no_signal,
    reward_hacking,
    scan,
    truncation,
)


def healthy(steps: int = 30, **changes) -> list[dict]:
    """A run that learns: reward 0.5 → 1.8, solved 20% → 80%, length steady around 20 tokens, KL growing
    slowly to 0.03, entropy 1.2 → 0.8, a few groups without signal, few truncated completions. ``changes``
    maps a metric to a function of the step (1-based) that replaces it."""
    history = []
    for step in range(1, steps + 1):
        t = (step - 1) / max(steps - 1, 1)
        line = {
            "step": float(step),
            "reward": 0.5 + 1.3 * t + (0.05 if step % 2 else -0.05),
            "solved": 0.2 + 0.6 * t,
            "completions/mean_length": 20.0 + (step % 3),
            "completions/truncated_ratio": 0.05,
            "kl": 0.0 if step == 1 else 0.001 + 0.03 * t,
            "entropy/mean": 1.2 - 0.4 * t,
            "frac_reward_zero_std": 0.1 + 0.3 * t,
        }
        for key, value in changes.items():
            line[key] = value(step)
        history.append(line)
    return history


HEALTHY_HELD_OUT = [(0, 0.2), (10, 0.5), (20, 0.7), (30, 0.85)]


def test_a_healthy_run_raises_no_warning_at_any_step():
    history = healthy()
    for end in range(1, len(history) + 1):
        held_out = [p for p in HEALTHY_HELD_OUT if p[0] <= end]
        assert diagnose(history[:end], held_out) == [], f"step {end}"
    assert scan(history, HEALTHY_HELD_OUT) == []
    assert diagnose([]) == []


def test_reward_hacking_fires_when_the_reward_rises_and_the_held_out_score_falls():
    history = healthy()
    held_out = [(0, 0.2), (10, 0.6), (20, 0.5), (30, 0.3)]
    finding = reward_hacking(history, held_out)
    assert finding is not None and finding.kind == "reward_hacking" and finding.step == 30
    assert "step 30: the held-out solved rate fell from 60.0% (step 10) to 30.0%" in finding.message
    assert "training reward rose from 0.80 to 1.70" in finding.message
    # A dip is noise, not hacking: six questions of the 50 a check scores, on the same rows; eight are not.
    assert reward_hacking(history, [(0, 0.2), (10, 0.6), (30, 0.48)]) is None
    assert reward_hacking(history, [(0, 0.2), (10, 0.6), (30, 0.44)]) is not None
    # Both falling is a run getting worse, not a reward being exploited.
    falling = healthy(reward=lambda step: 2.0 - step * 0.05)
    assert reward_hacking(falling, held_out) is None
    # One held-out score (no comparison) says nothing.
    assert reward_hacking(history, [(0, 0.2)]) is None


def test_length_runaway_fires_when_completions_double_by_many_tokens():
    history = healthy(**{"completions/mean_length": lambda step: 20.0 + 3.0 * step})
    finding = length_runaway(history)
    assert finding is not None and finding.kind == "length_runaway"
    assert finding.message.startswith("step 30: completions grew from 29 to 104 tokens on average (3.6×)")
    # Doubling from 3 to 7 tokens on a short-answer task is not a runaway.
    short = healthy(**{"completions/mean_length": lambda step: 3.0 if step <= 5 else 7.0})
    assert length_runaway(short) is None
    assert length_runaway(history[:9]) is None, "needs two windows that do not overlap"


def test_truncation_fires_when_most_completions_hit_the_limit():
    history = healthy(**{"completions/truncated_ratio": lambda step: 0.8 if step > 20 else 0.1})
    finding = truncation(history)
    assert finding is not None
    assert finding.message.startswith(
        "step 30: 80% of the completions of the last 5 logged steps were cut at max_completion_length"
    )
    assert truncation(history[:20]) is None
    assert "of the last logged step were cut" in truncation(history[20:21]).message


def test_kl_explosion_fires_on_a_high_kl_or_a_tenfold_jump():
    high = healthy(kl=lambda step: 0.8 if step > 25 else 0.02)
    finding = kl_explosion(high)
    assert finding is not None and "averaged 0.800 per token over the last 5 logged steps" in finding.message
    jump = healthy(kl=lambda step: 0.2 if step > 25 else 0.01)
    finding = kl_explosion(jump)
    assert finding is not None
    assert "jumped from 0.0100 to 0.2000 per token (20×)" in finding.message
    # Early growth by large factors from near zero is normal.
    assert kl_explosion(healthy(kl=lambda step: 0.0 if step < 6 else 0.004)) is None
    # A healthy first climb from 0: 0.005 over five steps, then 0.10.
    assert kl_explosion(healthy(kl=lambda step: 0.005 if step <= 25 else 0.101)) is None
    assert kl_explosion(healthy(kl=lambda step: 0.001 * step)) is None


def test_a_tenfold_kl_jump_counts_only_once_the_kl_had_settled():
    # The default run's first climb: 0 at step 1, about 0.01 over steps 1–5, 0.12 over 6–10, 0.2 after.
    climb = healthy(kl=lambda step: 0.0 if step == 1 else 0.014 if step <= 5 else 0.12 if step <= 10 else 0.2)
    assert all(kl_explosion(climb[:end]) is None for end in range(1, 31))
    # The same tenfold jump after two windows that agree is an explosion.
    settled = healthy(kl=lambda step: 0.012 if step <= 20 else 0.15)
    finding = kl_explosion(settled[:25])
    assert finding is not None and "jumped from 0.0120 to 0.1500 per token (12×)" in finding.message
    # A window that had itself grown more than twofold was still climbing.
    assert (
        kl_explosion(healthy(kl=lambda step: 0.005 if step <= 15 else 0.012 if step <= 20 else 0.15)) is None
    )


UNSOLVED = {"solved": lambda step: 0.1}  # the run has not learned its prompts


def test_entropy_collapse_fires_near_zero_or_at_a_tenth_of_the_start():
    floor = healthy(**{"entropy/mean": lambda step: 0.01}, **UNSOLVED)
    assert "averaged 0.010 nats per token over the last 5 logged steps" in entropy_collapse(floor).message
    drop = healthy(**{"entropy/mean": lambda step: 2.0 if step <= 10 else 0.1}, **UNSOLVED)
    finding = entropy_collapse(drop)
    assert finding is not None
    assert "fell from 2.000 to 0.100 nats per token (5% of its start)" in finding.message
    without = [{k: v for k, v in line.items() if k != "entropy/mean"} for line in healthy()]
    assert entropy_collapse(without) is None, "no entropy logged: nothing to judge"


def test_entropy_collapse_reads_the_estimate_every_step_logs_and_the_exact_entropy_where_logged():
    def sampled(entropy) -> list[dict]:
        lines = healthy(entropy=entropy, **UNSOLVED)
        return [{k: v for k, v in line.items() if k != "entropy/mean"} for line in lines]

    finding = entropy_collapse(sampled(lambda step: 0.01))
    assert finding is not None and "averaged 0.010 nats per token" in finding.message
    assert entropy_collapse(sampled(lambda step: 0.8)) is None
    # Where both are logged, the exact one is judged (here healthy, 1.2 → 0.8), not the estimate.
    assert entropy_collapse(healthy(entropy=lambda step: 0.01, **UNSOLVED)) is None


def test_entropy_collapse_is_silent_when_the_run_has_converged_on_solutions():
    def run(**changes) -> list[dict]:
        # The default run's estimate: 0.65 nats per token at the start, 0.03 at the end.
        lines = healthy(entropy=lambda step: max(0.65 - 0.04 * step, 0.03), **changes)
        return [{k: v for k, v in line.items() if k != "entropy/mean"} for line in lines]

    assert entropy_collapse(run()) is None, "most completions solved, after the reward rose"
    # The same fall with most completions still unsolved is a collapse: the groups stop differing first.
    finding = entropy_collapse(run(solved=lambda step: 0.3))
    assert finding is not None and "averaged 0.030 nats per token" in finding.message
    # So is it where the reward never rose (a run from before ``solved`` was logged: judged on the reward).
    flat = [{k: v for k, v in line.items() if k != "solved"} for line in run(reward=lambda step: 1.0)]
    assert entropy_collapse(flat) is not None


def test_no_signal_fires_when_most_groups_have_equal_rewards():
    history = healthy(frac_reward_zero_std=lambda step: 0.9, reward=lambda step: 0.02)
    finding = no_signal(history)
    assert finding is not None
    assert finding.message.startswith(
        "step 30: in 90% of the groups of the last 5 logged steps every completion got the same reward "
        "(mean reward 0.02)"
    )
    assert no_signal(healthy(frac_reward_zero_std=lambda step: 0.5)) is None
    assert no_signal(history[:1]) is not None, "a first step without signal is worth saying at once"


def test_no_signal_is_silent_when_the_run_has_learned_its_prompts():
    # The reward rose to its maximum (2, two reward functions) and the groups score alike because every
    # completion is solved: the run succeeded.
    alike = {"frac_reward_zero_std": lambda step: 0.9}
    learned = healthy(**alike, reward=lambda step: min(0.8 + 0.1 * step, 2.0), solved=lambda step: 0.9)
    assert no_signal(learned) is None
    # Solved from the start, with a reward that barely moved: too easy, nothing to learn.
    stuck = healthy(**alike, reward=lambda step: 1.9 + 0.002 * step, solved=lambda step: 0.95)
    assert no_signal(stuck) is not None
    # A reward that rose, but with most completions still unsolved: the groups alike are failures.
    stalled = healthy(**alike, reward=lambda step: min(0.1 * step, 1.0), solved=lambda step: 0.2)
    assert no_signal(stalled) is not None


# The default run's metrics.jsonl (`grpo train`, seed 42): held-out 19.5% → 88.5% of 200 questions.
DEFAULT_RUN = Path(__file__).parent / "data" / "default_run_metrics.jsonl"
# Its held-out series as held_out_scores reads it from that run's files: every point on the first 50 rows,
# which the checks at steps 10 and 20 score (before and after scored 200).
DEFAULT_HELD_OUT = [(0, 0.18), (10, 0.78), (20, 0.80), (30, 0.86)]


def test_the_default_run_raises_no_warning_at_any_step():
    """A healthy run: its KL climbs from 0 to about 0.2 (0.011 over steps 1–5, 0.12 over 6–10); its entropy
    falls from 0.6 to 0.015 nats per token and up to 70% of its groups score alike, as 85% of its
    completions come to be solved."""
    history = [json.loads(line) for line in DEFAULT_RUN.read_text().splitlines()]
    assert len(history) == 30 and all("entropy" in line and "solved" in line for line in history)
    for end in range(1, len(history) + 1):
        held_out = [point for point in DEFAULT_HELD_OUT if point[0] <= end]
        assert diagnose(history[:end], held_out) == [], f"step {end}"
    assert scan(history, DEFAULT_HELD_OUT) == []


def test_watch_shows_each_warning_once_until_it_clears():
    bad = {5, 6, 7, 8, 9, 20, 21, 22, 23, 24}  # steps whose window is mostly without signal
    flat = {"reward": lambda step: 1.0}  # (a run whose reward rose would be one that learned its prompts)
    history = healthy(frac_reward_zero_std=lambda step: 1.0 if step in bad else 0.0, **flat)
    watch = Watch()
    shown = []
    for end in range(1, len(history) + 1):
        shown += [(end, f.kind) for f in watch.check(history[:end])]
    # The window mean (5 steps) crosses 0.75 at steps 8 and 23, and falls below it again at 11 and 26.
    assert shown == [(8, "no_signal"), (23, "no_signal")]
    episodes = scan(history)
    assert [(f.step, f.cleared_at) for f in episodes] == [(8, 11), (23, 26)]


def test_scan_counts_a_held_out_score_from_its_step():
    history = healthy()
    held_out = [(0, 0.2), (10, 0.6), (20, 0.3)]
    (finding,) = scan(history, held_out)
    assert finding.kind == "reward_hacking" and finding.step == 20 and finding.cleared_at is None


def test_held_out_scores_reads_the_evaluation_files_in_step_order(tmp_path):
    def write(name: str, solved: float) -> None:
        (tmp_path / name).write_text(json.dumps({"summary": {"solved": solved}, "rows": []}))

    write("eval_before.json", 0.1)
    write("eval_step10.json", 0.4)
    write("eval_step5.json", 0.3)
    write("eval_step30.json", 0.9)  # a later attempt's, beyond the step asked for
    write("eval_after.json", 0.5)
    (tmp_path / "eval_step7.json").write_text("{torn")
    scores = held_out_scores(tmp_path, up_to=20)
    assert [(step, s["solved"]) for step, s in scores] == [(0, 0.1), (5, 0.3), (10, 0.4)]
    scores = held_out_scores(tmp_path, up_to=20, after_at=20)
    assert [(step, s["solved"]) for step, s in scores][-1] == (20, 0.5)


def evaluation(solved: list[bool], accuracy: list[float]) -> dict:
    """An evaluation file as grpo writes it: a summary and one greedy record per row."""
    rows = [
        {"prompt": f"q{i}", "completions": ["…"], "scores": {"accuracy": [a]}, "solved": [flag]}
        for i, (flag, a) in enumerate(zip(solved, accuracy))
    ]
    summary = {
        "rows": float(len(rows)),
        "samples_per_row": 1.0,
        "solved": sum(solved) / len(solved),
        "reward/accuracy": sum(accuracy) / len(accuracy),
        "pass@1": sum(solved) / len(solved),
    }
    return {"summary": summary, "rows": rows}


def test_held_out_scores_compare_every_evaluation_on_the_rows_they_share(tmp_path):
    # Before and after score 8 rows, the check during training the first 4: the series is over those 4.
    before = evaluation([True, False, False, False, True, True, True, True], [1, 0, 0, 0, 1, 1, 1, 1])
    check = evaluation([True, True, False, False], [1.0, 1.0, 0.5, 0.0])
    after = evaluation([True, True, True, False, False, False, False, False], [1, 1, 1, 0, 0, 0, 0, 0])
    for name, content in [
        ("eval_before.json", before),
        ("eval_step5.json", check),
        ("eval_after.json", after),
    ]:
        (tmp_path / name).write_text(json.dumps(content))
    scores = held_out_scores(tmp_path, up_to=10, after_at=10)
    assert [(step, s["solved"], s["rows"]) for step, s in scores] == [
        (0, 0.25, 4),
        (5, 0.5, 4),
        (10, 0.75, 4),
    ]
    assert [s["reward/accuracy"] for _, s in scores] == [0.25, 0.625, 0.75]
    # Without a check on fewer rows, before and after are summarised as they were written (8 rows each).
    (tmp_path / "eval_step5.json").unlink()
    scores = held_out_scores(tmp_path, up_to=10, after_at=10)
    assert [(s["solved"], s["pass@1"]) for _, s in scores] == [(0.625, 0.625), (0.375, 0.375)]


def test_a_healthy_run_checked_on_fifty_rows_raises_no_reward_hacking_warning(tmp_path):
    """The default settings' files: before and after on 200 rows, checks at steps 10 and 20 on the first 50.
    The first 50 questions happen to be harder than the rest, and the check at step 20 solves three fewer
    of them than the one at step 10 (five lost, two gained): noise, on the same rows."""
    solved_before = [i % 5 == 0 if i < 50 else i % 3 != 0 for i in range(200)]  # 20% of the first 50; 55%
    checks = {10: [i < 14 for i in range(50)], 20: [5 <= i < 16 for i in range(50)]}  # 28%, then 22%
    solved_after = [i < 30 if i < 50 else i % 10 < 6 for i in range(200)]  # 60% of the first 50; 60%
    (tmp_path / "eval_before.json").write_text(json.dumps(evaluation(solved_before, [1.0] * 200)))
    for step, solved in checks.items():
        (tmp_path / f"eval_step{step}.json").write_text(json.dumps(evaluation(solved, [1.0] * 50)))
    (tmp_path / "eval_after.json").write_text(json.dumps(evaluation(solved_after, [1.0] * 200)))
    scores = held_out_scores(tmp_path, up_to=30, after_at=30)
    series = [(step, s["solved"]) for step, s in scores]
    assert series == [(0, 0.2), (10, 0.28), (20, 0.22), (30, 0.6)]
    history = healthy()  # the training reward rises throughout
    assert scan(history, series) == []
    # Against the before score over all 200 rows, the check at step 10 would seem a fall from 55%.
    assert reward_hacking(history[:10], [(0, 0.55), (10, 0.28)]) is not None
