"""`posttrain export`: a pipeline of a finished run as a model plain transformers (or peft)
loads, identical to the model the run evaluated; deterministic; pushed through a stubbed
HfApi; every user error a message with exit 2."""

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from hub_fixtures import COMMIT, hub_model, ultrachat_folder, ultrafeedback_folder

from posttrain.cli import main
from tiny_recipes import write_recipe

RECIPE = """
name: tiny-export
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 32}
  prefs: {source: builtin:skills-preferences, limit: 32}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 64}
  lsft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 64,
         lora: {r: 4, alpha: 8, dropout: 0.0}}
  ldpo: {method: dpo, data: prefs, learning_rate: 1.0e-2, max_steps: 1, batch_size: 8, max_length: 64,
         lora: {r: 4, alpha: 8, dropout: 0.0}}
pipelines:
  sft: [sft]
  lora: [lsft]
  lora+dpo: [lsft, ldpo]
  sft+ldpo: [sft, ldpo]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 2
  samples: 0
report: {resamples: 100}
"""

CHAT = [{"role": "user", "content": "Count the letters in 'owl'."}]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, repo):
    """One finished run (full-FT SFT, LoRA SFT, LoRA SFT -> LoRA DPO, full SFT -> LoRA DPO)."""
    root = tmp_path_factory.mktemp("export-run")
    recipe = write_recipe(root, repo, RECIPE)
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(root / "run"), "--cache",
                                       str(root / "cache"), "--no-wandb", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"recipe": recipe, "run": root / "run", "cache": root / "cache"}


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def evaluated_source(recipe_path, cache, pipeline, seed=0):
    """The model the run trained and evaluated for (pipeline, seed), as posttrain builds it."""
    from posttrain.cache import Cache
    from posttrain.plan import make_plan, source_after
    from posttrain.recipe.load import load_recipe

    plan = make_plan(load_recipe(recipe_path), recipe_path.parent, cache_root=cache)
    node = plan.finals[(pipeline, seed)]
    return source_after(plan, node, Cache(cache)), node


def chat_logits(model, tokenizer):
    import torch

    ids = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": "3"}], return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.eval()(ids).logits


def load_plain(folder):
    """The exported folder through transformers alone (no posttrain code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def generates(model, tokenizer):
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("pipeline, flags, kind", [("sft", [], "full"), ("lora+dpo", ["--merge"], "merged")])
def test_export_loads_with_plain_transformers_and_is_the_evaluated_model(tiny_run, tmp_path, pipeline, flags, kind):
    import torch

    from posttrain.models import CHATML_TEMPLATE, load_model

    out = tmp_path / "model"
    result = export(tiny_run["run"], pipeline, "--out", out, *flags)
    assert result.exit_code == 0, result.output
    assert f"as {kind} to {out}" in result.output
    model, tokenizer = load_plain(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert generates(model, tokenizer)
    source, node = evaluated_source(tiny_run["recipe"], tiny_run["cache"], pipeline)
    evaluated = load_model(source)
    assert torch.equal(chat_logits(model, tokenizer), chat_logits(evaluated.model, evaluated.tokenizer))
    record = json.loads((out / "posttrain_export.json").read_text())
    assert record["export"] == kind and record["pipeline"] == pipeline and record["seed"] == 0
    keys = []
    while node is not None:
        keys.insert(0, node.key)
        node = node.parent
    assert [stage["key"] for stage in record["stages"]] == keys
    card = (out / "README.md").read_text()
    rows = [json.loads(line) for line in (tiny_run["run"] / "results.jsonl").read_text().splitlines()]
    exact = next(r for r in rows if r["pipeline"] == pipeline and r["metric"] == "exact_match")
    assert f"| skills_exact | exact_match | {exact['value']:.4g} |" in card
    assert not list(out.glob(".*")), "the scratch folder is left behind"


def test_two_exports_of_a_pipeline_are_byte_identical(tiny_run, tmp_path):
    for name in ("a", "b"):
        result = export(tiny_run["run"], "lora+dpo", "--merge", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    first = file_hashes(tmp_path / "a")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "posttrain_export.json"} <= set(first)
    assert first == file_hashes(tmp_path / "b")


@pytest.mark.parametrize("pipeline, message", [
    ("lora", "is a LoRA adapter on builtin:micro-llama, a model that exists only inside posttrain"),
    ("lora+dpo", "stacks LoRA adapters (lsft (LoRA) -> ldpo (LoRA))"),
    ("sft+ldpo", "puts a LoRA adapter on top of a full fine-tune (sft (full) -> ldpo (LoRA))"),
])
def test_adapter_only_export_is_refused_where_the_adapter_is_not_the_model(tiny_run, tmp_path, pipeline, message):
    result = export(tiny_run["run"], pipeline, "--out", tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Add --merge" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


def test_user_errors_exit_2_with_a_message(tiny_run, tmp_path):
    run = tiny_run["run"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    two_seeds = tmp_path / "two-seeds"
    shutil.copytree(run, two_seeds, symlinks=True)
    table = json.loads((two_seeds / "pipelines.json").read_text())
    table["sft"]["1"] = table["sft"]["0"]
    (two_seeds / "pipelines.json").write_text(json.dumps(table))
    out = tmp_path / "out"
    cases = [
        ([tmp_path / "missing", "sft", "--out", out], "no such run directory"),
        ([mine, "sft", "--out", out], "not a posttrain run directory"),
        ([run, "dpo", "--out", out], "no pipeline 'dpo'; its pipelines: lora, lora+dpo, sft, sft+ldpo"),
        ([run, "base", "--out", out], "'base' is the untrained base model"),
        ([run, "sft", "--seed", 7, "--out", out], "pipeline 'sft' has no seed 7; its seeds: 0"),
        ([two_seeds, "sft", "--out", out], "trained with 2 seeds (0, 1); choose one with --seed"),
        ([run, "sft", "--out", mine], "is not empty (1 entries, e.g. notes.txt)"),
        ([run, "sft", "--out", mine / "notes.txt"], "is a file"),   # click refuses it
        ([run, "sft", "--out", out, "--private"], "--private goes with --push-to-hub REPO_ID"),
        ([run, "sft", "--out", out, "--push-to-hub", "a/b/c"], "not a valid repository id"),
        # The export must outlive the cache (gc empties it) and stay out of posttrain's run records.
        ([run, "sft", "--out", tiny_run["cache"] / "exported"], "is inside the stage cache"),
        ([run, "sft", "--out", run / "exported"], "is inside the run directory"),
    ]
    for args, message in cases:
        result = export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not out.exists() and (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert not (tiny_run["cache"] / "exported").exists() and not (run / "exported").exists()
    result = export(two_seeds, "sft", "--seed", 1, "--out", out)
    assert result.exit_code == 0 and "(seed 1: sft)" in result.output, result.output


def test_a_stage_removed_from_the_cache_is_named_with_how_to_rebuild_it(tiny_run, tmp_path):
    from posttrain.cache import Cache

    folder = json.loads((tiny_run["run"] / "pipelines.json").read_text())["lora+dpo"]["0"][-1]
    record = json.loads((tiny_run["run"] / "stages" / folder / "stage.json").read_text())
    entry = Cache(tiny_run["cache"]).stage_dir(record["key"])
    parked = tmp_path / "parked"
    entry.rename(parked)   # as `cache gc` would leave it; put back for the other tests
    try:
        result = export(tiny_run["run"], "lora+dpo", "--merge", "--out", tmp_path / "m")
    finally:
        parked.rename(entry)
    assert result.exit_code == 2, result.output
    assert f"stage ldpo (seed 0), key {record['key'][:12]}: not in the cache" in result.output
    assert "Run the run's recipe again to rebuild it" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, optionally refuses as the Hub does."""

    calls: list = []
    refuse = False

    def create_repo(self, **kwargs):
        if FakeHub.refuse:
            import httpx
            from huggingface_hub.errors import HfHubHTTPError

            response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError("401 Client Error: Unauthorized (Invalid credentials)", response=response)
        FakeHub.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        FakeHub.calls.append(("upload_folder", kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    out = tmp_path / "m"
    result = export(tiny_run["run"], "sft", "--out", out, "--push-to-hub", "me/tiny-sft", "--private")
    assert result.exit_code == 0, result.output
    assert "pushed to https://huggingface.co/me/tiny-sft" in result.output
    (create, created), (upload, uploaded, files) = FakeHub.calls
    assert create == "create_repo" and created == {"repo_id": "me/tiny-sft", "repo_type": "model", "private": True,
                                                   "exist_ok": True}
    assert upload == "upload_folder" and uploaded["folder_path"] == str(out) and uploaded["repo_id"] == "me/tiny-sft"
    assert {"model.safetensors", "posttrain_export.json", "README.md"} <= set(files)

    monkeypatch.setattr(FakeHub, "refuse", True)
    result = export(tiny_run["run"], "sft", "--out", tmp_path / "n", "--push-to-hub", "me/tiny-sft")
    assert result.exit_code == 2, result.output
    assert "--push-to-hub me/tiny-sft: the Hub refused: HfHubHTTPError: 401 Client Error" in result.output
    assert "hf auth login" in result.output and "Traceback" not in result.output
    assert (tmp_path / "n" / "posttrain_export.json").is_file(), "the export is kept for a later upload"


HUB_RECIPE = """
name: hub-export
model:
  name: tinyorg/tiny-base
  chat_template: chatml
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}}
data:
  chat: {{source: {ultrachat}, split: train_sft}}
  prefs: {{source: {ultrafeedback}, split: train_prefs}}
stages:
  sft: {{method: sft, data: chat, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 128}}
  dpo: {{method: dpo, data: prefs, learning_rate: 1.0e-2, max_steps: 1, batch_size: 8, max_length: 128}}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 2
  samples: 0
report: {{resamples: 100}}
"""


def test_hub_model_with_lora_and_added_chatml_tokens_exports_merged_and_as_adapter(tmp_path, repo, monkeypatch):
    """A hub BPE model without ChatML tokens, LoRA + chatml: the merged export holds the
    trained rows of the added tokens; the adapter export loads through peft's
    AutoPeftModelForCausalLM (base at the pinned commit) as the same model."""
    import torch
    from huggingface_hub import constants
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    from posttrain.models import load_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_model(tmp_path / "hub")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HUB_RECIPE.format(repo=repo, ultrachat=ultrachat_folder(tmp_path),
                                        ultrafeedback=ultrafeedback_folder(tmp_path)))
    cache, run = tmp_path / "cache", tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--out", str(run), "--no-wandb",
                                       "--quiet"])
    assert result.exit_code == 0, result.output

    merged = tmp_path / "merged"
    assert export(run, "sft+dpo", "--merge", "--out", merged).exit_code == 0
    model, tokenizer = load_plain(merged)
    source, _ = evaluated_source(recipe, cache, "sft+dpo")
    evaluated = load_model(source)
    ids = evaluated.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert evaluated.added_token_ids == tuple(ids) == tuple(tokenizer.convert_tokens_to_ids(["<|im_start|>",
                                                                                            "<|im_end|>"]))
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(model, layer)().weight[ids], getattr(evaluated.model, layer)().weight[ids])
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == ids[1]
    assert generates(model, tokenizer)
    assert torch.equal(chat_logits(model, tokenizer), chat_logits(evaluated.model, evaluated.tokenizer))

    adapter = tmp_path / "adapter"
    result = export(run, "sft", "--out", adapter)
    assert result.exit_code == 0 and "as adapter" in result.output, result.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("tinyorg/tiny-base", COMMIT)
    assert not (adapter / "model.safetensors").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert GenerationConfig.from_pretrained(adapter).eos_token_id == tokenizer.eos_token_id == ids[1]
    evaluated = load_model(evaluated_source(recipe, cache, "sft")[0])
    expected = chat_logits(evaluated.model, evaluated.tokenizer)
    assert torch.allclose(chat_logits(peft_model, tokenizer), expected, atol=1e-5)   # unmerged: rounding differs
    # By hand (as the model card says): the base at its commit, grown to the tokenizer first.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained("tinyorg/tiny-base", revision=COMMIT)
    base.resize_token_embeddings(len(tokenizer))
    assert torch.allclose(chat_logits(PeftModel.from_pretrained(base, str(adapter)), tokenizer), expected, atol=1e-5)
    assert "base_model: tinyorg/tiny-base" in (adapter / "README.md").read_text()

    # QLoRA (model.quantization, GPU only: simulated by the record main's stage keys write):
    # its adapter exports, naming the 4-bit loading; merging into 4-bit weights is refused.
    from dataclasses import replace

    from posttrain.export import ExportError, export_pipeline, find_pipeline

    q = {"bits": 4, "compute_dtype": "bfloat16", "double_quant": True, "quant_type": "nf4"}
    qlora = replace(find_pipeline(run, "sft", None, cache), quantization=q)
    assert export_pipeline(qlora, tmp_path / "qlora", merge=False)["base_model"]["quantization"] == q
    assert "loaded in 4 bits by bitsandbytes (bits 4, compute_dtype bfloat16" in (tmp_path / "qlora" / "README.md"
                                                                                  ).read_text()
    with pytest.raises(ExportError, match="the base loaded in 4 bits"):
        export_pipeline(qlora, tmp_path / "qlora-merged", merge=True)


def test_a_template_file_is_taken_from_the_tokenizer_the_stage_saved(tmp_path):
    """A recipe's .jinja file may have changed since training: the export installs the text
    the stage saved, and only when it is the text the stage key hashed."""
    import hashlib as hl

    from posttrain.export import ExportError, trained_template

    text = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(text)
    digest = "sha256:" + hl.sha256(text.encode()).hexdigest()[:16]
    assert trained_template(tmp_path, digest, "chat.jinja") == text
    with pytest.raises(ExportError, match="is not the chat.jinja the stage trained with"):
        trained_template(tmp_path, "sha256:0123456789abcdef", "chat.jinja")


def test_export_help_has_examples():
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--push-to-hub REPO_ID" in result.output


def test_a_failed_export_leaves_no_partial_files(tiny_run, tmp_path, monkeypatch):
    import posttrain.export
    from posttrain.errors import ModelError

    def fail(*args):
        raise ModelError("cannot load model: disk went away")

    monkeypatch.setattr(posttrain.export, "write_weights", fail)
    out = tmp_path / "m"
    result = export(tiny_run["run"], "sft", "--out", out)
    assert result.exit_code == 2 and "disk went away" in result.output, result.output
    assert list(out.iterdir()) == [], "the scratch folder of the failed attempt is left behind"
