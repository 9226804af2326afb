"""Sampling and log-probs: the fast paths must give what the plain computations give."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.algo.logprobs import token_logps
from grpo.models.loading import enable_checkpointing
from grpo.rollout.generate import completion_mask_and_truncation, generate, stop_token_ids
from grpo.rollout.sampling import pick_tokens, prompt_positions
from grpo.rollout.scoring import completion_logps

PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "the answer is", "0 1 2"]


def completion_logps_unshared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The plain computation that :func:`completion_logps` must match: each prompt+completion run whole."""
    input_ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask[prompt_index], completion_mask.to(prompt_mask.dtype)], dim=1)
    width = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=prompt_positions(attention_mask),
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    return token_logps(logits, completion_ids, temperature)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tokenizer


def test_greedy_sampling_matches_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ours = generate(model, tokenizer, PROMPTS, num_generations=1, max_completion_length=12, greedy=True)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    reference = model.generate(
        **encoded,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    texts = tokenizer.batch_decode(reference[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    assert ours.texts == texts


def test_each_prompt_gets_its_group_and_sampling_is_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(3)
    first = generate(model, tokenizer, PROMPTS, num_generations=4, max_completion_length=10)
    torch.manual_seed(3)
    second = generate(model, tokenizer, PROMPTS, num_generations=4, max_completion_length=10)
    assert first.completion_ids.shape[0] == len(PROMPTS) * 4
    assert first.prompt_ids.shape[0] == len(PROMPTS)
    assert first.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert first.texts == second.texts
    assert len(set(first.texts)) > 1  # random weights at temperature 1 do not repeat themselves


def test_generation_batch_size_does_not_change_greedy_output(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    whole = generate(model, tokenizer, PROMPTS, num_generations=2, max_completion_length=8, greedy=True)
    split = generate(
        model, tokenizer, PROMPTS, num_generations=2, max_completion_length=8, greedy=True, batch_size=2
    )
    assert whole.texts == split.texts


def test_completion_mask_ends_at_the_first_stop_and_flags_truncation():
    ids = torch.tensor([[5, 6, 2, 9], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, truncated = completion_mask_and_truncation(ids, stop_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_shared_prompt_log_probs_and_gradients_match_the_plain_path(model_and_tokenizer, tiny_model):
    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, PROMPTS, num_generations=3, max_completion_length=9)
    model.train()
    args = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.prompt_index,
        rollout.completion_ids,
        rollout.completion_mask,
    )
    results = []
    for compute in (completion_logps, completion_logps_unshared):
        model.zero_grad()
        logps = compute(model, *args, temperature=0.7)
        (logps * rollout.completion_mask).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared, shared_grads), (plain, plain_grads) = results
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_in_place_weight_gradients_are_the_gradients_autograd_accumulates(
    model_and_tokenizer, tiny_model, tied
):
    """Two micro-batches' gradients, with the LM head and embedding putting theirs straight into .grad
    (sparse embedding gradients) and the prompt pass on stand-ins sharing the gradients, equal plain
    autograd's on the whole-sequence path."""
    from grpo.accel.chunked_head import chunked_completion_logps, in_place_weight_gradients
    from grpo.accel.memory import gradients_in_one_block

    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=tied)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, PROMPTS, num_generations=3, max_completion_length=9)
    model.train()
    halves = [slice(0, 4), slice(4, None)]

    def gradients(compute, in_place: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if in_place:  # as the trainer does: then the prompt pass runs on stand-ins sharing the gradients
            gradients_in_one_block(model.parameters())
        for rows in halves:
            args = (rollout.prompt_ids, rollout.prompt_mask, rollout.prompt_index[rows])
            args += (rollout.completion_ids[rows], rollout.completion_mask[rows])
            with in_place_weight_gradients(model) if in_place else contextlib.nullcontext():
                assert model.get_input_embeddings().sparse == in_place
                logps = compute(model, *args, temperature=0.7)
            (logps * rollout.completion_mask[rows]).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    in_place = gradients(chunked_completion_logps, in_place=True)
    assert not model.get_input_embeddings().sparse  # put back
    assert all(not g.is_sparse for g in in_place)
    for a, b in zip(in_place, gradients(completion_logps_unshared, in_place=False), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_log_probs_work_for_a_micro_batch_that_splits_a_group(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(1)
    rollout = generate(model, tokenizer, PROMPTS, num_generations=4, max_completion_length=6)
    rows = slice(2, 7)  # the end of group 0 and the start of group 1
    with torch.no_grad():
        args = (
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.prompt_index[rows],
            rollout.completion_ids[rows],
            rollout.completion_mask[rows],
        )
        shared, plain = completion_logps(model, *args), completion_logps_unshared(model, *args)
    mask = rollout.completion_mask[rows].bool()
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-5)


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    best = logits.argmax(dim=-1)
    assert torch.equal(pick_tokens(logits, temperature=1.0, top_p=1.0, top_k=1, greedy=False), best)
    assert torch.equal(pick_tokens(logits, temperature=1.0, top_p=1e-6, top_k=0, greedy=False), best)


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two tokens only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    torch.manual_seed(0)
    picked = pick_tokens(logits, temperature=1.0, top_p=0.7, top_k=0, greedy=False)
    assert set(picked.tolist()) == {0, 1}
    assert abs((picked == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def test_sampling_log_probs_equal_the_training_forward(model_and_tokenizer):
    """With μ > 1 the sampler's own log-probs stand in for a forward pass of the old policy."""
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(2)
    rollout = generate(
        model, tokenizer, PROMPTS, num_generations=3, max_completion_length=10, temperature=0.8
    )
    with torch.no_grad():
        recomputed = completion_logps(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.prompt_index,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=0.8,
        )
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampling_logps[mask], recomputed[mask], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_the_shared_prompt_and_changes_nothing(model_and_tokenizer, tiny_model):
    _, tokenizer = model_and_tokenizer
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    checkpointed = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    enable_checkpointing(checkpointed)
    torch.manual_seed(4)
    rollout = generate(plain, tokenizer, PROMPTS, num_generations=2, max_completion_length=8)
    args = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.prompt_index,
        rollout.completion_ids,
        rollout.completion_mask,
    )
    results = []
    for model, compute in (
        (plain, completion_logps_unshared),
        (plain, completion_logps),
        (checkpointed, completion_logps),
    ):
        model.zero_grad(set_to_none=True)
        mlp = model.model.layers[0].mlp
        rows_seen = []  # rows of each call of the first MLP: forward passes and recomputations (which
        # bypass module hooks, so the method itself is wrapped)
        mlp.forward = lambda x, forward=mlp.forward, seen=rows_seen: seen.append(len(x)) or forward(x)
        logps = compute(model, *args)
        (logps * rollout.completion_mask).sum().backward()
        del mlp.forward
        results.append((logps.detach(), [p.grad for p in model.parameters()], rows_seen))
    n_prompts, n_completions = len(PROMPTS), len(rollout.completion_ids)
    assert results[0][2] == [n_completions]  # each completion with its own copy of the prompt
    assert results[1][2] == [n_prompts, n_completions]  # the prompts once, then the completions
    assert results[2][2] == [n_prompts, n_completions, n_completions]  # ... recomputed in the backward pass
    mask = rollout.completion_mask.bool()
    for logps, grads, _ in results[1:]:
        torch.testing.assert_close(results[0][0][mask], logps[mask], atol=1e-5, rtol=1e-5)
        for a, b in zip(results[0][1], grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_selective_log_softmax_matches_log_softmax_in_value_and_gradient():
    from grpo.algo.logprobs import _SelectiveLogSoftmax, selective_log_softmax

    torch.manual_seed(0)
    logits = torch.randn(3, 300, 50, dtype=torch.float64, requires_grad=True)  # 900 rows: several chunks
    tokens = torch.randint(0, 50, (3, 300))
    weights = torch.randn(3, 300, dtype=torch.float64)
    assert logits[0].numel() // 50 > _SelectiveLogSoftmax.ROWS_PER_CHUNK
    ours = selective_log_softmax(logits, tokens)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    plain = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(grad_ours, grad_plain)
    assert torch.autograd.gradcheck(
        selective_log_softmax, (logits[:1, :4].detach().requires_grad_(), tokens[:1, :4])
    )


def test_selective_log_softmax_reusing_the_logits_gives_the_same_gradient():
    from grpo.algo.logprobs import selective_log_softmax

    torch.manual_seed(0)
    leaf = torch.randn(2, 300, 50, requires_grad=True)
    weights = torch.randn(2, 300)
    tokens = torch.randint(0, 50, (2, 300))
    grads = []
    for reuse in (False, True):
        fresh = leaf * 2  # a tensor that only the log-softmax reads, like a model's logits
        (grad,) = torch.autograd.grad((selective_log_softmax(fresh, tokens, reuse) * weights).sum(), leaf)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])
    fresh = leaf * 2
    logps = selective_log_softmax(fresh, tokens, reuse_logits=True)
    logps.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logps.sum().backward()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_worked_out_in_the_logits_memory_match_token_logps(temperature):
    from grpo.algo.logprobs import token_logps, token_logps_in_place

    torch.manual_seed(0)
    logits = torch.randn(2, 30, 50) * 4
    tokens = torch.randint(0, 50, (2, 30))
    expected = token_logps(logits, tokens, temperature)
    scratch = logits.clone()
    torch.testing.assert_close(token_logps_in_place(scratch, tokens, temperature), expected)
    assert not torch.equal(scratch, logits)  # it did use that memory
    half = logits.bfloat16()  # cast first, as token_logps does, leaving the caller's tensor alone
    torch.testing.assert_close(
        token_logps_in_place(half, tokens, temperature), token_logps(half, tokens, temperature)
    )
    assert torch.equal(half, logits.bfloat16())


def test_entropy_from_the_selective_log_softmax_matches_the_full_distribution():
    from grpo.algo.logprobs import selective_log_softmax_and_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 300, 50, dtype=torch.float64, requires_grad=True)  # several chunks
    tokens = torch.randint(0, 50, (2, 300))
    logps, entropy = selective_log_softmax_and_entropy(logits, tokens)
    full = torch.log_softmax(logits.detach(), dim=-1)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    torch.testing.assert_close(logps.detach(), full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert not entropy.requires_grad
    logps.sum().backward()  # the entropy output does not get in the way of the gradient
    assert logits.grad is not None


@pytest.mark.parametrize("routed", [False, True], ids=["blas", "onednn"])
@pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_chunked_lm_head_gives_the_log_probs_entropy_and_gradients_of_the_whole_logits(
    temperature, trained_head, routed, monkeypatch
):
    """head_token_logps never holds all the logits; what it computes must not differ from having them, with
    a trained head (logits recomputed in the backward pass) or a frozen one (expected embeddings kept), its
    products through BLAS or through oneDNN (a routed head)."""
    from grpo.accel import onednn
    from grpo.accel.chunked_head import _HeadLogSoftmax, head_token_logps

    monkeypatch.setattr(_HeadLogSoftmax, "ROWS_PER_CHUNK", 5)  # several chunks, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(trained_head)
    if routed:
        if not onednn.available():
            pytest.skip("this PyTorch build has no oneDNN")
        assert onednn.route_linears(head) == 1 and onednn.is_routed(head)
        monkeypatch.setattr(onednn, "_product", counted := _Counted(onednn._product))
    hidden = torch.randn(3, 4, 16, requires_grad=True)
    tokens = torch.randint(50, (3, 4))
    upstream = torch.randn(3, 4)

    logps, entropy = head_token_logps(hidden, head, tokens, temperature, with_entropy=True)
    (logps * upstream).sum().backward()
    got = (logps.detach(), entropy, hidden.grad.clone(), head.weight.grad)
    if routed:  # forward (and backward) products of every chunk
        assert counted.calls >= (3 if trained_head else 2) * 3

    # Without the entropy the forward pass works in the logits' own memory: the same log-probs and gradients.
    hidden.grad, head.weight.grad = None, None
    alone = head_token_logps(hidden, head, tokens, temperature)
    (alone * upstream).sum().backward()
    torch.testing.assert_close(alone.detach(), got[0])
    torch.testing.assert_close(hidden.grad, got[2])
    if trained_head:
        torch.testing.assert_close(head.weight.grad, got[3])

    hidden.grad, head.weight.grad = None, None
    whole = torch.log_softmax(head(hidden) / temperature, dim=-1)
    expected_logps = whole.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(whole.exp() * whole).sum(-1)
    (expected_logps * upstream).sum().backward()

    torch.testing.assert_close(got[0], expected_logps.detach())
    torch.testing.assert_close(got[1], expected_entropy.detach())
    torch.testing.assert_close(got[2], hidden.grad)
    if trained_head:
        torch.testing.assert_close(got[3], head.weight.grad)
    else:
        assert got[3] is None and head.weight.grad is None


class _Counted:
    """A function that counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_training_log_probs_skip_the_full_logits_where_the_head_allows(model_and_tokenizer):
    """chunked_completion_logps goes through the chunked head for a plain model and a LoRA one, and gives
    what the whole-logits path gives."""
    from peft import LoraConfig, get_peft_model

    from grpo.accel.chunked_head import chunked_completion_logps, plain_output_head

    model, tokenizer = model_and_tokenizer
    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    for policy in (model, lora):
        assert plain_output_head(policy) is not None
        rollout = generate(policy, tokenizer, PROMPTS, num_generations=2, max_completion_length=6)
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.prompt_index)
        args += (rollout.completion_ids, rollout.completion_mask)
        with torch.no_grad():
            torch.testing.assert_close(
                chunked_completion_logps(policy, *args, temperature=0.9),
                completion_logps_unshared(policy, *args, temperature=0.9),
                atol=1e-5,
                rtol=1e-5,
            )
