"""lm-eval integration: bundled tasks, task resolution, and end-to-end runs on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.builtin import eval_rows
from posttrain.errors import RecipeError
from posttrain.evaluate import TaskRef, evaluate_model, output_files, prepare_task_dir, resolve_tasks

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ["evals/skills_exact.yaml", "evals/skills_mc.yaml"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- bundled data

def test_skills_jsonl_is_eval_rows():
    assert read_jsonl(REPO / "evals" / "skills_test.jsonl") == eval_rows()


def test_importing_evaluate_imports_neither_torch_nor_lm_eval():
    code = ("import sys, posttrain.evaluate; "
            "print(sorted(m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- resolve / prepare

def test_resolve_tasks_searches_dirs_in_order(tmp_path):
    first, second = tmp_path / "recipe", tmp_path / "cwd"
    (first / "evals").mkdir(parents=True)
    (second / "evals").mkdir(parents=True)
    (first / "evals" / "mine.yaml").write_text("task: from_first\n")
    (second / "evals" / "mine.yaml").write_text("task: from_second\n")
    (second / "evals" / "other.yml").write_text("task: other\n")

    refs = resolve_tasks(["evals/mine.yaml", "evals/other.yml", "hellaswag"], [first, second])
    assert refs == [TaskRef("from_first", (first / "evals" / "mine.yaml").resolve()),
                    TaskRef("other", (second / "evals" / "other.yml").resolve()),
                    TaskRef("hellaswag", None)]
    absolute = resolve_tasks([str(REPO / BUNDLED[0])], [])
    assert absolute == [TaskRef("skills_exact", (REPO / BUNDLED[0]).resolve())]
    assert [r.name for r in resolve_tasks(BUNDLED, [tmp_path, REPO])] == ["skills_exact", "skills_mc"]


def test_resolve_tasks_reports_missing_files_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"eval\.tasks\[1\]: task file not found: evals/nope\.yaml"):
        resolve_tasks([BUNDLED[0], "evals/nope.yaml"], [tmp_path, REPO])

    (tmp_path / "group.yaml").write_text("group: g\ntask: [a, b]\n")
    (tmp_path / "dup.yaml").write_text("task: skills_mc\n")
    with pytest.raises(RecipeError) as info:
        resolve_tasks(["group.yaml", "missing.yml", BUNDLED[1], "dup.yaml"], [tmp_path, REPO])
    text = info.value.render()
    assert "eval.tasks[0]" in text and "no 'task:' name" in text
    assert "eval.tasks[1]: task file not found: missing.yml" in text
    assert "'skills_mc' is listed twice" in text


def test_prepare_task_dir_makes_paths_absolute(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "rows.jsonl").write_text('{"q": "a", "a": "b"}\n')
    (src / "helpers.py").write_text("def process(ds):\n    return ds\n")
    (src / "base.yaml").write_text(
        "dataset_path: json\ndataset_kwargs: {data_files: {test: rows.jsonl}}\n"
        "test_split: test\nprocess_docs: !function helpers.process\noutput_type: generate_until\n")
    (src / "task.yml").write_text("include: base.yaml\ntask: mytask\ndoc_to_text: '{{q}}'\n")
    refs = resolve_tasks(["src/task.yml", BUNDLED[1]], [tmp_path, REPO])

    monkeypatch.chdir(tmp_path)           # somewhere the relative paths do not resolve
    dest = prepare_task_dir(refs, tmp_path / "run" / "tasks")

    import yaml

    from posttrain.evaluate import _load_task_yaml

    # lm-eval indexes only *.yaml, so the .yml task is written as .yaml
    mine = _load_task_yaml(dest / "mytask" / "mytask.yaml")
    assert mine["task"] == "mytask" and mine["output_type"] == "generate_until"   # include merged
    assert "include" not in mine
    assert mine["dataset_kwargs"]["data_files"] == {"test": str((src / "rows.jsonl").resolve())}
    assert str(mine["process_docs"]) == "helpers.process"
    assert (dest / "mytask" / "helpers.py").is_file()
    # lm-eval's own loader resolves the !function against the copied module
    from lm_eval.tasks._yaml_loader import load_yaml

    assert load_yaml(dest / "mytask" / "mytask.yaml")["process_docs"].__module__.endswith("mytask/helpers")

    mc = yaml.safe_load((dest / "skills_mc" / "skills_mc.yaml").read_text())
    assert mc["dataset_kwargs"]["data_files"] == {"test": str(REPO / "evals" / "skills_test.jsonl")}
    assert mc["doc_to_choice"] == yaml.safe_load((REPO / BUNDLED[1]).read_text())["doc_to_choice"]


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="module")
def bundled_refs():
    return resolve_tasks(BUNDLED, [REPO])


def test_micro_llama_end_to_end(tmp_path, monkeypatch, tokenizer, bundled_refs):
    from posttrain.models import build_builtin_model

    model = build_builtin_model("builtin:micro-llama", tokenizer)
    task_dir = prepare_task_dir(bundled_refs, tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)           # evaluation must not depend on the cwd
    out_dir = tmp_path / "evals" / "base" / "0"
    rows = evaluate_model(model, tokenizer, bundled_refs, task_dir=task_dir, out_dir=out_dir,
                          label="base-seed0", limit=8, batch_size=4)

    values = {(r["task"], r["metric"]): r for r in rows}
    assert {("skills_exact", "exact_match"), ("skills_mc", "acc"), ("skills_mc", "acc_norm")} <= set(values)
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    assert all(set(r) == {"task", "metric", "value", "stderr"} for r in rows)
    assert values[("skills_exact", "exact_match")]["value"] < 0.5   # a random model

    files = output_files(out_dir)
    assert len(files["results"]) == 1
    results = json.loads(files["results"][0].read_text())
    assert results["model_name"] == "base-seed0"
    assert results["n-samples"]["skills_exact"]["effective"] == 8
    assert "<|im_start|>" in results["chat_template"]

    exact = read_jsonl(files["samples:skills_exact"][0])
    mc = read_jsonl(files["samples:skills_mc"][0])
    assert len(exact) == 8 and len(mc) == 8
    # The prompt went through the chat template; replies were cut at the end of turn.
    assert exact[0]["arguments"]["gen_args_0"]["arg_0"].endswith("<|im_start|>assistant\n")
    for record in exact:
        reply = record["filtered_resps"][0]
        assert "<|im_end|>" not in reply and "\n" not in reply
    # The returned metric is the mean of the per-sample records lm-eval wrote.
    recomputed = sum(r["filtered_resps"][0].strip() == r["target"].strip() for r in exact) / len(exact)
    assert values[("skills_exact", "exact_match")]["value"] == pytest.approx(recomputed)
    assert values[("skills_mc", "acc")]["value"] == pytest.approx(sum(r["acc"] for r in mc) / len(mc))


def _oracle(tokenizer, replies: dict[str, str] | None = None):
    """A micro Llama whose forward pass answers every eval prompt, then says "ZZZ...".

    It says `replies[prompt]` when given, else the concise answer.
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from posttrain.models import build_builtin_model

    answers = {row["prompt"]: row["answer"] for row in eval_rows()} | (replies or {})
    header, user = tokenizer.encode("<|im_start|>assistant\n"), tokenizer.encode("<|im_start|>user\n")
    end_id, pad_id, junk_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("Z")

    def last_after(seq, marker):
        hits = [i for i in range(len(seq) - len(marker) + 1) if seq[i:i + len(marker)] == marker]
        return hits[-1] + len(marker) if hits else None

    def next_token(seq):
        reply_start, prompt_start = last_after(seq, header), last_after(seq, user)
        if reply_start is None or prompt_start is None:
            return junk_id
        prompt = tokenizer.decode(seq[prompt_start:seq.index(end_id, prompt_start)])
        target = tokenizer.encode(answers[prompt]) + [end_id]
        said = seq[reply_start:]
        return target[len(said)] if len(said) < len(target) and said == target[:len(said)] else junk_id

    class Oracle(LlamaForCausalLM):
        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            return {"input_ids": input_ids}       # no KV cache: forward sees the whole sequence

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            logits = torch.full((*input_ids.shape, self.config.vocab_size), -20.0)
            for b, row in enumerate(input_ids.tolist()):
                seq = []
                for t, token in enumerate(row):
                    if token != pad_id:
                        seq.append(token)
                        logits[b, t, next_token(seq)] = 20.0
            return CausalLMOutputWithPast(logits=logits)

    return Oracle(build_builtin_model("builtin:micro-llama", tokenizer).config)


def test_perfect_model_scores_one_and_stops_at_end_of_turn(tmp_path, tokenizer, bundled_refs):
    model = _oracle(tokenizer)
    # Without EOS in the generation config, generate() runs past <|im_end|>, and HFLM's
    # decode (skip_special_tokens) would glue the babble onto the answer: "5ZZZZ".
    model.generation_config.eos_token_id = None
    task_dir = prepare_task_dir(bundled_refs, tmp_path / "tasks")
    rows = evaluate_model(model, tokenizer, bundled_refs, task_dir=task_dir, out_dir=tmp_path / "out",
                          label="oracle", limit=12, batch_size=12)
    values = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert values[("skills_exact", "exact_match")] == 1.0
    assert values[("skills_mc", "acc")] == 1.0
    assert model.generation_config.eos_token_id is None     # restored afterwards
    exact = read_jsonl(output_files(tmp_path / "out")["samples:skills_exact"][0])
    assert [r["filtered_resps"][0] for r in exact] == [r["answer"] for r in eval_rows()[:12]]


def test_skills_task_scores_correctness_and_form_from_one_reply(tmp_path, tokenizer):
    """Known answer: 12 items answered concise-right, wordy-right, wordy-wrong,
    concise-wrong and extra text in turn; each filter scores exactly what it names,
    and the per-item scores the report pairs on are read per filter."""
    from posttrain.data.builtin import WORDY_FORMS
    from posttrain.samples import generated_replies, item_scores

    rows = eval_rows()[:12]
    kinds = ["concise", "wordy", "wordy_wrong", "concise_wrong", "extra", "concise"] * 2

    def reply(row, kind):
        wrong = str(int(row["answer"]) + 1)
        return {"concise": row["answer"], "wordy": row["wordy"], "concise_wrong": wrong,
                "wordy_wrong": WORDY_FORMS[row["skill"]].format(a=wrong), "extra": row["answer"] + " ok"}[kind]

    said = {row["prompt"]: reply(row, kind) for row, kind in zip(rows, kinds)}
    model = _oracle(tokenizer, said)
    model.generation_config.eos_token_id = None
    refs = resolve_tasks(["evals/skills.yaml"], [REPO])
    task_dir = prepare_task_dir(refs, tmp_path / "tasks")
    out = evaluate_model(model, tokenizer, refs, task_dir=task_dir, out_dir=tmp_path / "out",
                         label="oracle", limit=12, batch_size=12)
    values = {(r["task"], r["metric"]): r["value"] for r in out}
    assert set(values) == {("skills", "exact_match[correct]"), ("skills", "exact_match[concise]")}
    correct = [kind in ("concise", "wordy") for kind in kinds]
    concise = [kind == "concise" for kind in kinds]
    assert values[("skills", "exact_match[correct]")] == pytest.approx(sum(correct) / 12)
    assert values[("skills", "exact_match[concise]")] == pytest.approx(sum(concise) / 12)

    samples = output_files(tmp_path / "out")["samples:skills"][0]
    assert item_scores(samples, "exact_match[correct]") == {i: float(c) for i, c in enumerate(correct)}
    assert item_scores(samples, "exact_match[concise]") == {i: float(c) for i, c in enumerate(concise)}
    # The side-by-side shows what the model said, not a filter's extraction of it.
    shown = generated_replies(samples)
    assert [r["reply"] for r in shown.values()] == [said[row["prompt"]] for row in rows]
    assert shown[0]["target"] == f"{rows[0]['answer']} / {rows[0]['wordy']}"


def test_local_tasks_need_a_task_dir(tmp_path, tokenizer, bundled_refs):
    with pytest.raises(RecipeError, match="task_dir"):
        evaluate_model(object(), tokenizer, bundled_refs, task_dir=None, out_dir=tmp_path, label="x")


def test_item_scores_read_only_the_metrics_own_filter(tmp_path):
    """gsm8k writes one record per item and filter; a plain task's filter is "none"; our
    own preference records have no filter at all."""
    from posttrain.samples import generated_replies, item_scores

    records = []
    for doc_id, (strict, flexible) in enumerate([(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)]):
        for name, score in (("strict-match", strict), ("flexible-extract", flexible)):
            records.append({"doc_id": doc_id, "doc": {"question": f"q{doc_id}"}, "target": "4",
                            "arguments": {"gen_args_0": {"arg_0": f"q{doc_id}"}}, "resps": [[f"so #### {doc_id}"]],
                            "filtered_resps": [str(doc_id)], "filter": name, "exact_match": score})
    gsm8k = tmp_path / "samples_gsm8k_2026-01-01T00-00-00.jsonl"
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert item_scores(gsm8k, "exact_match[strict-match]") == {0: 1.0, 1: 0.0, 2: 0.0}
    assert item_scores(gsm8k, "exact_match[flexible-extract]") == {0: 1.0, 1: 1.0, 2: 0.0}
    assert item_scores(gsm8k, "exact_match") == {}          # no "none" filter in this file
    assert [r["reply"] for r in generated_replies(gsm8k).values()] == ["so #### 0", "so #### 1", "so #### 2"]

    plain = tmp_path / "samples_plain_2026-01-01T00-00-00.jsonl"
    plain.write_text(json.dumps({"doc_id": 0, "filter": "none", "acc": 1.0}) + "\n"
                     + json.dumps({"doc_id": 1, "filter": "none", "acc": 0.0}) + "\n")
    assert item_scores(plain, "acc") == {0: 1.0, 1: 0.0}
    ours = tmp_path / "preferences.jsonl"
    ours.write_text(json.dumps({"doc_id": 0, "pref_acc": True}) + "\n")
    assert item_scores(ours, "pref_acc") == {0: 1.0}
