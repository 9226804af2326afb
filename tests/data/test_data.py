"""Reading prompt files and the built-in task, row checks, prompt rendering and the seeded batch sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo.data.prompts import PromptSampler, check_row, load_rows, render_prompt, reward_columns
from grpo.errors import DataError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    return str(caught.value)


# --- file formats -------------------------------------------------------------------------------------


def test_jsonl_rows_are_read_with_extra_columns_kept(tmp_path):
    rows = [
        {"prompt": "1 + 1 =", "answer": "2", "level": 1},
        {"prompt": "2 + 2 =", "answer": "4", "level": 2},
    ]
    assert load_rows(str(write_jsonl(tmp_path / "d.jsonl", rows))) == rows


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n   \n{"prompt": "b"}\n', encoding="utf-8")
    assert load_rows(str(path)) == [{"prompt": "a"}, {"prompt": "b"}]


def test_json_list_file(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_rows(str(path)) == rows


def test_json_file_with_a_data_key(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": rows, "version": 2}), encoding="utf-8")
    assert load_rows(str(path)) == rows


def test_csv_file_rows_are_strings_with_extra_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,answer,source\n"What is 1 + 2, exactly?",3,book\nHi,4,web\n', encoding="utf-8")
    assert load_rows(str(path)) == [
        {"prompt": "What is 1 + 2, exactly?", "answer": "3", "source": "book"},
        {"prompt": "Hi", "answer": "4", "source": "web"},
    ]


def test_chat_message_prompts_are_accepted(tmp_path):
    rows = [{"prompt": CHAT, "answer": "4"}]
    assert load_rows(str(write_jsonl(tmp_path / "chat.jsonl", rows))) == rows


def test_suffix_is_case_insensitive(tmp_path):
    assert load_rows(str(write_jsonl(tmp_path / "D.JSONL", [{"prompt": "a"}]))) == [{"prompt": "a"}]


# --- file and row errors ------------------------------------------------------------------------------


def test_malformed_jsonl_line_reports_its_line_number_counting_blank_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n{"prompt": "c"}\n', encoding="utf-8")
    message = load_error(path)
    assert "bad.jsonl" in message
    assert "line 3:" in message
    assert "not valid JSON" in message


def test_malformed_json_file_reports_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n', encoding="utf-8")
    message = load_error(path)
    assert "bad.json" in message
    assert "line 3:" in message


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "b"]\n', encoding="utf-8")
    message = load_error(path)
    assert "rows.jsonl" in message
    assert "line 2:" in message
    assert "JSON object" in message


def test_json_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a"}, "b"]), encoding="utf-8")
    message = load_error(path)
    assert "rows.json" in message
    assert "row 2:" in message
    assert "expected an object" in message


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"prompt": "a"}), encoding="utf-8")
    assert "must be a list of objects" in load_error(path)


def test_missing_prompt_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"question": "b"}])
    message = load_error(path)
    assert "d.jsonl" in message
    assert "row 2:" in message
    assert "missing field 'prompt'" in message


def test_missing_prompt_column_in_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nHi,1\n", encoding="utf-8")
    assert "row 1: missing field 'prompt'" in load_error(path)


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_names_file_and_row(tmp_path, prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": prompt}])
    message = load_error(path)
    assert "d.jsonl" in message
    assert "row 3:" in message
    assert "'prompt' is empty" in message


@pytest.mark.parametrize("prompt", [5, None, [], {"role": "user", "content": "x"}])
def test_prompt_that_is_neither_text_nor_messages(tmp_path, prompt):
    message = load_error(write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt}]))
    assert "row 1:" in message
    assert "must be a string or a list of chat messages" in message


@pytest.mark.parametrize(
    "message",
    [{"role": "user"}, {"content": "hi"}, {"role": "user", "content": 3}, "hello"],
)
def test_bad_chat_message_names_row_and_message_index(tmp_path, message):
    rows = [{"prompt": "a"}, {"prompt": [{"role": "system", "content": "s"}, message]}]
    error = load_error(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "d.jsonl" in error
    assert "row 2:" in error
    assert "message 1" in error


def test_non_utf8_bytes_report_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    message = load_error(path)
    assert "latin.jsonl" in message
    assert "line 3:" in message
    assert "UTF-8" in message


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_file_is_a_data_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("", encoding="utf-8")
    assert name in load_error(path)


def test_jsonl_of_only_blank_lines_has_no_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n  \n", encoding="utf-8")
    assert "has no rows" in load_error(path)


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("prompt,answer\n", encoding="utf-8")
    assert "has no rows" in load_error(path)


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "missing.jsonl"
    message = load_error(path)
    assert str(path) in message
    assert "not found" in message


def test_a_directory_named_as_a_dataset_says_so(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.mkdir()
    assert load_error(path) == f"{path}: is a directory, not a dataset file"


def test_csv_quoted_field_keeps_its_newline(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('prompt,answer\n"Line one.\nLine two.",7\n', encoding="utf-8")
    assert load_rows(str(path)) == [{"prompt": "Line one.\nLine two.", "answer": "7"}]


def test_jsonl_string_with_a_raw_line_separator_character(tmp_path):
    path = tmp_path / "u2028.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_rows(str(path)) == [{"prompt": "a\u2028b"}]


def test_csv_with_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,answer\nHi,1\n".encode("utf-8-sig"))
    assert load_rows(str(path)) == [{"prompt": "Hi", "answer": "1"}]


# --- render_prompt ------------------------------------------------------------------------------------


class FakeTokenizer:
    """Renders messages as "<role>content" lines and records how it was called."""

    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((tokenize, add_generation_prompt))
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_render_prompt_returns_a_string_prompt_unchanged():
    assert render_prompt("  What is 2 + 2?\n", FakeTokenizer()) == "  What is 2 + 2?\n"
    assert render_prompt("plain", None) == "plain"


def test_render_prompt_applies_the_chat_template_with_a_generation_prompt():
    tokenizer = FakeTokenizer()
    text = render_prompt(CHAT, tokenizer)
    assert text == "<system>Be brief.\n<user>What is 2 + 2?\n<assistant>"
    assert tokenizer.calls == [(False, True)]


@pytest.mark.parametrize("template", [None, ""])
def test_render_prompt_without_a_chat_template_is_a_data_error(template):
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = template
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(CHAT, tokenizer)
    assert tokenizer.calls == []


def test_render_prompt_with_a_tokenizer_lacking_the_attribute_is_a_data_error():
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(CHAT, object())


# --- reward_columns -----------------------------------------------------------------------------------


def test_reward_columns_repeat_each_value_per_completion_and_drop_the_prompt():
    rows = [{"prompt": "a", "answer": "1", "id": 0}, {"prompt": "b", "answer": "2", "id": 1}]
    assert reward_columns(rows, repeats=3) == {
        "answer": ["1", "1", "1", "2", "2", "2"],
        "id": [0, 0, 0, 1, 1, 1],
    }


def test_reward_columns_default_to_one_value_per_row():
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert reward_columns(rows) == {"answer": ["1", "2"]}


def test_reward_columns_fill_a_column_missing_from_a_later_row_with_none():
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]
    assert reward_columns(rows, repeats=2) == {"answer": ["1", "1", None, None]}


def test_reward_columns_of_prompt_only_rows_is_empty():
    assert reward_columns([{"prompt": "a"}], repeats=4) == {}


# --- PromptSampler ------------------------------------------------------------------------------------

ROWS = [{"prompt": f"q{i}"} for i in range(12)]


def prompts(batch: list[dict]) -> list[str]:
    return [row["prompt"] for row in batch]


def test_sampler_is_deterministic_given_the_seed():
    first, second = PromptSampler(ROWS, 4, seed=7), PromptSampler(ROWS, 4, seed=7)
    assert [prompts(first.batch(s)) for s in range(9)] == [prompts(second.batch(s)) for s in range(9)]


def test_sampler_different_seeds_give_different_orders():
    samplers = [PromptSampler(ROWS, 4, seed=seed) for seed in range(5)]
    orders = {tuple(prompts(s.batch(0) + s.batch(1) + s.batch(2))) for s in samplers}
    assert len(orders) > 1


def test_sampler_shows_every_row_exactly_once_per_epoch():
    sampler = PromptSampler(ROWS, 4, seed=0)
    for epoch in range(3):
        seen = [p for step in range(epoch * 3, epoch * 3 + 3) for p in prompts(sampler.batch(step))]
        assert sorted(seen) == sorted(prompts(ROWS))


def test_sampler_reshuffles_between_epochs():
    sampler = PromptSampler(ROWS, 4, seed=0)
    epochs = [tuple(prompts(sampler.batch(3 * e) + sampler.batch(3 * e + 1))) for e in range(4)]
    assert len(set(epochs)) > 1


def test_sampler_batch_is_a_pure_function_of_the_step():
    sampler = PromptSampler(ROWS, 4, seed=3)
    later = prompts(sampler.batch(5))
    assert prompts(sampler.batch(0)) == prompts(PromptSampler(ROWS, 4, seed=3).batch(0))
    assert prompts(sampler.batch(5)) == later
    assert prompts(sampler.batch(5)) == later


def test_sampler_iteration_matches_batch_by_step():
    sampler = PromptSampler(ROWS, 4, seed=1)
    iterator = iter(sampler)
    assert [prompts(next(iterator)) for _ in range(7)] == [prompts(sampler.batch(s)) for s in range(7)]


def test_sampler_without_shuffle_keeps_file_order():
    sampler = PromptSampler(ROWS, 4, seed=1, shuffle=False)
    assert [p for s in range(3) for p in prompts(sampler.batch(s))] == prompts(ROWS)


def test_further_draws_of_an_unshuffled_sampler_come_from_the_rows_reached():
    """Dynamic sampling's extra prompts keep to a curriculum: step 1 of 4-row batches has reached rows 0–7."""
    sampler = PromptSampler(ROWS, 4, seed=1, shuffle=False)
    drawn = {p for draw in range(1, 20) for p in prompts(sampler.batch(1, draw))}
    assert drawn <= set(prompts(ROWS[:8])) and len(drawn) > 4
    shuffled = PromptSampler(ROWS, 4, seed=1)
    assert {p for draw in range(1, 20) for p in prompts(shuffled.batch(1, draw))} == set(prompts(ROWS))
    assert sampler.batch(1, 3) == sampler.batch(1, 3), "determined by (seed, step, draw)"


def test_sampler_batches_never_straddle_epochs_when_rows_do_not_divide():
    rows = ROWS[:10]
    sampler = PromptSampler(rows, 4, seed=2)  # 2 full batches per epoch; 2 rows left out each epoch
    for epoch in range(3):
        seen = prompts(sampler.batch(2 * epoch)) + prompts(sampler.batch(2 * epoch + 1))
        assert len(seen) == len(set(seen)) == 8


def test_sampler_with_fewer_rows_than_a_batch_repeats_rows_to_fill_it():
    rows = ROWS[:3]
    sampler = PromptSampler(rows, 8, seed=0)
    for step in range(3):
        batch = prompts(sampler.batch(step))
        assert len(batch) == 8
        assert set(batch) == set(prompts(rows))


# --- properties: whatever the file holds, checked rows or one DataError ------------------------------------

PROPERTY_SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
}
KEYS = st.sampled_from(["prompt", "role", "content", "answer", "x"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def assert_rows_or_one_line_error(path: Path) -> None:
    try:
        rows = load_rows(str(path))
    except DataError as error:
        message = str(error)
        assert message.startswith(str(path)) and "\n" not in message, message
        return
    assert rows
    for number, row in enumerate(rows, start=1):
        check_row(row, str(path), number)  # never raises for rows load_rows returned
        assert all(isinstance(name, str) for name in row), "column names reach reward functions as keywords"


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_bytes_give_checked_rows_or_a_data_error_naming_the_file(tmp_path, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    assert_rows_or_one_line_error(path)


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(values=st.lists(JSON_VALUES, max_size=5), as_list=st.booleans())
def test_any_json_values_give_checked_rows_or_a_data_error_naming_the_file(tmp_path, values, as_list):
    if as_list:
        path = tmp_path / "data.json"
        path.write_text(json.dumps(values))
    else:
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(value) + "\n" for value in values))
    assert_rows_or_one_line_error(path)


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(cells=st.lists(st.lists(st.text(max_size=6), min_size=0, max_size=4), min_size=1, max_size=5))
def test_any_csv_table_gives_checked_rows_or_a_data_error_naming_the_file(tmp_path, cells):
    import csv as csv_module

    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv_module.writer(handle).writerows([["prompt", "answer"], *cells])
    assert_rows_or_one_line_error(path)


@settings(max_examples=100, **PROPERTY_SETTINGS)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"prompt": st.text(min_size=1).filter(str.strip), "answer": st.text() | st.integers() | st.none()}
        ),
        min_size=1,
        max_size=5,
    )
)
def test_valid_rows_round_trip_through_jsonl_unchanged(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert load_rows(str(path)) == rows
