"""Stand-ins for what a user downloads from the Hugging Face Hub, written offline in code.

- `hub_model`: a tiny Llama in the hub cache layout (`models--org--name/snapshots/<commit>/`,
  `refs/main`), so `from_pretrained("org/name")` with HF_HUB_OFFLINE=1 takes the exact
  code path of real use. Its tokenizer is trained here: byte-level BPE with Llama/Mistral
  specials (`<s>` added in front of every text, `</s>` EOS, `<unk>`), no ChatML tokens,
  no pad token, no chat template; its embeddings are not tied (Llama-2, Mistral). Other
  architectures (mistral, mixtral, qwen2) and other families' special tokens (SmolLM2,
  Qwen2.5, Llama-3) under a real model's repo id stand in for it in recipe tests.
- `ultrachat_folder` / `ultrafeedback_folder`: datasets in the hub repo layout
  (`data/<split>-00000-of-00001.parquet`) with the columns and split names of
  HuggingFaceH4/ultrachat_200k and HuggingFaceH4/ultrafeedback_binarized. (A dataset in
  the hub *cache* does not load offline through `load_dataset("org/name")`; a folder in
  the repo layout loads with the same split inference, and is what
  `huggingface-cli download --repo-type dataset ... --local-dir` leaves.)
- `arc_easy_cache`: lm-eval's registry task `arc_easy` made answerable offline: rows in
  the schema of allenai/ai2_arc (ARC-Easy) written into a `datasets` cache laid out as a
  hub download leaves it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"

TOPICS = ["the moon", "rivers", "bread", "a violin", "chess", "glaciers", "bees", "a lighthouse", "paper",
          "volcanoes", "trains", "tea", "owls", "maps", "clocks", "sand"]
FACTS = ["is older than most people think", "changes with the seasons", "needs patience", "is studied by experts",
         "has a long history", "appears in many stories", "can be measured", "depends on the weather"]


def sentences(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(TOPICS).capitalize()} {rng.choice(FACTS)}." for _ in range(n)]


# The special tokens of real tokenizer families (none has a pad token or a chat template here).
# bos is prepended to every text when `add_bos`; `extra` are further special tokens of the vocabulary.
TOKENIZER_STYLES = {
    "llama2": dict(bos="<s>", eos="</s>", unk="<unk>", extra=(), add_bos=True),   # Llama-2, Mistral, Mixtral
    "smollm2": dict(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>",
                    extra=("<|im_start|>", "<|im_end|>"), add_bos=False),
    "qwen2": dict(bos=None, eos="<|endoftext|>", unk=None, extra=("<|im_start|>", "<|im_end|>"), add_bos=False),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", unk=None,
                   extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), add_bos=True),
}


def bpe_tokenizer(style: str = "llama2"):
    """Byte-level BPE trained on generated English with the special tokens of a real tokenizer
    family (TOKENIZER_STYLES; default Llama-2/Mistral), no pad, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZER_STYLES[style]
    specials = list(dict.fromkeys(t for t in (spec["unk"], spec["bos"], spec["eos"], *spec["extra"]) if t))
    core = Tokenizer(models.BPE(unk_token=spec["unk"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = sentences(0, 2000) + [f"Question: what about {t}? Answer: {t} {f}." for t in TOPICS for f in FACTS]
    core.train_from_iterator(corpus, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))])
    named = {f"{role}_token": spec[role] for role in ("bos", "eos", "unk") if spec[role]}
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=1024,
                                   additional_special_tokens=list(spec["extra"]), **named)


# model_type -> (config class, settings beyond the shared tiny ones): the architectures of the real models
# the shipped recipes name (SmolLM2 and Llama-3.1 are llama, Zephyr-7B mistral, Zephyr-141B mixtral).
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 1024}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen2": ("Qwen2Config", {}),
}


def hub_model(hub_cache: Path, repo_id: str = "tinyorg/tiny-base", commit: str = COMMIT, model_type: str = "llama",
              tokenizer_style: str = "llama2", tied: bool = False) -> Path:
    """A tiny model of `model_type` (ARCHITECTURES; hidden 32, 2 layers) and its BPE tokenizer
    (TOKENIZER_STYLES) in the hub cache layout under `repo_id`; the snapshot folder. The default is
    an untied Llama with Llama-2/Mistral special tokens."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer(tokenizer_style)
    config_class, extra = ARCHITECTURES[model_type]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, tie_word_embeddings=tied, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    folder = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def _conversation(rng: random.Random, turns: int = 1) -> list[dict]:
    messages = []
    for _ in range(turns):
        topic = rng.choice(TOPICS)
        messages += [{"content": f"Tell me about {topic}.", "role": "user"},
                     {"content": f"{topic.capitalize()} {rng.choice(FACTS)}.", "role": "assistant"}]
    return messages


def _write_splits(folder: Path, splits: dict[str, list[dict]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nlicense: mit\n---\nA stand-in written by posttrain's tests.\n")
    return folder


def ultrachat_rows(seed: int, n: int) -> list[dict]:
    """HuggingFaceH4/ultrachat_200k's columns: prompt, prompt_id, messages."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        messages = _conversation(rng, turns=1 + i % 2)
        rows.append({"prompt": messages[0]["content"], "prompt_id": f"{seed:02d}{i:06d}", "messages": messages})
    return rows


def ultrachat_folder(root: Path, n: int = 32) -> Path:
    return _write_splits(Path(root) / "ultrachat_200k", {
        "train_sft": ultrachat_rows(1, n), "test_sft": ultrachat_rows(2, 8),
        "train_gen": ultrachat_rows(3, 4), "test_gen": ultrachat_rows(4, 4)})


def ultrafeedback_rows(seed: int, n: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's columns: prompt, prompt_id, chosen and
    rejected (whole conversations: the user turn, then the reply), messages (= chosen),
    score_chosen, score_rejected."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"Tell me about {topic}."
        good = f"{topic.capitalize()} {rng.choice(FACTS)}."
        bad = f"{rng.choice(TOPICS).capitalize()} is {rng.choice(['blue', 'loud', 'unknown'])}, I think"
        chosen = [{"content": prompt, "role": "user"}, {"content": good, "role": "assistant"}]
        rejected = [{"content": prompt, "role": "user"}, {"content": bad, "role": "assistant"}]
        rows.append({"prompt": prompt, "prompt_id": f"{seed:02d}{i:06d}", "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": float(rng.randint(7, 10)),
                     "score_rejected": float(rng.randint(1, 6))})
    return rows


def ultrafeedback_folder(root: Path, n: int = 32) -> Path:
    return _write_splits(Path(root) / "ultrafeedback_binarized", {
        "train_prefs": ultrafeedback_rows(5, n), "test_prefs": ultrafeedback_rows(6, 8),
        "train_sft": ultrafeedback_rows(7, 4), "test_sft": ultrafeedback_rows(8, 4),
        "train_gen": ultrafeedback_rows(9, 4), "test_gen": ultrafeedback_rows(10, 4)})


def arc_rows(n: int) -> list[dict]:
    """allenai/ai2_arc's columns: id, question, choices {text, label}, answerKey."""
    rng, rows = random.Random(11), []
    for i in range(n):
        topic = rng.choice(TOPICS)
        options = [f"{topic} {fact}" for fact in rng.sample(FACTS, 4)]
        rows.append({"id": f"Mercury_{i:05d}", "question": f"Which is true of {topic}?",
                     "choices": {"text": options, "label": ["A", "B", "C", "D"]},
                     "answerKey": "ABCD"[rng.randrange(4)]})
    return rows


def arc_easy_cache(datasets_cache: Path, n: int = 8) -> Path:
    """allenai/ai2_arc (config ARC-Easy, splits train/validation/test) in a `datasets`
    cache, laid out as a hub download leaves it: lm-eval's `arc_easy` loads it offline."""
    from datasets.packaged_modules.json.json import Json

    build, rows_dir = Path(datasets_cache).parent / "arc-build", Path(datasets_cache).parent / "arc-rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(rows_dir / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in arc_rows(n)))
    Json(cache_dir=str(build), dataset_name="ai2_arc", config_name="ARC-Easy", data_files=files).download_and_prepare()
    built = next((build / "ai2_arc").glob("ARC-Easy-*/0.0.0"))
    target = Path(datasets_cache) / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / built.parent.name.split("-")[-1]
    target.parent.mkdir(parents=True)
    built.rename(target)
    return target
