"""chat_template: chatml, the model's own, a Jinja string or a Jinja file; EOS follows the
template's end of turn; the template's text is part of every key."""

import json

import pytest
from click.testing import CliRunner
from hub_fixtures import bpe_tokenizer

from posttrain.cli import main
from posttrain.errors import ModelError
from posttrain.models import apply_chat_template_choice, chat_template_problem
from tiny_recipes import write_recipe

ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
          "message['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOL = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named "
        "SmolLM.<|im_end|>\n' }}{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_jinja_string_is_installed_and_eos_already_ending_its_turns_is_kept():
    tokenizer = bpe_tokenizer()
    assert apply_chat_template_choice(tokenizer, None, ZEPHYR) == ()   # nothing added
    assert tokenizer.chat_template == ZEPHYR and tokenizer.eos_token == "</s>" == tokenizer.pad_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_eos_becomes_the_special_token_that_ends_the_templates_turns():
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    apply_chat_template_choice(tokenizer, None, LLAMA3)
    assert tokenizer.eos_token == "<|eot_id|>"


def test_a_template_whose_turns_end_without_eos_is_refused():
    """Llama-3's template on a tokenizer without <|eot_id|>: replies would never stop."""
    problem = chat_template_problem(bpe_tokenizer(), LLAMA3)
    assert problem.startswith("chat template ends assistant turns with '<|eot_id|>' but the tokenizer's EOS is "
                              "'</s>'"), problem
    with pytest.raises(ModelError):
        apply_chat_template_choice(bpe_tokenizer(), None, LLAMA3)


FILE_RECIPE = """
name: template-file
model: {name: builtin:micro-llama, chat_template: templates/smol.jinja}
data:
  ins: {source: builtin:skills, limit: 16}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 1, batch_size: 8, max_length: 128}
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 2
  samples: 0
"""


def plan_row(recipe, cache) -> dict:
    result = CliRunner().invoke(main, ["plan", str(recipe), "--cache", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["stages"][0]


def test_a_template_file_is_read_beside_the_recipe_and_its_content_is_in_the_key(tmp_path, repo, monkeypatch):
    (tmp_path / "templates").mkdir()
    template = tmp_path / "templates" / "smol.jinja"
    template.write_text(SMOL)
    recipe = write_recipe(tmp_path, repo, FILE_RECIPE)
    monkeypatch.chdir(tmp_path.parent)   # relative to the recipe's folder, not the cwd
    assert CliRunner().invoke(main, ["validate", str(recipe)]).exit_code == 0
    cache = tmp_path / "cache"
    run = CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
                                    "--no-wandb"])
    assert run.exit_code == 0, run.output
    record = json.loads(next((cache / "stages").glob("*/stage.json")).read_text())
    assert record["key_inputs"]["template"].startswith("sha256:")
    samples = (tmp_path / "run" / "evals").rglob("samples_*.jsonl")
    prompt = json.loads(next(samples).read_text().splitlines()[0])["arguments"]
    assert "You are a helpful AI assistant named SmolLM." in json.dumps(prompt)   # the default system prompt
    assert plan_row(recipe, cache)["status"] == "reuse"

    template.write_text(SMOL.replace("SmolLM", "Smol"))   # same name, new content
    row = plan_row(recipe, cache)
    assert row["status"] == "train" and row["why"].startswith("chat template changed (sha256:"), row


def test_the_models_own_template_edited_retrains(tmp_path, repo):
    from posttrain.models import ModelSource, load_model_and_tokenizer

    folder = tmp_path / "model"
    model, tokenizer = load_model_and_tokenizer(ModelSource(name="builtin:micro-llama"))
    tokenizer.chat_template = SMOL
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = write_recipe(tmp_path, repo, FILE_RECIPE.replace("builtin:micro-llama", str(folder)).replace(
        "templates/smol.jinja", "model"))
    cache = tmp_path / "cache"
    assert CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
                                     "--no-wandb"]).exit_code == 0
    tokenizer.chat_template = SMOL.replace("SmolLM", "Smol")
    tokenizer.save_pretrained(folder)
    row = plan_row(recipe, cache)
    assert row["status"] == "train" and "chat template changed (sha256:" in row["why"], row


@pytest.mark.parametrize("value, message", [
    ("zephyr", "model.chat_template: use chatml, model, a Jinja template (text with {{ }} or {% %}), or a template "
               "file (.jinja, .jinja2, .j2)"),
    ("missing.jinja", "model.chat_template: template file not found: "),
])
def test_a_template_that_is_neither_a_name_jinja_nor_a_file_is_refused_at_validate(tmp_path, repo, value, message):
    recipe = write_recipe(tmp_path, repo, FILE_RECIPE.replace("templates/smol.jinja", value))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
