"""Hand-computed checks of the clipped GRPO surrogate, its KL penalty, reductions, gradients and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from grpo.algo.losses import k3_kl, policy_loss

LN2 = math.log(2.0)
F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def _example():
    """B=2, T=3, one hidden token. Everything is built from ratios ρ = exp(logp − old) and δ = ref − logp.

    ρ = [[1.1, 1.5, 0.5], [1.0, 0.5, 3.0]],  A = [+1, −2],  mask = [[1, 1, 1], [1, 1, 0]],
    δ = [[ln 2, 0, ln 0.5], [0, 0, ln 4]].  ε = 0.2 so the clip range is [0.8, 1.2].

    Policy term −min(ρA, clip(ρ)A) per token:
      row 0 (A=+1): ρ=1.1 → −1.1;  ρ=1.5 → −min(1.5, 1.2) = −1.2 (clipped);  ρ=0.5 → −min(0.5, 0.8) = −0.5.
                    sum = −2.8 over 3 tokens.
      row 1 (A=−2): ρ=1.0 → 2.0;  ρ=0.5 → −min(−1.0, −1.6) = 1.6 (clipped);  ρ=3 hidden (would be 6).
                    sum = 3.6 over 2 tokens.
    k3 KL = exp(δ) − δ − 1: row 0 → [2 − ln2 − 1, 0, 0.5 + ln2 − 1] = [0.3068528, 0, 0.1931472], sum 0.5;
      row 1 → [0, 0, hidden], sum 0.
    """
    old = _t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    ratio = _t([[1.1, 1.5, 0.5], [1.0, 0.5, 3.0]])
    logps = (old + ratio.log()).requires_grad_(True)
    delta = _t([[LN2, 0.0, -LN2], [0.0, 0.0, 2 * LN2]])
    ref = logps.detach() + delta
    return {
        "logps": logps,
        "old_logps": old,
        "ref_logps": ref,
        "advantages": _t([1.0, -2.0]),
        "mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }


# Policy-term gradient −Aρ per token where the clip is inactive, 0 where it took over or the token is hidden.
EXAMPLE_POLICY_GRAD = _t([[-1.1, 0.0, -0.5], [2.0, 0.0, 0.0]])

# (loss_type, extra kwargs, per-row normaliser, loss with β=0, loss with β=0.1).
# Policy sums: row 0 = −2.8 (3 tokens), row 1 = 3.6 (2 tokens); KL sums: row 0 = 0.5, row 1 = 0.
REDUCTIONS = [
    # grpo: ((−2.8/3) + (3.6/2)) / 2 = 13/30 = 0.4333333; KL: 0.1·(0.5/3 + 0)/2 = 1/120 -> 53/120.
    ("grpo", {}, _t([[6.0], [4.0]]), 13 / 30, 53 / 120),
    # bnpo: (−2.8 + 3.6) / 5 tokens = 0.16; KL: 0.1·0.5/5 = 0.01.
    ("bnpo", {}, 5.0, 0.16, 0.17),
    # dapo without num_items_in_batch divides by mask.sum() = 5, like bnpo.
    ("dapo", {}, 5.0, 0.16, 0.17),
    # dapo with num_items_in_batch = 10: 0.8/10 = 0.08; KL: 0.1·0.5/10 = 0.005.
    ("dapo", {"num_items_in_batch": 10}, 10.0, 0.08, 0.085),
    # dr_grpo default max_completion_length = T = 3: 0.8/(2·3) = 2/15; KL: 0.1·0.5/6 = 1/120 -> 17/120.
    ("dr_grpo", {}, 6.0, 2 / 15, 17 / 120),
    # dr_grpo with max_completion_length = 4: 0.8/(2·4) = 0.1; KL: 0.1·0.5/8 = 0.00625.
    ("dr_grpo", {"max_completion_length": 4}, 8.0, 0.1, 0.10625),
]
REDUCTION_IDS = ["grpo", "bnpo", "dapo-default", "dapo-num-items", "dr_grpo-default", "dr_grpo-max-len"]


@pytest.mark.parametrize(("loss_type", "kwargs", "norm", "expected", "_"), REDUCTIONS, ids=REDUCTION_IDS)
def test_policy_loss_value_for_each_loss_type(loss_type, kwargs, norm, expected, _):
    loss, _metrics = policy_loss(**_example(), beta=0.0, loss_type=loss_type, **kwargs)
    assert_close(loss, torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize(("loss_type", "kwargs", "norm", "_", "expected"), REDUCTIONS, ids=REDUCTION_IDS)
def test_loss_with_kl_penalty_for_each_loss_type(loss_type, kwargs, norm, _, expected):
    loss, _metrics = policy_loss(**_example(), beta=0.1, loss_type=loss_type, **kwargs)
    assert_close(loss, torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize(("loss_type", "kwargs", "norm", "_a", "_b"), REDUCTIONS, ids=REDUCTION_IDS)
def test_policy_gradient_is_minus_a_rho_over_normaliser(loss_type, kwargs, norm, _a, _b):
    ex = _example()
    loss, _metrics = policy_loss(**ex, beta=0.0, loss_type=loss_type, **kwargs)
    loss.backward()
    # grpo: row 0 / (B·3) = /6, row 1 / (B·2) = /4 -> [[−1.1/6, 0, −0.5/6], [0.5, 0, 0]].
    assert_close(ex["logps"].grad, EXAMPLE_POLICY_GRAD / norm)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_token_affects_neither_loss_nor_gradient(loss_type, level):
    base = _example()
    loss, metrics = policy_loss(**base, beta=0.1, loss_type=loss_type, importance_sampling_level=level)
    for shift in (-2.0, 2.0):
        ex = _example()
        with torch.no_grad():
            ex["logps"][1, 2] += shift
        ex["old_logps"][1, 2] -= shift
        ex["ref_logps"][1, 2] += 3 * shift
        moved, moved_metrics = policy_loss(
            **ex, beta=0.1, loss_type=loss_type, importance_sampling_level=level
        )
        moved.backward()
        assert_close(moved, loss)
        assert ex["logps"].grad[1, 2] == 0
        assert moved_metrics == pytest.approx(metrics)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("masked_logp", [-100.0, float("-inf")])
def test_extreme_masked_logp_keeps_loss_finite(level, masked_logp):
    # Padding positions may hold any log-prob: a very negative one, or −inf from a masked logit. In float32,
    # exp(ref − logp) = exp(~97) overflows, and inf·0 is NaN; a hidden token must still not change the loss.
    def float32_example():
        ex = {k: v.detach().float() if v.is_floating_point() else v for k, v in _example().items()}
        ex["logps"].requires_grad_(True)
        return ex

    benign, _ = policy_loss(**float32_example(), beta=0.1, loss_type="bnpo", importance_sampling_level=level)
    ex = float32_example()
    with torch.no_grad():
        ex["logps"][1, 2] = masked_logp
    loss, metrics = policy_loss(**ex, beta=0.1, loss_type="bnpo", importance_sampling_level=level)
    assert_close(loss, benign)
    loss.backward()
    assert torch.isfinite(ex["logps"].grad).all()
    assert ex["logps"].grad[1, 2] == 0
    assert math.isfinite(metrics["kl"])


def test_clip_zeroes_gradient_only_on_the_clipped_side():
    # B=2, T=2, all tokens real, ε = 0.2 (clip range [0.8, 1.2]), bnpo so the normaliser is 4.
    # row 0, A=+1: ρ=1.5 > 1.2 -> −min(1.5, 1.2) = −1.2, clipped, gradient 0;
    #              ρ=0.5 < 0.8 -> −min(0.5, 0.8) = −0.5, unclipped (ratio low is not clipped for A > 0),
    #              gradient −Aρ/4 = −0.5/4 = −0.125.
    # row 1, A=−1: ρ=0.5 < 0.8 -> −min(−0.5, −0.8) = 0.8, clipped, gradient 0;
    #              ρ=1.5 > 1.2 -> −min(−1.5, −1.2) = 1.5, unclipped, gradient −Aρ/4 = 1.5/4 = 0.375.
    # loss = (−1.2 − 0.5 + 0.8 + 1.5) / 4 = 0.6/4 = 0.15.
    old = torch.zeros(2, 2, dtype=F64)
    logps = _t([[1.5, 0.5], [0.5, 1.5]]).log().requires_grad_(True)
    loss, metrics = policy_loss(
        logps, old, None, _t([1.0, -1.0]), torch.ones(2, 2), beta=0.0, epsilon_low=0.2, loss_type="bnpo"
    )
    loss.backward()
    assert_close(loss, torch.tensor(0.15, dtype=F64))
    assert_close(logps.grad, _t([[0.0, -0.125], [0.0, 0.375]]))
    # clip metrics: one low-clipped token (row 1, ρ=0.5, A<0) and one high-clipped (row 0, ρ=1.5, A>0) of 4.
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.25)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.25)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.5)


def test_epsilon_high_widens_only_the_upper_clip():
    # T=1, bnpo over 2 tokens. Token 0: ρ=1.25, A=+1. Token 1: ρ=0.75, A=−1.
    logps0 = _t([[math.log(1.25)], [math.log(0.75)]])
    old = torch.zeros(2, 1, dtype=F64)
    adv = _t([1.0, -1.0])
    mask = torch.ones(2, 1)

    # symmetric ε=0.2: 1.25 > 1.2 clipped -> −1.2, grad 0;
    # 0.75 < 0.8 clipped -> −min(−0.75, −0.8) = 0.8, grad 0.
    # loss = (−1.2 + 0.8)/2 = −0.2.
    logps = logps0.clone().requires_grad_(True)
    loss, metrics = policy_loss(logps, old, None, adv, mask, beta=0.0, epsilon_low=0.2, loss_type="bnpo")
    loss.backward()
    assert_close(loss, torch.tensor(-0.2, dtype=F64))
    assert_close(logps.grad, _t([[0.0], [0.0]]))
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.5)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.5)

    # clip-higher ε_high=0.28 (range [0.8, 1.28]): 1.25 now unclipped -> −1.25, grad −Aρ/2 = −0.625;
    # the lower side still uses ε_low = 0.2, so 0.75 stays clipped. loss = (−1.25 + 0.8)/2 = −0.225.
    logps = logps0.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        logps, old, None, adv, mask, beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo"
    )
    loss.backward()
    assert_close(loss, torch.tensor(-0.225, dtype=F64))
    assert_close(logps.grad, _t([[-0.625], [0.0]]))
    assert metrics["clip_ratio/high_mean"] == 0.0
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected_grad"),
    [
        # mask [[1,1,1],[1,0,0]], A = [2, −1], ρ = 1 everywhere, so the gradient is −A/normaliser.
        # grpo: row 0 / (2·3), row 1 / (2·1).
        ("grpo", {}, [[-2 / 6] * 3, [0.5, 0.0, 0.0]]),
        # bnpo: 4 real tokens.
        ("bnpo", {}, [[-0.5] * 3, [0.25, 0.0, 0.0]]),
        # dapo with 8 tokens in the whole generation batch.
        ("dapo", {"num_items_in_batch": 8}, [[-0.25] * 3, [0.125, 0.0, 0.0]]),
        # dr_grpo: B·T = 6.
        ("dr_grpo", {}, [[-1 / 3] * 3, [1 / 6, 0.0, 0.0]]),
    ],
    ids=["grpo", "bnpo", "dapo", "dr_grpo"],
)
def test_on_policy_gradient_is_minus_advantage_over_normaliser(loss_type, kwargs, expected_grad):
    old = _t([[-0.3, -1.2, -2.0], [-0.9, -0.1, -4.0]])
    logps = old.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        logps,
        old,
        None,
        _t([2.0, -1.0]),
        torch.tensor([[1, 1, 1], [1, 0, 0]]),
        beta=0.0,
        loss_type=loss_type,
        **kwargs,
    )
    loss.backward()
    assert_close(logps.grad, _t(expected_grad))
    assert metrics["ratio/mean"] == pytest.approx(1.0)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_on_policy_grpo_loss_value():
    # ρ = 1: per token −A. row 0 (A=2, 3 tokens) mean −2, row 1 (A=−1, 1 token) mean 1 -> (−2 + 1)/2 = −0.5.
    old = _t([[-0.3, -1.2, -2.0], [-0.9, -0.1, -4.0]])
    loss, _ = policy_loss(old, old, None, _t([2.0, -1.0]), torch.tensor([[1, 1, 1], [1, 0, 0]]), beta=0.0)
    assert_close(loss, torch.tensor(-0.5, dtype=F64))


def test_k3_kl_values():
    # δ = ref − logp: ln 2 -> 2 − ln2 − 1 = 0.3068528; 0 -> 0; ln 0.5 -> 0.5 + ln2 − 1 = 0.1931472.
    logps = _t([-1.0, -2.0, -3.0])
    ref = logps + _t([LN2, 0.0, -LN2])
    assert_close(k3_kl(logps, ref), _t([1 - LN2, 0.0, LN2 - 0.5]))


def test_kl_term_value_and_gradient():
    # ρ = 1 and A = 0, so the policy term and its gradient vanish; only β·KL remains.
    # δ = [ln 2, 0, ln 0.5] -> KL = [1 − ln2, 0, ln2 − 0.5], sum 0.5; grpo: β·0.5/3 = 0.1/6 = 1/60.
    # d/dlogp (exp(δ) − δ − 1) = 1 − exp(δ) = [1 − 2, 0, 1 − 0.5] = [−1, 0, 0.5]; times β/3 = 0.1/3:
    # [−1/30, 0, 1/60].
    old = _t([[-1.0, -2.0, -3.0]])
    logps = old.clone().requires_grad_(True)
    ref = old + _t([[LN2, 0.0, -LN2]])
    loss, metrics = policy_loss(logps, old, ref, _t([0.0]), torch.ones(1, 3), beta=0.1, loss_type="grpo")
    loss.backward()
    assert_close(loss, torch.tensor(1 / 60, dtype=F64))
    assert_close(logps.grad, _t([[-1 / 30, 0.0, 1 / 60]]))
    # the kl metric is the raw masked mean KL (not scaled by β): 0.5/3.
    assert metrics["kl"] == pytest.approx(1 / 6)


def test_kl_gradient_adds_to_policy_gradient():
    # example, grpo, β = 0.1. KL gradient 1 − exp(δ): row 0 [−1, 0, 0.5], row 1 [0, 0, hidden];
    # normalisers row 0: 6, row 1: 4. policy gradient from EXAMPLE_POLICY_GRAD.
    ex = _example()
    loss, _ = policy_loss(**ex, beta=0.1, loss_type="grpo")
    loss.backward()
    expected = _t([[(-1.1 - 0.1) / 6, 0.0, (-0.5 + 0.05) / 6], [2.0 / 4, 0.0, 0.0]])
    assert_close(ex["logps"].grad, expected)


def test_beta_zero_accepts_no_reference():
    ex = _example()
    ex["ref_logps"] = None
    loss, metrics = policy_loss(**ex, beta=0.0, loss_type="grpo")
    assert_close(loss, torch.tensor(13 / 30, dtype=F64))
    assert metrics["kl"] == 0.0


def test_beta_zero_ignores_reference():
    with_ref, _ = policy_loss(**_example(), beta=0.0, loss_type="bnpo")
    assert_close(with_ref, torch.tensor(0.16, dtype=F64))


def test_nonzero_beta_without_reference_raises():
    ex = _example()
    ex["ref_logps"] = None
    with pytest.raises(ValueError):
        policy_loss(**ex, beta=0.1)


def test_example_metrics():
    # Real-token ratios: [1.1, 1.5, 0.5, 1.0, 0.5] (the hidden 3.0 must not count).
    # low clip: ρ < 0.8 with A < 0 -> row 1 ρ=0.5: 1/5. high clip: ρ > 1.2 with A > 0 -> row 0 ρ=1.5: 1/5.
    # ratio mean = 4.6/5 = 0.92, min 0.5, max 1.5. kl = masked KL sum 0.5 / 5 tokens = 0.1.
    _, metrics = policy_loss(**_example(), beta=0.1, loss_type="grpo")
    assert metrics == pytest.approx(
        {
            "clip_ratio/low_mean": 0.2,
            "clip_ratio/high_mean": 0.2,
            "clip_ratio/region_mean": 0.4,
            "ratio/mean": 0.92,
            "ratio/min": 0.5,
            "ratio/max": 1.5,
            "kl": 0.1,
        }
    )


def _gspo_example():
    """Token log-ratios row 0: [3·ln 1.1, 0, 0] (mean ln 1.1 -> s = 1.1), row 1: [ln 0.5, ln 0.5, 5 hidden]
    (mean over the 2 real tokens ln 0.5 -> s = 0.5). A = [+1, −1], ε = 0.2."""
    old = _t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    log_ratio = _t([[3 * math.log(1.1), 0.0, 0.0], [-LN2, -LN2, 5.0]])
    logps = (old + log_ratio).requires_grad_(True)
    return logps, old, _t([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_sequence_level_loss_and_gradient():
    # row 0: s = 1.1 in [0.8, 1.2] -> −1.1 on each of 3 tokens; row 1: s = 0.5 < 0.8 with A < 0 ->
    # −min(−0.5, −0.8) = 0.8 on each of 2 tokens. grpo: (−1.1 + 0.8)/2 = −0.15.
    # gradient: row 0 contributes −s/2 and ds/dlogp_t = s/3 for its 3 tokens -> −1.1/6 each;
    # row 1 is clipped -> 0; the hidden token -> 0.
    logps, old, adv, mask = _gspo_example()
    loss, metrics = policy_loss(
        logps, old, None, adv, mask, beta=0.0, loss_type="grpo", importance_sampling_level="sequence"
    )
    loss.backward()
    assert_close(loss, torch.tensor(-0.15, dtype=F64))
    assert_close(logps.grad, _t([[-1.1 / 6] * 3, [0.0, 0.0, 0.0]]))
    # metrics count the sequence ratio once per real token: mean (3·1.1 + 2·0.5)/5 = 0.86;
    # low clip on row 1's 2 tokens: 2/5.
    assert metrics == pytest.approx(
        {
            "clip_ratio/low_mean": 0.4,
            "clip_ratio/high_mean": 0.0,
            "clip_ratio/region_mean": 0.4,
            "ratio/mean": 0.86,
            "ratio/min": 0.5,
            "ratio/max": 1.1,
            "kl": 0.0,
        }
    )


def test_sequence_level_gradient_with_bnpo():
    # row 0 masked sum = 3·(−s) with s = 1.1, over 5 tokens: d/dlogp_t (−3s/5) = −(3/5)(s/3) = −1.1/5 = −0.22.
    # loss = (−3.3 + 1.6)/5 = −0.34.
    logps, old, adv, mask = _gspo_example()
    loss, _ = policy_loss(
        logps, old, None, adv, mask, beta=0.0, loss_type="bnpo", importance_sampling_level="sequence"
    )
    loss.backward()
    assert_close(loss, torch.tensor(-0.34, dtype=F64))
    assert_close(logps.grad, _t([[-0.22] * 3, [0.0, 0.0, 0.0]]))


def test_token_level_on_the_gspo_example_clips_the_large_token():
    # token ratios row 0: [1.331, 1, 1] with A=+1 -> [−1.2 (clipped), −1, −1], mean −3.2/3;
    # row 1: [0.5, 0.5] with A=−1 -> 0.8 each, mean 0.8. grpo: (−3.2/3 + 0.8)/2 = −2/15.
    logps, old, adv, mask = _gspo_example()
    loss, _ = policy_loss(logps, old, None, adv, mask, beta=0.0, loss_type="grpo")
    assert_close(loss, torch.tensor(-2 / 15, dtype=F64))


def test_dapo_micro_batches_add_up_to_the_full_batch():
    # With num_items_in_batch = 5 (tokens of the whole batch): row 0 alone −2.8/5 = −0.56,
    # row 1 alone 3.6/5 = 0.72, sum 0.16 = the full-batch bnpo loss.
    ex = _example()
    parts = []
    for row in (0, 1):
        sliced = {k: v[row : row + 1] for k, v in ex.items()}
        loss, _ = policy_loss(**sliced, beta=0.0, loss_type="dapo", num_items_in_batch=5)
        parts.append(loss)
    assert_close(parts[0], torch.tensor(-0.56, dtype=F64))
    assert_close(parts[1], torch.tensor(0.72, dtype=F64))
    assert_close(parts[0] + parts[1], torch.tensor(0.16, dtype=F64))


def test_dapo_accepts_a_tensor_num_items_in_batch():
    # 0.8 / 10 = 0.08, as with the int.
    loss, _ = policy_loss(**_example(), beta=0.0, loss_type="dapo", num_items_in_batch=torch.tensor(10.0))
    assert_close(loss, torch.tensor(0.08, dtype=F64))


def test_dr_grpo_normaliser_does_not_depend_on_the_mask():
    # Hiding row 1's second token too: policy sum = −2.8 + 2.0 = −0.8 over 2·4 = 8 -> −0.1.
    ex = _example()
    ex["mask"] = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = policy_loss(**ex, beta=0.0, loss_type="dr_grpo", max_completion_length=4)
    assert_close(loss, torch.tensor(-0.1, dtype=F64))


def test_invalid_loss_type_raises():
    with pytest.raises(ValueError):
        policy_loss(**_example(), loss_type="ppo")  # type: ignore[arg-type]


def test_invalid_importance_sampling_level_raises():
    with pytest.raises(ValueError):
        policy_loss(**_example(), importance_sampling_level="batch")  # type: ignore[arg-type]
