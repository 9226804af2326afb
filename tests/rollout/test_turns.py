"""Multi-turn decoding (grpo.rollout.sampling.decode with ``turn_ends``): rows keep their key/value cache
across turns, fed tokens take their places unsampled, and the log-probs are those a plain forward pass gives
the same tokens.

The random tiny model rarely samples its end-of-turn token, so these tests end a turn at any of a handful of
common tokens: every row then takes several turns within a few dozen positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.accel.fused import fused_decoding
from grpo.rollout.backends import DefaultBackend
from grpo.rollout.generate import tokenize_prompts
from grpo.rollout.sampling import decode, group_uniforms
from grpo.rollout.scoring import completion_logps

PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "the answer is"]
STOPS = list(range(40, 60))  # a turn ends at any of these


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


class Feeder:
    """``turn_ends``: after a row's first two turns feed it 2 + (row % 4) tokens (then end it); records
    every call."""

    def __init__(self, turns: int = 2):
        self.turns, self.calls, self.taken = turns, [], {}

    def __call__(self, rows: list[int], turns: list[list[int]], last: bool) -> list[list[int] | None]:
        feeds = []
        for row, turn in zip(rows, turns):
            self.calls.append((row, turn, last))
            self.taken[row] = self.taken.get(row, 0) + 1
            feeds.append([7 + i for i in range(2 + row % 4)] if self.taken[row] <= self.turns else None)
        return feeds


def run(model, tokenizer, prompts=PROMPTS, g=3, seeds=(11, 12), steps=None, **options):
    ids, mask = tokenize_prompts(tokenizer, prompts, 10**9)
    settings = dict(num_generations=g, max_new_tokens=80, stop_ids=STOPS, pad_id=tokenizer.pad_token_id)
    settings.update(options)
    uniforms = group_uniforms(list(seeds), g, settings["max_new_tokens"])
    return decode(model, ids, mask, uniforms=uniforms, steps=steps, **settings), ids, mask


def test_rows_take_turns_with_the_fed_tokens_between_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    feeder = Feeder()
    decoded, _, _ = run(model, tokenizer, turn_ends=feeder)
    assert decoded.ended.all(), "every row ends after its third turn"
    for row in range(len(decoded.tokens)):
        length = int(decoded.lengths[row])
        tokens, sampled = decoded.tokens[row, :length].tolist(), decoded.sampled[row, :length].tolist()
        # Three turns, each ending in a stop token, and between them the fed tokens, unsampled.
        turns = [(r, t) for r, t, _ in feeder.calls if r == row]
        assert len(turns) == 3
        expected, flags = [], []
        for index, (_, turn) in enumerate(turns):
            expected += turn
            flags += [True] * len(turn)
            if index < 2:
                fed = [7 + i for i in range(2 + row % 4)]
                expected += fed
                flags += [False] * len(fed)
        assert tokens == expected and sampled == flags
        assert (decoded.tokens[row, length:] == tokenizer.pad_token_id).all()
        assert not decoded.sampled[row, length:].any()


def test_the_sampled_log_probs_are_a_plain_forward_passs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoded, ids, mask = run(model, tokenizer, turn_ends=Feeder(), temperature=0.7)
    present = (torch.arange(decoded.tokens.shape[1]) < decoded.lengths.unsqueeze(1)).long()
    with torch.no_grad():
        index = torch.arange(len(decoded.tokens)) // 3
        plain = completion_logps(model, ids, mask, index, decoded.tokens, present, 0.7)
    torch.testing.assert_close(decoded.logps[decoded.sampled], plain[decoded.sampled], atol=2e-5, rtol=0)
    assert (decoded.logps[~decoded.sampled] == 0).all()


def test_fused_steps_decode_the_same_turns_as_transformers(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain, _, _ = run(model, tokenizer, turn_ends=Feeder(), greedy=True)
    fused, _, _ = run(model, tokenizer, turn_ends=Feeder(), greedy=True, steps=fused_decoding(model)(6))
    assert torch.equal(plain.tokens, fused.tokens) and torch.equal(plain.sampled, fused.sampled)
    torch.testing.assert_close(plain.logps, fused.logps, atol=1e-4, rtol=0)


def test_a_rows_turns_do_not_depend_on_the_other_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # (One prompt twice: left padding alone changes a random model's logits enough to move picks.)
    both, _, _ = run(model, tokenizer, prompts=PROMPTS[:1] * 2, turn_ends=Feeder())
    alone, _, _ = run(model, tokenizer, prompts=PROMPTS[:1], seeds=(12,), turn_ends=ShiftedFeeder(3))
    width = int(alone.lengths.max())
    assert torch.equal(both.tokens[3:, :width], alone.tokens[:, :width])
    assert torch.equal(both.lengths[3:], alone.lengths)


class ShiftedFeeder(Feeder):
    """The :class:`Feeder` of rows numbered from ``offset`` (the same rows sampled without those before)."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset

    def __call__(self, rows, turns, last):
        return super().__call__([row + self.offset for row in rows], turns, last)


def test_first_feeds_come_before_the_first_turn_and_a_row_cut_short_has_not_ended(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = [[5, 6, 7]] * 3 + [[5]] * 3
    decoded, _, _ = run(model, tokenizer, turn_ends=Feeder(turns=100), first_feeds=first, max_new_tokens=30)
    for row, feed in enumerate(first):
        assert decoded.tokens[row, : len(feed)].tolist() == feed
        assert not decoded.sampled[row, : len(feed)].any() and decoded.sampled[row, len(feed)]
    # Fed after every turn, no row ends by itself within 30 positions.
    assert not decoded.ended.any() and (decoded.lengths == 30).all()


def test_the_backend_hands_turn_ends_the_rows_of_the_whole_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 10**9)
    seen = []

    def turn_ends(rows, turns, last):
        seen.extend(rows)
        return [None] * len(rows)

    decoded = DefaultBackend(model).sample_turns(
        ids, mask, num_generations=3, max_new_tokens=80, stop_ids=STOPS, pad_id=0, seeds=[1, 2],
        batch_size=3, turn_ends=turn_ends,
    )  # fmt: skip
    assert sorted(seen) == list(range(6)) and decoded.ended.all()


def test_feeds_longer_than_the_room_left_are_cut_at_max_new_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = [list(range(5, 25))] * 6  # every row fed 20 tokens, with room for 12
    decoded, _, _ = run(model, tokenizer, turn_ends=Feeder(), first_feeds=first, max_new_tokens=12)
    assert decoded.tokens.shape == (6, 12) and not decoded.sampled.any() and not decoded.ended.any()
    assert (decoded.tokens == torch.arange(5, 17)).all()


def test_a_turn_that_ends_at_the_last_position_is_cut_when_its_episode_would_go_on(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    asked = []

    def turn_ends(rows, turns, last):
        asked.extend((row, last) for row in rows)
        return [[] if last and row % 2 else None for row in rows]  # odd rows would go on

    decoded, _, _ = run(model, tokenizer, turn_ends=turn_ends, stop_ids=list(range(400)), max_new_tokens=1)
    assert sorted(asked) == [(row, True) for row in range(6)]  # every token ends a turn, at the last position
    assert decoded.ended.tolist() == [row % 2 == 0 for row in range(6)] and (decoded.lengths == 1).all()
