"""Preference pairs: files with a prompt column, HH-RLHF dialogues, and the shipped hh-rlhf set."""

from __future__ import annotations

import json

import pytest

from grpo.data.preferences import hh_messages, load_pairs, split_hh_pair
from grpo.errors import DataError

DIALOGUE = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: "


def test_hh_dialogues_become_chat_messages():
    assert hh_messages(DIALOGUE + "Put it in boiling water.") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water."},
    ]


def test_an_hh_pair_splits_into_its_shared_prompt_and_two_answers():
    pair = split_hh_pair(DIALOGUE + "Boil it for 8 minutes.", DIALOGUE + "Why would you?")
    assert pair["prompt"][-1] == {"role": "user", "content": "How do I boil an egg?"}
    assert (pair["chosen"], pair["rejected"]) == ("Boil it for 8 minutes.", "Why would you?")
    assert split_hh_pair(DIALOGUE + "a", "\n\nHuman: other\n\nAssistant: b") is None


def test_the_shipped_hh_rlhf_set_has_disjoint_train_and_test_splits():
    train, test = load_pairs("hh-rlhf", "train"), load_pairs("hh-rlhf", "test")
    assert len(train) + len(test) == 2312 - 5 and 220 < len(test) < 240
    assert all(p["chosen"] != p["rejected"] or p["chosen"] for p in train)
    keys = {json.dumps(p, sort_keys=True) for p in test}
    assert not keys & {json.dumps(p, sort_keys=True) for p in train}


def test_a_file_with_prompt_chosen_rejected_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
        {"chosen": DIALOGUE + "a", "rejected": DIALOGUE + "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(str(path))
    assert pairs[0] == rows[0] and pairs[1]["chosen"] == "a" and isinstance(pairs[1]["prompt"], list)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 1: field 'chosen' must be a non-empty string"),
        ({"prompt": "q", "chosen": "a"}, "row 1: field 'rejected' must be a non-empty string"),
        ({"chosen": "a", "rejected": "b"}, "row 1: no 'prompt', and 'chosen' and 'rejected' are not"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "row 1: field 'prompt' must be a string or a list"),
    ],
)
def test_bad_pairs_name_the_file_and_row(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_pairs(str(path))
