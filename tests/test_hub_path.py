"""The path a real user takes on the first day, offline: a hub model (BPE tokenizer without
ChatML tokens or pad), LoRA, `chat_template: chatml`, UltraChat- and UltraFeedback-shaped
datasets in the hub repo layout with their split names, and lm-eval's registry task
`arc_easy` -- sft, sft+dpo and orpo train and evaluate end to end."""

import json

import pytest
from click.testing import CliRunner
from hub_fixtures import COMMIT, arc_easy_cache, hub_model, ultrachat_folder, ultrafeedback_folder

from posttrain.cli import main

RECIPE = """
name: hub-path
model:
  name: {model}
  chat_template: chatml
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}}
data:
  chat: {{source: {ultrachat}, split: train_sft}}
  prefs: {{source: {ultrafeedback}, split: train_prefs}}
stages:
  sft: {{method: sft, data: chat, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 128}}
  dpo: {{method: dpo, data: prefs, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 128}}
  orpo: {{method: orpo, data: prefs, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 128}}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
  orpo: [orpo]
eval:
  tasks: [arc_easy, {repo}/evals/skills_exact.yaml]
  limit: 4
  samples: 0
report: {{resamples: 200}}
"""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache and a datasets cache of this test's own, offline."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    snapshot = hub_model(tmp_path / "hub")
    arc_easy_cache(tmp_path / "datasets")
    return {"snapshot": snapshot, "ultrachat": ultrachat_folder(tmp_path), "ultrafeedback": ultrafeedback_folder(tmp_path)}


def sample_ids(tokenizer):
    conversation = [{"role": "user", "content": "Tell me about owls."}, {"role": "assistant", "content": "Owls fly."}]
    return tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]


def logits_of(source):
    import torch

    from posttrain.models import load_model

    loaded = load_model(source)
    with torch.no_grad():
        return loaded.model.eval()(sample_ids(loaded.tokenizer)).logits, loaded


@pytest.mark.parametrize("where", ["hub id", "local folder"])
def test_hub_model_with_lora_and_chatml_trains_evaluates_and_reloads_identically(tmp_path, repo, hub, where):
    import torch

    from posttrain.cache import Cache
    from posttrain.models import ModelSource
    from posttrain.plan import make_plan, source_after
    from posttrain.recipe.load import load_recipe

    model = "tinyorg/tiny-base" if where == "hub id" else str(hub["snapshot"])
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, repo=repo, **hub))
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["run", str(path), "--cache", str(cache), "--out", str(tmp_path / "run"),
                                       "--no-wandb"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "base is evaluated with the chat template's <|im_start|>, <|im_end|>, which its tokenizer did not" in report
    evaluated = {(row["pipeline"], row["task"]) for row in rows}
    for pipeline in ("base", "sft", "sft+dpo", "orpo"):
        assert {(pipeline, "arc_easy"), (pipeline, "skills_exact")} <= evaluated

    recipe = load_recipe(path)
    plan = make_plan(recipe, tmp_path, cache_root=cache)
    base = ModelSource.of(recipe.model)
    base_logits, base_loaded = logits_of(base)
    assert torch.equal(base_logits, logits_of(base)[0]), "the base's added rows differ between loads"
    assert base_loaded.added_token_ids, "the BPE tokenizer has no ChatML tokens: chatml adds them"
    assert plan.weights == (f"commit:{COMMIT}" if where == "hub id" else plan.weights)
    for node in plan.nodes.values():
        source = source_after(plan, node, Cache(cache))
        first, loaded = logits_of(source)
        second, _ = logits_of(source)
        assert torch.equal(first, second), f"{node.stage}: two loads differ"
        assert not torch.equal(first, base_logits), f"{node.stage}: no change from the base"
        adapter = Cache(cache).stage_dir(node.key) / "model" / "adapter_model.safetensors"
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as weights:
            names = list(weights.keys())
        # The adapter holds the added tokens' rows, never whole embedding matrices.
        assert any("trainable_tokens_delta" in name for name in names), names
        assert not any(name.endswith(("embed_tokens.weight", "lm_head.weight")) for name in names), names
        if node.stage == "sft":
            ids = list(base_loaded.added_token_ids)
            for layer in ("get_input_embeddings", "get_output_embeddings"):
                before = getattr(base_loaded.model, layer)().weight[ids]
                after = getattr(loaded.model, layer)().weight[ids]
                assert not torch.allclose(before, after), f"{layer}: the added tokens' rows did not learn"
                others = slice(0, min(ids))
                assert torch.equal(getattr(base_loaded.model, layer)().weight[others],
                                   getattr(loaded.model, layer)().weight[others])
            assert loaded.tokenizer.eos_token == "<|im_end|>" == loaded.tokenizer.pad_token


def test_a_hub_dataset_subset_is_read_from_a_folder_in_the_hub_layout(tmp_path):
    """`subset:` is the dataset's config name (`load_dataset(path, name)`): SmolTalk's `all`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.io import load_examples
    from posttrain.errors import DataError

    folder = tmp_path / "smoltalk"
    for subset, n in (("all", 3), ("small", 1)):
        (folder / "data" / subset).mkdir(parents=True)
        rows = [{"messages": [{"role": "user", "content": f"{subset} {i}?"}, {"role": "assistant", "content": "ok"}]}
                for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / subset / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n" + "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: data/{s}/train-*\n"
                                    for s in ("all", "small")) + "---\n")
    examples = load_examples(str(folder), subset="all").examples
    assert [e["messages"][0]["content"] for e in examples] == ["all 0?", "all 1?", "all 2?"]
    assert len(load_examples(str(folder), subset="small").examples) == 1
    with pytest.raises(DataError, match="subset 'nope', split 'train'"):
        load_examples(str(folder), subset="nope")

    from posttrain.data.sources import load_data
    from posttrain.recipe.schema import DataSpec

    with pytest.raises(DataError, match=r"^data\.smol: could not load dataset .*split 'tset'"):
        load_data("smol", DataSpec(source=str(folder), subset="all", split="tset"), "instruction", tmp_path)
