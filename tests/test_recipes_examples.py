"""The shipped real-model recipes (recipes/examples/, handbook translations in handbook/):
every one validates, and plans against tiny stand-ins of the same architectures under the same
hub repo ids (offline: data sources pointed at local folders in the hub repo layout, eval tasks
at a local task). Nothing trains."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hub_fixtures import bpe_tokenizer, hub_model, ultrachat_folder, ultrafeedback_folder

from posttrain.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "recipes" / "examples"
RECIPES = sorted(EXAMPLES.rglob("*.yaml"))

# Each recipe's base model -> the tiny stand-in written under its repo id: (model_type, the special
# tokens of its tokenizer family, tied embeddings), as the real model has them.
STAND_INS = {
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", "smollm2", True),
    "HuggingFaceTB/SmolLM2-135M": ("llama", "smollm2", True),
    "Qwen/Qwen2.5-0.5B": ("qwen2", "qwen2", True),
    "Qwen/Qwen2.5-7B": ("qwen2", "qwen2", False),
    "meta-llama/Llama-3.1-8B": ("llama", "llama3", False),
    "mistralai/Mistral-7B-v0.1": ("mistral", "llama2", False),
    "mistral-community/Mixtral-8x22B-v0.1": ("mixtral", "llama2", False),
}
# Each hub dataset -> the local stand-in folder and its split names for the recipe's splits.
DATA_STAND_INS = {
    "HuggingFaceH4/ultrachat_200k": ("ultrachat", {}),
    "HuggingFaceTB/smoltalk": ("ultrachat", {"train": "train_sft", "test": "test_sft"}),
    "HuggingFaceH4/ultrafeedback_binarized": ("ultrafeedback", {}),
    "argilla/distilabel-capybara-dpo-7k-binarized": ("ultrafeedback", {"train": "train_prefs"}),
}
# What each recipe plans: pipeline -> its stages.
PIPELINES = {
    "handbook/smollm2.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"]},
    "handbook/zephyr-7b-beta-full.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"]},
    "handbook/zephyr-7b-beta-qlora.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"]},
    "handbook/zephyr-141b-orpo.yaml": {"orpo": ["orpo"]},
    "smollm2-135m.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"], "orpo": ["orpo"]},
    "qwen2.5-0.5b.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"], "orpo": ["orpo"]},
    "llama-3.1-8b-lora.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"], "orpo": ["orpo"]},
    "qwen2.5-7b-qlora.yaml": {"sft": ["sft"], "sft+dpo": ["sft", "dpo"], "orpo": ["orpo"]},
}


def name_of(path: Path) -> str:
    return path.relative_to(EXAMPLES).as_posix()


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_example_recipe_is_listed_here():
    assert sorted(map(name_of, RECIPES)) == sorted(PIPELINES)
    assert {raw(path)["model"]["name"] for path in RECIPES} <= set(STAND_INS)


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_example_recipe_validates(path):
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_header_says_what_it_reproduces_hardware_and_time(path):
    header = path.read_text().split("\nname:")[0]
    assert "Reproduces" in header and "Hardware" in header
    assert "time" in header.lower()
    if path.parent.name == "handbook":   # which handbook file, at which commit, and what is left out
        assert "alignment-handbook @ 19f03455e1b7c0450db769f841ced8e650610c06" in header
        assert "# not expressible:" in header


def test_eval_tasks_are_lm_eval_registry_names():
    """Each task a recipe names is a `task:` of a YAML shipped in lm-eval's task folder (read as
    text: building lm-eval's registry costs ~17 s)."""
    import importlib.util

    tasks_dir = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
    names = {match[1] for path in tasks_dir.rglob("*.yaml")
             for match in re.finditer(r"^task: *([\w.-]+) *$", path.read_text(errors="replace"), re.M)}
    wanted = {task for path in RECIPES for task in raw(path)["eval"]["tasks"]}
    assert wanted == {"ifeval", "arc_easy", "hellaswag", "truthfulqa_mc2", "gsm8k"}
    assert wanted <= names


# The handbook's own chat_template values (alignment-handbook @ 19f03455, recipes/zephyr-7b-beta/sft/
# config_full.yaml and recipes/smollm2/sft/config.yaml), which the .jinja files beside the recipes render
# with {% generation %} markers added.
HANDBOOK_TEMPLATES = {
    "zephyr.jinja": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
        "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"),
    "smollm2.jinja": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about owls."},
                {"role": "assistant", "content": "Owls fly."}, {"role": "user", "content": "And bees?"},
                {"role": "assistant", "content": "Bees sting."}]


@pytest.mark.parametrize("template", sorted(HANDBOOK_TEMPLATES))
def test_template_file_renders_the_handbook_text_and_marks_every_reply(template):
    tokenizer = bpe_tokenizer("smollm2" if template.startswith("smollm2") else "llama2")
    ours = (EXAMPLES / "handbook" / template).read_text()
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:4]):
        for prompt in (False, True):
            texts = [tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt,
                                                   chat_template=t) for t in (HANDBOOK_TEMPLATES[template], ours)]
            assert texts[0] == texts[1]
    marked = tokenizer.apply_chat_template(CONVERSATION[1:], chat_template=ours, return_dict=True,
                                           return_assistant_tokens_mask=True)
    replies = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
    assert tokenizer.decode(replies) == "Owls fly.{0}Bees sting.{0}".format(
        "<|im_end|>" if template.startswith("smollm2") else tokenizer.eos_token)


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """Every recipe's base model as a tiny stand-in in a hub cache of this module's own, and the
    UltraChat/UltraFeedback-shaped folders the data sources are pointed at."""
    import datasets
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("examples")
    patch = pytest.MonkeyPatch()
    patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets"))
    for repo_id, (model_type, tokens, tied) in STAND_INS.items():
        hub_model(root / "hub", repo_id, model_type=model_type, tokenizer_style=tokens, tied=tied)
    # 300 rows: more than two of the largest global batch (128), so steps per epoch tell batches apart
    yield {"root": root, "ultrachat": ultrachat_folder(root, n=300), "ultrafeedback": ultrafeedback_folder(root, n=300)}
    patch.undo()


def offline_overrides(path: Path, hub: dict) -> list[str]:
    """-o options pointing every dataset at a local stand-in folder and the evaluation at a local task."""
    recipe, options = raw(path), []
    for name, spec in recipe["data"].items():
        folder, splits = DATA_STAND_INS[spec["source"]]
        options += ["-o", f"data.{name}.source={hub[folder]}",
                    "-o", f"data.{name}.split={splits.get(spec['split'], spec['split'])}"]
        if spec.get("subset"):   # the stand-in folder has one subset
            options += ["-o", f"data.{name}.subset=null"]
    options += ["-o", f"eval.tasks=[{REPO}/evals/skills_exact.yaml]"]
    if recipe["eval"].get("preferences"):
        options += ["-o", f"eval.preferences.source={hub['ultrafeedback']}"]
    return options


def plan(path: Path, hub: dict, *extra: str):
    args = ["plan", str(path), "--json", "--cache", str(hub["root"] / "cache"), *offline_overrides(path, hub), *extra]
    return CliRunner().invoke(main, args)


def planned_chains(planned: dict) -> dict[str, list[str]]:
    """pipeline -> its stages, read back from the plan's stage entries (one seed)."""
    by_key = {entry["key"]: entry for entry in planned["stages"]}
    by_stage = {entry["stage"]: entry for entry in planned["stages"]}
    chains = {}
    for pipeline, key in planned["pipelines"].items():
        name = pipeline.rsplit("/", 1)[0]
        if key is None:
            continue
        chain, entry = [], by_key[key]
        while entry is not None:
            chain.insert(0, entry["stage"])
            entry = by_stage.get(entry["after"])
        chains[name] = chain
    return chains


def stated_global_batches(path: Path) -> dict[str, int]:
    """stage -> the global batch its gradient_accumulation comment states ("global batch 128 =
    16 x 8" or "= 4 x 4 x 8 GPUs"), checked against the product it shows."""
    stated, stage, in_stages = {}, None, False
    for line in path.read_text().splitlines():
        if not line.startswith(" "):
            in_stages = line.startswith("stages:")
        elif in_stages and re.fullmatch(r"  ([\w.+-]+):\s*", line):
            stage = line.strip().rstrip(":")
        elif in_stages and line.strip().startswith("gradient_accumulation:"):
            match = re.search(r"global batch (\d+) = ([\d x]+\d)", line)
            assert match, f"{path.name}: stages.{stage}.gradient_accumulation: no 'global batch N = a x b' comment"
            assert math.prod(int(n) for n in match[2].split(" x ")) == int(match[1]), line
            stated[stage] = int(match[1])
    return stated


def check_plan(path: Path, planned: dict) -> None:
    assert planned_chains(planned) == PIPELINES[name_of(path)]
    # a shared prefix is one stage: SFT is trained once for sft and sft+dpo
    assert len(planned["stages"]) == len({s for chain in PIPELINES[name_of(path)].values() for s in chain})
    stages, stated = raw(path)["stages"], stated_global_batches(path)
    assert set(stated) == set(stages)
    for entry in planned["stages"]:   # the global batch a stage's comment states is the one planned
        spec = stages[entry["stage"]]
        assert spec["batch_size"] * spec["gradient_accumulation"] == stated[entry["stage"]]
        assert entry["steps_per_epoch"] == math.ceil(entry["examples"] / stated[entry["stage"]]), entry


def planned_json(result) -> dict:
    return json.loads(result.stdout)


def bitsandbytes_optimizers(path: Path) -> dict[str, str]:
    """stage -> its optimizer, for the stages whose optimizer needs bitsandbytes."""
    return {name: spec["optim"] for name, spec in raw(path)["stages"].items()
            if "bnb" in spec.get("optim", "") or "8bit" in spec.get("optim", "") or
            spec.get("optim", "").startswith("paged_")}


def refusals_here(path: Path) -> tuple[list[str], list[str]]:
    """(what `plan` must refuse on this machine, the -o options that plan the rest): QLoRA needs a
    CUDA GPU, 8-bit and paged optimizers need bitsandbytes, tracking.tensorboard a writer."""
    import importlib.util

    import torch

    messages, options = [], []
    if raw(path).get("tracking", {}).get("tensorboard") and not any(
            importlib.util.find_spec(module) for module in ("tensorboard", "tensorboardX")):
        messages.append("tracking.tensorboard: needs TensorBoard's writer: pip install tensorboard")
        options += ["-o", "tracking.tensorboard=false"]
    if "quantization" in raw(path)["model"] and not torch.cuda.is_available():
        messages.append("model.quantization: 4-bit loading (QLoRA, bitsandbytes) needs a CUDA GPU")
        options += ["-o", "model.quantization=null"]
    if raw(path).get("model", {}).get("attn_implementation") == "flash_attention_2" and not importlib.util.find_spec(
            "flash_attn"):
        messages.append("model.attn_implementation: flash_attention_2 needs the flash-attn package")
        options += ["-o", "model.attn_implementation=sdpa"]
    if importlib.util.find_spec("bitsandbytes") is None:
        for stage, optim in bitsandbytes_optimizers(path).items():
            messages.append(f"stages.{stage}.optim: {optim} needs bitsandbytes: pip install 'posttrain[qlora]'")
            options += ["-o", f"stages.{stage}.optim=adamw_torch"]
    return messages, options


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_example_recipe_plans_against_tiny_models_of_its_architecture(path, offline_hub):
    """What this machine lacks (a CUDA GPU for QLoRA, bitsandbytes for 8-bit and paged optimizers,
    a TensorBoard writer) is refused before training, every refusal at once, naming what to
    install; without those settings the recipe plans."""
    messages, options = refusals_here(path)
    if messages:
        refused = plan(path, offline_hub)
        assert refused.exit_code == 2
        for message in messages:
            assert message in refused.output
    result = plan(path, offline_hub, *options)
    assert result.exit_code == 0, result.output
    check_plan(path, planned_json(result))


def test_the_handbook_settings_reach_the_stages():
    """What the translations lean on: the ORPO config's reentrant checkpointing through the
    passthrough, warmup in steps, and the QLoRA DPO stage's own adapter."""
    from posttrain.recipe.load import load_recipe

    orpo = load_recipe(EXAMPLES / "handbook" / "zephyr-141b-orpo.yaml").stages["orpo"]
    assert orpo.trainer == {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
    assert (orpo.warmup_steps, orpo.warmup_ratio, orpo.gradient_checkpointing) == (100, 0.0, True)
    qlora = load_recipe(EXAMPLES / "handbook" / "zephyr-7b-beta-qlora.yaml")
    assert (qlora.model.lora.r, qlora.stages["dpo"].lora.r, qlora.model.quantization.double_quant) == (16, 128, False)


@pytest.mark.parametrize("path", RECIPES, ids=name_of)
def test_example_recipe_plans_for_world_sizes_1_2_and_8(path, offline_hub):
    """The global batch each stage states is laid out over 1, 2 and 8 GPUs (per-device batch x
    accumulation x GPUs), with the same stage keys on every world size."""
    _, options = refusals_here(path)
    stated = stated_global_batches(path)
    keys = None
    for world in (1, 2, 8):
        result = plan(path, offline_hub, *options, "--world-size", str(world), "--device", "cuda")
        assert result.exit_code == 0, result.output
        stages = planned_json(result)["stages"]
        assert keys in (None, [entry["key"] for entry in stages])
        keys = [entry["key"] for entry in stages]
        for entry in stages:
            assert entry["per_device_batch"] * entry["gradient_accumulation"] * world == stated[entry["stage"]]
            assert entry["per_device_batch"] <= raw(path)["stages"][entry["stage"]]["batch_size"]
            assert (entry["world_size"], entry["strategy"]) == (world, "single" if world == 1 else "ddp")
            assert entry["precision"] == raw(path)["model"]["dtype"] == "bfloat16" and entry["bf16"]
