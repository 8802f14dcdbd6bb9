"""A stage's key holds what the base model's weights are, not only its name."""

import json

import pytest
from click.testing import CliRunner

from posttrain import identity
from posttrain.cli import main
from posttrain.errors import ModelError
from posttrain.identity import weights_identity
from tiny_recipes import write_recipe

LOCAL = """
name: local-model
model: {name: MODEL}
data:
  ins: {source: builtin:skills, limit: 32}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 96}
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 4
  samples: 0
report: {resamples: 200}
"""


@pytest.fixture
def local_model(tmp_path):
    from posttrain.models import ModelSource, load_model_and_tokenizer

    folder = tmp_path / "my-model"
    model, tokenizer = load_model_and_tokenizer(ModelSource(name="builtin:micro-llama"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_edited_local_model_retrains_its_stages_and_plan_says_why(tmp_path, repo, local_model):
    recipe = write_recipe(tmp_path, repo, LOCAL.replace("MODEL", str(local_model)))
    cache = tmp_path / "cache"
    run = CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
                                    "--no-wandb"])
    assert run.exit_code == 0, run.output
    same = CliRunner().invoke(main, ["plan", str(recipe), "--cache", str(cache), "--json"])
    assert json.loads(same.stdout)["stages"][0]["status"] == "reuse"

    # Overwrite the weights in place (same name, same revision: nothing else says so).
    from safetensors.torch import load_file, save_file

    weights = local_model / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed = CliRunner().invoke(main, ["plan", str(recipe), "--cache", str(cache), "--json"])
    row = json.loads(changed.stdout)["stages"][0]
    assert row["status"] == "train", row
    assert row["why"].startswith("base model's weights changed (sha256:"), row["why"]


def test_file_hashes_are_remembered_by_size_and_mtime(tmp_path, local_model, monkeypatch):
    reads = []
    real = identity._file_sha256
    monkeypatch.setattr(identity, "_file_sha256", lambda path: reads.append(path.name) or real(path))
    first = weights_identity(str(local_model), None, tmp_path / "cache")
    assert "model.safetensors" in reads and len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    reads.clear()
    assert weights_identity(str(local_model), None, tmp_path / "cache") == first and reads == []
    (local_model / "chat_template.jinja").write_text("{{ messages }}")   # a template edit is a new identity
    assert weights_identity(str(local_model), None, tmp_path / "cache") != first
    assert reads == ["chat_template.jinja"]
    assert weights_identity(str(local_model), None) == weights_identity(str(local_model), None, tmp_path / "cache")


def hub_snapshot(root, repo_id: str, commit: str, ref: str = "main"):
    """A model folder in the Hugging Face Hub cache layout, `ref` pointing at `commit`."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return folder


def test_a_hub_model_is_its_resolved_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old, new = "a" * 40, "b" * 40
    folder = hub_snapshot(tmp_path, "org/model", old)
    assert weights_identity("org/model", None) == f"commit:{old}"
    assert weights_identity("org/model", "main") == f"commit:{old}"
    assert weights_identity("org/model", "c" * 40) == f"commit:{'c' * 40}"   # a commit pins itself
    (folder / "snapshots" / new).mkdir()
    (folder / "snapshots" / new / "config.json").write_text("{}")
    (folder / "refs" / "main").write_text(new)                              # `main` moved
    assert weights_identity("org/model", None) == f"commit:{new}"
    with pytest.raises(ModelError, match="revision dev is not in the local hub cache and the hub is offline"):
        weights_identity("org/model", "dev")


def test_builtin_models_keep_their_keys():
    """Builtin models are generated from their name: no weights identity, so every key made
    before weights were hashed (the quickstart's) stays valid."""
    assert weights_identity("builtin:tiny-llama", None) is None
