"""Format adapters and the loader: every layout -> canonical form, every bad row reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from posttrain.data.formats import (
    FORMATS,
    RowError,
    convert_row,
    detect_format,
    kind_of,
    preference_to_instruction,
)
from posttrain.data.io import LoadResult, load_examples, read_records
from posttrain.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sys_(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be dicts (dumped) or raw bytes/str lines (written as they are)."""
    with path.open("wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
            elif isinstance(row, str):
                handle.write(row.encode() + b"\n")
            else:
                handle.write(json.dumps(row).encode() + b"\n")
    return path


# --------------------------------------------------------------------------- instruction


def test_alpaca_with_input_system_and_history():
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello",
           "system": "Be brief.", "history": [["hi", "hello!"]]}
    assert convert_row(row, "alpaca") == {"messages": [
        sys_("Be brief."), user("hi"), bot("hello!"), user("Translate\nbonjour"), bot("hello")]}


def test_alpaca_empty_input_and_null_optionals_are_absent():
    row = {"instruction": "Say hi", "input": "", "output": "hi", "system": None}
    assert convert_row(row, "alpaca") == {"messages": [user("Say hi"), bot("hi")]}


def test_messages_maps_role_aliases_and_drops_blank_system():
    row = {"messages": [{"role": "system", "content": " "}, {"role": "human", "content": "q"},
                        {"role": "gpt", "content": "a"}, {"role": "User", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    assert convert_row(row, "messages") == {"messages": [user("q"), bot("a"), user("q2"), bot("a2")]}


def test_sharegpt_with_top_level_system():
    row = {"system": "S", "conversations": [{"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "a"}]}
    assert convert_row(row, "sharegpt") == {"messages": [sys_("S"), user("q"), bot("a")]}


def test_prompt_completion_strings_and_message_lists():
    assert convert_row({"prompt": "q", "completion": "a"}, "prompt_completion") == {
        "messages": [user("q"), bot("a")]}
    row = {"prompt": [sys_("S"), user("q")], "completion": [bot("a")]}
    assert convert_row(row, "prompt_completion") == {"messages": [sys_("S"), user("q"), bot("a")]}


# --------------------------------------------------------------------------- preference


def test_preference_with_string_fields():
    row = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert convert_row(row, "preference") == {
        "prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}


def test_preference_full_conversations_with_explicit_prompt_strip_the_prefix():
    prompt = [sys_("S"), user("q1"), bot("a1"), user("q2")]
    row = {"prompt": prompt, "chosen": prompt + [bot("good")], "rejected": prompt + [bot("bad")]}
    assert convert_row(row, "preference") == {
        "prompt": prompt, "chosen": [bot("good")], "rejected": [bot("bad")]}


def test_preference_implicit_prompt_is_the_shared_prefix():
    shared = [user("q1"), bot("a1"), user("q2")]
    row = {"chosen": shared + [bot("good")], "rejected": shared + [bot("bad")]}
    assert convert_row(row, "preference") == {
        "prompt": shared, "chosen": [bot("good")], "rejected": [bot("bad")]}


def test_sharegpt_preference():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    assert convert_row(row, "sharegpt_preference") == {
        "prompt": [sys_("S"), user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}


HH_MULTI = {
    "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant:  Draw on it.",
    "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant: No.",
}


def test_hh_multi_turn_prompt_holds_the_earlier_turns():
    assert convert_row(HH_MULTI, "hh") == {
        "prompt": [user("hi"), bot("hello"), user("a pen prank?")],
        "chosen": [bot("Draw on it.")], "rejected": [bot("No.")]}


def test_hh_single_turn_and_multiline_reply():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: line 1\nline 2", "rejected": "\n\nHuman: q\n\nAssistant: x"}
    assert convert_row(row, "hh") == {
        "prompt": [user("q")], "chosen": [bot("line 1\nline 2")], "rejected": [bot("x")]}


def test_hh_prompts_that_differ_are_an_error():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}
    with pytest.raises(RowError, match="different prompts"):
        convert_row(row, "hh")


def test_preference_to_instruction():
    example = convert_row(HH_MULTI, "hh")
    assert preference_to_instruction(example) == {"messages": [
        user("hi"), bot("hello"), user("a pen prank?"), bot("Draw on it.")]}


# --------------------------------------------------------------------------- typed parts, v1 pairs


def parts(*texts, key="text"):
    """Content as typed parts: OpenAI writes the text under "text", LLaMA-Factory v1 under "value"."""
    return [{"type": "text", key: text} for text in texts]


def test_content_as_openai_text_parts_is_joined():
    row = {"messages": [{"role": "system", "content": parts("Be ", "brief.")},
                        {"role": "user", "content": parts("What is ", "2+2?")},
                        {"role": "assistant", "content": parts("4")}]}
    assert detect_format([row]) == "messages"
    assert convert_row(row, "messages") == {"messages": [sys_("Be brief."), user("What is 2+2?"), bot("4")]}


def test_llamafactory_v1_sft_sample_with_default_loss_weights():
    """LLaMA-Factory v1's standard SFT sample: "value" parts, loss_weight 0 on the prompt, 1 on replies."""
    row = {"messages": [
        {"role": "system", "content": parts("You are a helpful assistant.", key="value"), "loss_weight": 0.0},
        {"role": "user", "content": parts("Hello, who are you?", key="value"), "loss_weight": 0.0},
        {"role": "assistant", "content": parts("I am an AI assistant.", key="value"), "loss_weight": 1.0}]}
    assert convert_row(row, "messages") == {"messages": [
        sys_("You are a helpful assistant."), user("Hello, who are you?"), bot("I am an AI assistant.")]}


def v1_turn(role, text):
    return {"role": role, "content": parts(text, key="value"), "loss_weight": float(role == "assistant")}


def test_llamafactory_v1_pair_of_full_conversations():
    """LLaMA-Factory v1's DPO sample: chosen_messages / rejected_messages, each prompt + reply."""
    history = [v1_turn("user", "hi"), v1_turn("assistant", "hello"), v1_turn("user", "2+2?")]
    row = {"chosen_messages": history + [v1_turn("assistant", "4")],
           "rejected_messages": history + [v1_turn("assistant", "5")]}
    assert detect_format([row]) == "messages_preference"
    assert convert_row(row, "messages_preference") == {
        "prompt": [user("hi"), bot("hello"), user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}


@pytest.mark.parametrize("prompt_key, prompt", [("prompt", "2+2?"), ("messages", [sys_("S"), user("2+2?")])])
def test_chosen_messages_replies_after_a_prompt_column(prompt_key, prompt):
    row = {prompt_key: prompt, "chosen_messages": [bot("4")], "rejected_messages": [bot("5")]}
    expected_prompt = [user(prompt)] if isinstance(prompt, str) else prompt
    assert detect_format([row]) == "messages_preference"
    assert convert_row(row, "messages_preference") == {
        "prompt": expected_prompt, "chosen": [bot("4")], "rejected": [bot("5")]}


def test_chosen_messages_feed_sft_as_prompt_and_chosen(tmp_path):
    row = {"chosen_messages": [user("q"), bot("good")], "rejected_messages": [user("q"), bot("bad")]}
    result = load_examples(str(write_jsonl(tmp_path / "v1.jsonl", [row])), want="instruction")
    assert (result.format, result.examples) == ("messages_preference", [{"messages": [user("q"), bot("good")]}])


@pytest.mark.parametrize("row, fmt, reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.jpg"}},
                                                {"type": "text", "text": "What is this?"}]}, bot("a cat")]},
     "messages", '"messages" turn 1 (user): content part 1 is of type "image_url"; posttrain trains text models'),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "reasoning", "value": "hmm"}]}]},
     "messages", 'content part 1 is of type "reasoning"'),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"text": "a"}]}]},
     "messages", 'content part 1 is without a "type"'),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "text", "text": 3}]}]},
     "messages", 'content part 1 ("text") must hold a string'),
    ({"messages": [user("q"), {"role": "assistant", "content": []}]}, "messages", "turn 2 (assistant) is empty"),
    ({"messages": [v1_turn("user", "q"), {**v1_turn("assistant", "a"), "loss_weight": 0.0}]},
     "messages", '"messages" turn 2 (assistant): "loss_weight" 0.0 is not supported'),
    ({"messages": [{**v1_turn("user", "q"), "loss_weight": 1.0}, v1_turn("assistant", "a")]},
     "messages", '"messages" turn 1 (user): "loss_weight" 1.0 is not supported'),
    ({"chosen_messages": [user("q"), bot("a")], "rejected_messages": [user("other"), bot("b")]},
     "messages_preference", "chosen_messages and rejected_messages have different prompts"),
    ({"chosen_messages": [user("q"), bot("a")]}, "messages_preference", '"rejected_messages" is missing'),
    ({"messages": [user("q"), bot("a")], "chosen_messages": [bot("b")], "rejected_messages": [bot("c")]},
     "messages_preference", '"messages" must end with a user turn (it is the prompt)'),
])
def test_typed_parts_and_v1_pairs_refused_with_a_reason(row, fmt, reason):
    with pytest.raises(RowError) as error:
        convert_row(row, fmt)
    assert reason in str(error.value)


# --------------------------------------------------------------------------- columns that change meaning


SCORES = {"score_chosen": 8, "score_rejected": 7.5}


@pytest.mark.parametrize("row", [
    {"prompt": "q", "chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")],
     "messages": [user("q"), bot("good")], **SCORES},                                   # UltraFeedback-binarized
    {"chosen_messages": [user("q"), bot("good")], "rejected_messages": [user("q"), bot("bad")], **SCORES},
    {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
     "rejected": {"from": "gpt", "value": "bad"}, **SCORES},
])
def test_pair_scores_are_kept_for_curation(tmp_path, row):
    """Curation's min_score_margin reads score_chosen/score_rejected: every pair layout keeps them."""
    from posttrain.data.curate import curate
    from posttrain.recipe.schema import CurateSpec

    examples = load_examples(str(write_jsonl(tmp_path / "scored.jsonl", [row])), want="preference").examples
    assert examples == [{"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")],
                         "score_chosen": 8.0, "score_rejected": 7.5}]
    kept, report = curate(examples, CurateSpec(min_score_margin=1.0), count_tokens=lambda text: len(text.split()))
    assert kept == [] and report.removed["score margin"] == 1


def test_a_score_that_is_not_a_number_is_refused():
    with pytest.raises(RowError, match='"score_chosen" must be a number, not a string'):
        convert_row({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"}, "preference")


@pytest.mark.parametrize("label", [1, "true"])
def test_a_label_that_is_not_a_boolean_is_refused_not_dropped(tmp_path, label):
    """messages + label 1 is KTO data with a mistyped label: reading it as plain messages
    would train SFT on the undesirable replies too."""
    row = {"messages": [user("q"), bot("a")], "label": label}
    assert detect_format([row]) == "unpaired"
    with pytest.raises(DataError) as error:
        load_examples(str(write_jsonl(tmp_path / "kto.jsonl", [row])), want="instruction")
    assert error.value.problems[0].startswith('kto.jsonl:1: "label" must be true (desirable) or false')


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [user("<image>What is this?"), bot("a cat")], "images": ["cat.jpg"]}, "messages"),
    ({"conversations": [{"from": "human", "value": "<video>?"}, {"from": "gpt", "value": "a"}],
      "videos": ["v.mp4"]}, "sharegpt"),
    ({"instruction": "<audio>transcribe", "output": "hi", "audios": ["a.wav"]}, "alpaca"),
])
def test_rows_with_media_are_refused(row, fmt):
    """LLaMA-Factory's multimodal columns: the text points at media a text model never sees."""
    key = next(k for k in ("images", "videos", "audios") if k in row)
    with pytest.raises(RowError, match=f'"{key}" 1 given; posttrain trains text models'):
        convert_row(row, fmt)
    assert convert_row({**row, key: []}, fmt)  # an empty media column is no media


@pytest.mark.parametrize("row, fmt, expected", [
    ({"system": "S", "messages": [user("q"), bot("a")]}, "messages", {"messages": [sys_("S"), user("q"), bot("a")]}),
    ({"system": "S", "prompt": "q", "completion": "a"}, "prompt_completion",
     {"messages": [sys_("S"), user("q"), bot("a")]}),
    ({"system": "S", "prompt": "q", "chosen": "good", "rejected": "bad"}, "preference",
     {"prompt": [sys_("S"), user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}),
    ({"system": "S", "messages": [user("q"), bot("a")], "label": True}, "unpaired",
     {"prompt": [sys_("S"), user("q")], "completion": [bot("a")], "label": True}),
])
def test_a_system_column_is_the_system_message_in_every_layout(row, fmt, expected):
    assert convert_row(row, fmt) == expected


def test_a_system_column_and_a_system_message_are_refused_together():
    with pytest.raises(RowError, match='both a "system" field and a system message'):
        convert_row({"system": "S", "messages": [sys_("S2"), user("q"), bot("a")]}, "messages")


# --------------------------------------------------------------------------- row errors


@pytest.mark.parametrize("row, fmt, reason", [
    ({"prompt": "q", "rejected": "b"}, "preference", '"chosen" is missing'),
    ({"messages": "hi"}, "messages", '"messages" must be a list'),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", 'unknown role "robot"'),
    ({"messages": [user("q"), bot("a"), user("q2")]}, "messages", "conversation ends on a user turn"),
    ({"messages": [user("q"), user("q2"), bot("a")]}, "messages", "expected assistant, got user"),
    ({"messages": [user("q"), bot("a"), sys_("S")]}, "messages", "system message must come first"),
    ({"messages": [user("q"), {"role": "assistant", "content": 3}]}, "messages", "must be a string"),
    ({"instruction": "q", "output": " "}, "alpaca", '"output" is empty'),
    ({"instruction": "q"}, "alpaca", '"output" is missing'),
    ({"instruction": 5, "output": "a"}, "alpaca", '"instruction" must be a string'),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "preference", '"chosen" is empty'),
    ({"chosen": "good", "rejected": "bad"}, "preference", '"prompt" is missing'),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "x"},
      "rejected": {"from": "gpt", "value": "y"}}, "sharegpt_preference", "single assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}},
     "sharegpt_preference", "must end with a user turn"),
    ({"chosen": "no markers", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "hh", 'does not start with "Human:"'),
    ({"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "hh", "is empty"),
    (["not", "a", "dict"], "messages", "must be a JSON object"),
])
def test_bad_rows_have_short_reasons(row, fmt, reason):
    with pytest.raises(RowError) as error:
        convert_row(row, fmt)
    assert reason in str(error.value)


def test_kind_of():
    assert {name: kind_of(name) for name in FORMATS} == {
        "alpaca": "instruction", "messages": "instruction", "sharegpt": "instruction",
        "prompt_completion": "instruction", "preference": "preference",
        "sharegpt_preference": "preference", "messages_preference": "preference", "hh": "preference",
        "unpaired": "unpaired"}
    with pytest.raises(ValueError, match="unknown data format"):
        kind_of("nope")


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"messages": [user("q"), bot("a")]}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, "preference"),
    ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt_preference"),
    (HH_MULTI, "hh"),
    # UltraFeedback-style: preference columns plus a "messages" column.
    ({"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")], "messages": []}, "preference"),
])
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_detect_format_majority_wins():
    rows = [{"messages": []}] * 3 + [{"instruction": "q"}]
    assert detect_format(rows) == "messages"


SHAREGPT_PAIR = {"conversations": [{"from": "human", "value": "q"}],
                 "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
# UltraFeedback-binarized: the pair, plus "messages" holding the chosen conversation again.
ULTRAFEEDBACK = {"prompt": "q", "chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")],
                 "messages": [user("q"), bot("good")]}


@pytest.mark.parametrize("row", [SHAREGPT_PAIR, ULTRAFEEDBACK])
def test_detection_does_not_depend_on_the_stage(tmp_path, row):
    """SFT on chosen, then DPO on the same file: one layout detected for every stage,
    then converted (SFT reads prompt + chosen; KTO the two replies, labelled)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    results = {want: load_examples(str(path), want=want) for want in ("instruction", "preference", "unpaired")}
    assert len({result.format for result in results.values()}) == 1
    assert results["instruction"].examples == [{"messages": [user("q"), bot("good")]}]
    assert results["preference"].examples == [
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}]
    assert [e["label"] for e in results["unpaired"].examples] == [True, False]


def test_detect_format_unknown_keys():
    with pytest.raises(ValueError, match=r"cannot tell the data format.*\['question'\]"):
        detect_format([{"question": "q"}])


# --------------------------------------------------------------------------- loading


GOOD_PREF = {"prompt": "q", "chosen": "good", "rejected": "bad"}


def bad_preference_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [
        GOOD_PREF,
        GOOD_PREF,
        {"prompt": "q", "rejected": "bad"},                                 # 3
        "{not json",                                                        # 4
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',           # 5
        "",                                                                 # 6 (blank)
        {"prompt": "q", "chosen": 7, "rejected": "bad"},                    # 7
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 8
        {"chosen": [user("q"), bot("a"), user("q2")], "rejected": [user("q"), bot("b")]},  # 9
        "[1, 2]",                                                           # 10
        GOOD_PREF,                                                          # 11
    ])


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path):
    with pytest.raises(DataError) as error:
        load_examples(str(bad_preference_file(tmp_path)), "auto")
    assert str(error.value) == "bad.jsonl: 7 malformed rows (set on_bad_rows: skip to skip them)"
    problems = error.value.problems
    assert problems[0] == 'bad.jsonl:3: "chosen" is missing'
    assert problems[1].startswith("bad.jsonl:4: not valid JSON")
    assert problems[2].startswith("bad.jsonl:5: not valid UTF-8")
    assert problems[3].startswith('bad.jsonl:7: "chosen" must be a string or a list')
    assert problems[4] == 'bad.jsonl:8: "prompt" turn 1: unknown role "robot"'
    assert problems[5].startswith('bad.jsonl:9: "chosen": conversation ends on a user turn')
    assert problems[6] == "bad.jsonl:10: a row must be a JSON object, not a list"


def test_skip_returns_good_rows_and_the_messages(tmp_path):
    result = load_examples(str(bad_preference_file(tmp_path)), "preference", on_bad_rows="skip")
    assert isinstance(result, LoadResult)
    assert (result.format, result.detected, len(result.examples)) == ("preference", False, 3)
    assert result.examples[0] == convert_row(GOOD_PREF, "preference")
    assert len(result.skipped) == 7 and result.skipped[0] == 'bad.jsonl:3: "chosen" is missing'


def test_problem_list_is_capped(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [GOOD_PREF] + [{"prompt": "q"}] * 25)
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    assert "25 malformed rows" in str(error.value)
    assert len(error.value.problems) == 21 and error.value.problems[-1] == "... and 5 more"


def test_missing_file_relative_to_base_dir(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_examples("data/nope.jsonl", base_dir=tmp_path)


def test_relative_path_resolves_against_base_dir_and_limit(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "sft.jsonl", [{"prompt": "q", "completion": "a"}] * 5)
    result = load_examples("data/sft.jsonl", base_dir=tmp_path, limit=2)
    assert result.format == "prompt_completion" and result.detected
    assert result.examples == [{"messages": [user("q"), bot("a")]}] * 2


def test_want_instruction_projects_preference_data(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [GOOD_PREF])
    result = load_examples(str(path), want="instruction")
    assert result.format == "preference"
    assert result.examples == [{"messages": [user("q"), bot("good")]}]


def test_want_preference_rejects_instruction_data(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("q"), bot("a")]}])
    with pytest.raises(DataError, match=r"this stage needs preference data \(prompt, chosen, rejected\), but "
                                        r"this is instruction data"):
        load_examples(str(path), want="preference")


def test_undetectable_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="odd.jsonl: cannot tell the data format"):
        load_examples(str(path))
    with pytest.raises(DataError, match='unknown data format "nope"'):
        load_examples(str(path), "nope")


def test_json_array_wrapped_object_and_json_lines_in_dot_json(tmp_path):
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q"}]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "lines.json", rows)
    for name in ("array.json", "wrapped.json", "lines.json"):
        result = load_examples(str(tmp_path / name), on_bad_rows="skip")
        assert len(result.examples) == 1
        assert result.skipped == [f'{name}:2: "completion" is missing']


def test_single_object_json_file_is_one_row(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"messages": [user("q"), bot("a")]}))
    assert load_examples(str(tmp_path / "one.json")).examples == [{"messages": [user("q"), bot("a")]}]


def test_broken_json_array_is_one_clear_error(tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "q", ')
    with pytest.raises(DataError, match="broken.json: not a valid JSON file"):
        load_examples(str(tmp_path / "broken.json"))


def test_csv_loads_with_json_cells_and_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Say hi", "", "hi\nthere"])  # a quoted cell spanning two lines
        writer.writerow(["Add", "1 2", ""])
    result = load_examples(str(path), on_bad_rows="skip")
    assert result.format == "alpaca"
    assert result.examples == [{"messages": [user("Say hi"), bot("hi\nthere")]}]
    assert result.skipped == ['data.csv:4: "output" is empty']

    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["messages"], [json.dumps([user("q"), bot("a")])]])
    assert load_examples(str(path)).examples == [{"messages": [user("q"), bot("a")]}]


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"messages": [user("q"), bot("a")]},
        {"messages": [user("q")]},
    ])
    pq.write_table(table, tmp_path / "chat.parquet")
    result = load_examples(str(tmp_path / "chat.parquet"), on_bad_rows="skip")
    assert result.format == "messages" and result.examples == [{"messages": [user("q"), bot("a")]}]
    assert result.skipped[0].startswith('chat.parquet:2: "messages": conversation ends on a user turn')


def test_read_records_numbers_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, "", "   ", {"b": 2}, "oops"])
    records = list(read_records(path))
    assert [number for number, _ in records] == [1, 4, 5]
    assert records[1][1] == {"b": 2} and isinstance(records[2][1], Exception)


def test_unsupported_extension_and_hub_failure(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        load_examples(str(tmp_path / "notes.txt"))
    # A hub id must never be a traceback; make the (lazy) datasets import fail fast.
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="could not load dataset 'org/name' .*split 'train'"):
        load_examples("hf:org/name")
    with pytest.raises(DataError, match="could not load dataset 'org/other'"):
        load_examples("org/other", base_dir=tmp_path)


# --------------------------------------------------------------------------- real samples


@pytest.mark.parametrize("name, fmt, rows", [
    ("alpaca_en_sample.json", "alpaca", 300),
    ("sharegpt_preference_sample.json", "sharegpt_preference", 200),
])
def test_real_samples_convert_every_row(name, fmt, rows):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    result = load_examples(str(path), "auto")
    assert (result.format, result.detected, len(result.examples), result.skipped) == (fmt, True, rows, [])
    assert all(example == convert_row(example_row, fmt) for example, example_row
               in zip(result.examples, json.loads(path.read_text())))


def test_real_preference_sample_feeds_every_stage_kind():
    """LLaMA-Factory's DPO demo (sharegpt_preference) read by SFT is prompt + chosen."""
    path = SHARED_DATA / "sharegpt_preference_sample.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    pairs = load_examples(str(path), want="preference")
    sft = load_examples(str(path), want="instruction")
    assert (pairs.format, sft.format, len(pairs.examples), sft.skipped) == (
        "sharegpt_preference", "sharegpt_preference", 200, [])
    assert sft.examples == [{"messages": e["prompt"] + e["chosen"]} for e in pairs.examples]


def test_real_hh_sample_has_one_empty_chosen_reply():
    """Line 87 of the HH sample ends its chosen transcript on an empty "Assistant:" turn."""
    path = SHARED_DATA / "hh_rlhf_harmless_sample.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(DataError) as error:
        load_examples(str(path), "auto")
    assert error.value.problems == [
        'hh_rlhf_harmless_sample.jsonl:87: "chosen" turn 4 (Assistant) is empty']
    result = load_examples(str(path), "auto", on_bad_rows="skip")
    assert (result.format, len(result.examples), len(result.skipped)) == ("hh", 399, 1)
    for example in result.examples:
        assert example["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in example["chosen"] + example["rejected"]] == ["assistant"] * 2
        assert not example["chosen"][0]["content"].startswith((" ", "\n"))
    multi_turn = [e for e in result.examples if len(e["prompt"]) > 1]
    assert multi_turn, "the sample has multi-turn transcripts"


# --------------------------------------------------------------------------- tool calls

# LLaMA-Factory's sharegpt tool layout (data/glaive_toolcall_en_demo.json): `tools` is a
# JSON string ("[]" when the row has none), function_call/observation turns between the
# human and gpt ones.
GLAIVE_PLAIN = {"conversations": [{"from": "human", "value": "What is AR?"},
                                  {"from": "gpt", "value": "Augmented reality."}], "tools": "[]"}
GLAIVE_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Area of a 5 by 3 rectangle?"},
        {"from": "function_call", "value": '{"name": "calculate_area", "arguments": {"dimensions": [5, 3]}}'},
        {"from": "observation", "value": '{"area": 15}'},
        {"from": "gpt", "value": "The area is 15 square units."}],
    "tools": '[{"name": "calculate_area", "description": "Calculate the area of a shape", '
             '"parameters": {"type": "object", "properties": {}}}]',
}
# OpenAI chat layout: an assistant turn with tool_calls (content null), a tool turn, tools.
OPENAI_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "area", "arguments": '{"w": 5, "h": 3}'}}]}
OPENAI_TOOLS = {
    "messages": [user("Area of a 5 by 3 rectangle?"), OPENAI_CALL,
                 {"role": "tool", "tool_call_id": "call_1", "content": "15"}, bot("It is 15.")],
    "tools": [{"type": "function", "function": {"name": "area", "parameters": {"type": "object"}}}],
}


def test_sharegpt_tool_data_is_refused_as_a_whole_naming_its_first_tool_row(tmp_path):
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps([GLAIVE_PLAIN, GLAIVE_PLAIN, GLAIVE_TOOLS, GLAIVE_PLAIN]))
    for on_bad_rows in ("error", "skip"):     # never per row, whatever on_bad_rows says
        with pytest.raises(DataError) as error:
            load_examples(str(path), on_bad_rows=on_bad_rows, want="instruction")
        assert str(error.value).startswith('glaive.json:3: a "tools" column: tool-call conversations '
                                           "(function_call/observation/tool turns, tool_calls, a tools column) "
                                           "are not supported yet: posttrain's chat templates have no tool-call format")
        assert str(error.value).endswith("remove those rows or use a dataset without tools")
        assert error.value.problems == []
    # The rows before it with `"tools": "[]"` hold no tools: read as plain sharegpt.
    head = load_examples(str(path), limit=2)
    assert head.format == "sharegpt" and head.examples == [
        {"messages": [user("What is AR?"), bot("Augmented reality.")]}] * 2


def test_tool_turns_without_a_tools_column_are_refused_too(tmp_path):
    no_column = {k: v for k, v in GLAIVE_TOOLS.items() if k != "tools"}
    path = write_jsonl(tmp_path / "calls.jsonl", [GLAIVE_PLAIN, no_column])
    with pytest.raises(DataError, match=r'^calls.jsonl:2: "conversations" turn 2 has the role "function_call": '
                                        "tool-call conversations"):
        load_examples(str(path))


def test_openai_tool_calls_are_refused_as_a_whole(tmp_path):
    plain = {"messages": [user("hi"), {"role": "assistant", "content": "hello", "tool_calls": None,
                                       "function_call": None}]}   # OpenAI exports: null means none
    assert convert_row(plain, "messages") == {"messages": [user("hi"), bot("hello")]}
    without_tools = {"messages": OPENAI_TOOLS["messages"]}
    path = write_jsonl(tmp_path / "chat.jsonl", [plain, without_tools, OPENAI_TOOLS])
    with pytest.raises(DataError, match=r'^chat.jsonl:2: "messages" turn 2 has "tool_calls": tool-call'):
        load_examples(str(path), on_bad_rows="skip")
    only_tool_turn = {"messages": [user("q"), bot("a"), {"role": "tool", "content": "15"}, bot("b")]}
    path = write_jsonl(tmp_path / "tool.jsonl", [plain, only_tool_turn])
    with pytest.raises(DataError, match=r'^tool.jsonl:2: "messages" turn 3 has the role "tool"'):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "defs.jsonl", [plain, {**plain, "tools": OPENAI_TOOLS["tools"]}])
    with pytest.raises(DataError, match=r'^defs.jsonl:2: a "tools" column'):
        load_examples(str(path))


def test_tool_use_is_found_in_every_layout():
    from posttrain.data.formats import ToolCallRow, tool_use

    pair = {"conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "function_call", "value": "{}"}, "rejected": {"from": "gpt", "value": "no"}}
    assert tool_use(pair) == '"chosen" turn 1 has the role "function_call"'
    parts = {"messages": [user("q"), {"role": "assistant", "content": [{"type": "tool_call", "value": "{}"}]}]}
    assert tool_use(parts) == '"messages" turn 2 has a "tool_call" content part'
    assert tool_use({"instruction": "q", "output": "a", "functions": '[{"name": "f"}]'}) == 'a "functions" column'
    for empty in (None, "", "[]", " [] ", [], {}):
        assert tool_use({**GLAIVE_PLAIN, "tools": empty}) is None
    with pytest.raises(ToolCallRow):
        convert_row(pair, "sharegpt_preference")


def test_columns_a_layout_ignores_are_exact():
    from posttrain.data.formats import COLUMNS_READ, ignored_columns

    assert set(COLUMNS_READ) == set(FORMATS)
    ultrafeedback = {"prompt": "q", "prompt_id": "7f", "chosen": [user("q"), bot("a")],
                     "rejected": [user("q"), bot("b")], "messages": [user("q"), bot("a")],
                     "score_chosen": 8.0, "score_rejected": 3.0, "source": None}
    assert ignored_columns(ultrafeedback, "preference") == ["messages", "prompt_id"]   # null: nothing lost
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b",
          "score_chosen": 1.0}
    assert ignored_columns(hh, "hh") == ["score_chosen"]          # the hh layout keeps no scores
    # unpaired reads `messages` + label, or prompt + completion + label, never both
    assert ignored_columns({"messages": [], "prompt": "p", "label": True}, "unpaired") == ["prompt"]
    assert ignored_columns({"messages": [], "prompt": "p", "completion": "c", "label": True},
                           "unpaired") == ["messages"]
    assert ignored_columns({**GLAIVE_PLAIN, "id": 3}, "sharegpt") == ["id"]   # tools: read (and refused)
