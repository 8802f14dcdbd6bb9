"""Benchmark: `posttrain plan`'s estimated train tokens against what the stages record after training.

For each tokenizer and max_length, one recipe trains every method for one whole epoch
(`epochs: 1`, no max_steps) on real-length data: sft on the alpaca sample, dpo, orpo,
cpo and kto on the HH-RLHF harmless sample (KTO reads the pairs unpaired). Two models:
the builtin micro-llama (`char`: one token per character) and the same micro Llama with
a byte-level BPE tokenizer trained here on the samples (`bpe`: Llama-style <s>/</s>, no
ChatML tokens). `posttrain run` writes the plan it estimated (plan.json: rows, rows
dropped and cut, steps, tokens) before it trains, and each stage's record
(stages/*/stage.json: rows trained and cut, steps, train tokens) after; the table
compares them. max_length 128 and 256 make truncation and drops bite (HH transcripts
run to thousands of characters).

Reproduce from the repository root of a clone with ../shared/data beside it:

    .venv/bin/python benchmarks/estimate_accuracy.py            # --max-lengths 128 256 --tokenizers char bpe
    .venv/bin/python benchmarks/estimate_accuracy.py --data DIR  # the samples elsewhere

Prints a Markdown table (benchmarks/estimates.md records one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SFT_DATA = "alpaca_en_sample.json"
PAIR_DATA = "hh_rlhf_harmless_sample.jsonl"
METHODS = {"sft": "alpaca", "dpo": "hh", "orpo": "hh", "cpo": "hh", "kto": "hh"}


def bpe_model(data_dir: Path, folder: Path) -> Path:
    """A micro Llama (random weights) with a byte-level BPE tokenizer trained on the two
    samples (4,096 tokens; <s>/</s> like Llama's, no ChatML tokens: posttrain adds them),
    saved where `model.name` can point: BPE merges across the prompt/reply boundary and a
    BOS that the character tokenizer never exercises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.dumps(row) for row in json.loads((data_dir / SFT_DATA).read_text())]
    texts += (data_dir / PAIR_DATA).read_text().splitlines()
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe(data_dir: Path, max_length: int, model: str) -> dict:
    stage = {"learning_rate": 1e-3, "epochs": 1, "batch_size": 8, "max_length": max_length, "logging_steps": 50}
    return {"name": f"estimates-{max_length}", "model": {"name": model},
            "data": {"alpaca": {"source": str(data_dir / SFT_DATA)},
                     # one HH row has an empty reply: skipped as `posttrain run` says
                     "hh": {"source": str(data_dir / PAIR_DATA), "on_bad_rows": "skip"}},
            "stages": {method: {"method": method, "data": data, **stage} for method, data in METHODS.items()},
            "pipelines": {method: [method] for method in METHODS},
            "eval": {"tasks": [str(REPO / "evals" / "skills_mc.yaml")], "limit": 2},
            "tracking": {"wandb": {"mode": "disabled"}}}


def run(data_dir: Path, max_length: int, model: str, scratch: Path) -> list[dict]:
    """Train the recipe at `max_length`; one row per stage: the plan's estimate and the record."""
    path = scratch / "estimates.yaml"
    path.write_text(yaml.safe_dump(recipe(data_dir, max_length, model)))
    out = scratch / f"run-{len(list(scratch.glob('run-*')))}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "posttrain", "run", str(path), "--out", str(out), "--cache",
                    str(scratch / "cache"), "--quiet"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    planned = {row["stage"]: row for row in json.loads((out / "plan.json").read_text())["stages"]}
    rows = []
    for record_path in sorted((out / "stages").glob("*/stage.json")):
        record = json.loads(record_path.read_text())
        estimate, cost = planned[record["stage"]], record["cost"]
        rows.append({"method": record["stage"], "data": METHODS[record["stage"]], "max_length": max_length,
                     "rows": estimate["examples"],
                     "kept": (estimate["examples"] - estimate["dropped"], cost["rows_trained"]),
                     "cut": (estimate["truncated"], cost["rows_truncated"]),
                     "steps": (estimate["steps"], cost["optimizer_steps"]),
                     "tokens": (estimate["tokens"], cost["train_tokens"])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tokenizer | method | data | max_length | rows | kept (est / actual) | cut (est / actual) "
             "| steps (est / actual) | train tokens estimated | train tokens recorded | error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        estimated, actual = row["tokens"]
        error = 100 * (estimated - actual) / actual
        pair = " / ".join
        lines.append(f"| {row['tokenizer']} | {row['method']} | {row['data']} | {row['max_length']} | {row['rows']} | "
                     f"{pair(map(str, row['kept']))} | {pair(map(str, row['cut']))} | {pair(map(str, row['steps']))} "
                     f"| {estimated:,} | {actual:,} | {error:+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the folder holding the alpaca and HH samples (default: ../shared/data)")
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--tokenizers", nargs="+", choices=("char", "bpe"), default=["char", "bpe"])
    args = parser.parse_args()
    missing = [name for name in (SFT_DATA, PAIR_DATA) if not (args.data / name).is_file()]
    if missing:
        sys.exit(f"{args.data}: missing {', '.join(missing)} (give the samples' folder with --data)")
    data = args.data.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        models = {"char": "builtin:micro-llama"}
        if "bpe" in args.tokenizers:
            models["bpe"] = str(bpe_model(data, scratch / "bpe-micro-llama"))
        for tokenizer in args.tokenizers:
            for max_length in args.max_lengths:
                start = time.perf_counter()
                rows += [{"tokenizer": tokenizer, **row} for row in run(data, max_length, models[tokenizer], scratch)]
                print(f"{tokenizer}, max_length {max_length}: planned, trained and evaluated in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
