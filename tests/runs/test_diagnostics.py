"""The warning signs of grpo.runs.diagnostics on hand-made histories: each fires when it should, with the
step and the numbers, and all stay silent on a healthy run."""

from __future__ import annotations

import json

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
    """A run that learns: reward 0.5 → 1.8, length steady around 20 tokens, KL growing slowly to 0.03,
    entropy 1.2 → 0.8, a few groups without signal, few truncated completions. ``changes`` maps a metric to
    a function of the step (1-based) that replaces it."""
    history = []
    for step in range(1, steps + 1):
        t = (step - 1) / max(steps - 1, 1)
        line = {
            "step": float(step),
            "reward": 0.5 + 1.3 * t + (0.05 if step % 2 else -0.05),
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
    # A small dip is noise, not hacking.
    assert reward_hacking(history, [(0, 0.2), (10, 0.6), (30, 0.58)]) is None
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


def test_entropy_collapse_fires_near_zero_or_at_a_tenth_of_the_start():
    floor = healthy(**{"entropy/mean": lambda step: 0.01})
    assert "averaged 0.010 nats per token over the last 5 logged steps" in entropy_collapse(floor).message
    drop = healthy(**{"entropy/mean": lambda step: 2.0 if step <= 10 else 0.1})
    finding = entropy_collapse(drop)
    assert finding is not None
    assert "fell from 2.000 to 0.100 nats per token (5% of its start)" in finding.message
    without = [{k: v for k, v in line.items() if k != "entropy/mean"} for line in healthy()]
    assert entropy_collapse(without) is None, "entropy is logged only with top_entropy_quantile < 1"


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


def test_watch_shows_each_warning_once_until_it_clears():
    bad = {5, 6, 7, 8, 9, 20, 21, 22, 23, 24}  # steps whose window is mostly without signal
    history = healthy(frac_reward_zero_std=lambda step: 1.0 if step in bad else 0.0)
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
