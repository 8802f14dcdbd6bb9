"""Per-stage overhead of posttrain vs plain TRL: SFT, DPO and ORPO, side by side.

The same training (builtin:tiny-llama, the builtin skills data, the quickstart's
stage settings, a fixed number of optimizer steps) runs in one process two ways:

* plain TRL: a minimal hand-written script -- load the model, `Dataset.from_list`,
  a TRL config with every setting written out by hand, build the trainer, train;
* posttrain: `posttrain.stages.run_stage(StageContext(...))` as `posttrain run`
  sets it up, with an empty cache: the rows written as an on-disk Arrow dataset
  (timed), the reference log-prob cache, the checkpoint callback, the cost meter.

Both are timed over the same span -- model load, trainer build (tokenization; for
DPO the reference log-prob precompute), training -- which is what posttrain's
`CostMeter` covers; posttrain's saving of the model afterwards is not in either.
Train tokens are counted the way posttrain's `finish()` counts them
(`dataset_tokens` of the tokenized train set, each sequence the stage modules name
cut at the trainer's max_length, times epochs done), so tokens/s is comparable. Runs are
interleaved (plain, posttrain; then posttrain, plain; ...) and each side's median
over `--repeats` is reported with the ratio posttrain/plain (target: >= 0.97),
beside the ratio of the best runs and the range of the paired (same repeat)
ratios. The CPU is shared on a dev machine: the 1-minute load average is recorded
with every run, and a warning is printed when it exceeded the core count (a busy
core slows torch's threads many-fold; such a run says nothing about overhead).

Before timing, each method is warmed up once per path (imports, first-call costs)
and the two paths' effective settings are compared: `trainer.args.to_dict()` of
the trainer posttrain builds vs the plain script's, plus trainer class, collator,
tokenized columns and rows. Any difference stops the run (`--allow-settings-diff`
reports and goes on). After timing, every run of a method must have the same
optimizer steps and train tokens on both paths (asserted); train losses are shown
too (identical on CPU when both trained exactly alike).

Rows per run = batch size x steps (exactly one epoch). On a CUDA machine the model
trains on the GPU in float32 (bf16 off on both paths, to keep them equal).

    python benchmarks/trl_overhead.py                 # ~15-30 s per run on 2 CPU cores
    python benchmarks/trl_overhead.py --quick         # smoke test, ~2-3 s per run
    python benchmarks/trl_overhead.py --repeats 5 --json /tmp/trl_overhead.json
    python benchmarks/trl_overhead.py --threads 1     # torch threads (default: torch's choice)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                     ("TQDM_DISABLE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.stages.dpo import DPOStage  # noqa: E402
from posttrain.stages.orpo import ORPOStage  # noqa: E402
from posttrain.stages.sft import SFTStage  # noqa: E402
from posttrain.data.builtin import instruction_rows, preference_rows  # noqa: E402
from posttrain.models import ModelSource, load_model_and_tokenizer  # noqa: E402
from posttrain.stages import STAGE_MODULES, run_stage  # noqa: E402
from posttrain.stages.common import StageContext, dataset_tokens  # noqa: E402

MODEL = "builtin:tiny-llama"
SEED = 0
METHODS = ("sft", "dpo", "orpo")
TARGET_RATIO = 0.97

# The quickstart's stage settings (recipes/quickstart.yaml) plus StageBase defaults,
# shared by both paths: the posttrain spec is built from them, and so is the plain
# script's TRL config, by hand.
COMMON = dict(batch_size=16, gradient_accumulation=1, max_length=128, weight_decay=0.0, max_grad_norm=1.0,
              logging_steps=10, epochs=1.0)
SETTINGS = {
    "sft": dict(COMMON, learning_rate=1e-3, scheduler="cosine", warmup_ratio=0.05),
    "dpo": dict(COMMON, learning_rate=1e-4, scheduler="linear", warmup_ratio=0.0, beta=0.1, loss_type="sigmoid",
                precompute_ref_log_probs=True),
    "orpo": dict(COMMON, learning_rate=1e-3, scheduler="cosine", warmup_ratio=0.05, beta=0.1),
}
SPEC_CLASSES = {"sft": SFTStage, "dpo": DPOStage, "orpo": ORPOStage}
# Optimizer steps per run: ~15-30 s each on the 2-core CPU (full), ~2-3 s (--quick).
STEPS = {"full": {"sft": 200, "dpo": 100, "orpo": 120}, "quick": {"sft": 20, "dpo": 10, "orpo": 12}}
WARMUP_STEPS = 2
# What the model processes: the sequences posttrain's stage modules pass to finish(), by
# the tokenized columns each concatenates (a DPO prompt is fed twice, with chosen and rejected).
SEQUENCES = {"sft": (("input_ids",),), "dpo": (("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids")),
             "orpo": (("chosen_input_ids",), ("rejected_input_ids",))}
# Paths under each run's own temp dir: never equal between two trainers.
PATH_KEYS = {"output_dir", "logging_dir"}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def rows_for(method: str, n: int) -> list[dict]:
    return instruction_rows("train", n) if method == "sft" else preference_rows("train", n)


# ---------------------------------------------------------------- plain TRL


def checkpointing_field() -> str:
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def plain_config(method: str, steps: int, output_dir: str):
    """The TRL config a careful hand-written script would build, every setting explicit."""
    s = SETTINGS[method]
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation"],
        learning_rate=s["learning_rate"],
        num_train_epochs=s["epochs"],
        max_steps=steps,
        lr_scheduler_type=s["scheduler"],
        warmup_steps=s["warmup_ratio"],   # a float < 1 is a ratio of total steps
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        optim="adamw_torch",              # TRL's default is adamw_torch_fused; posttrain pins adamw_torch
        seed=SEED,
        data_seed=SEED,
        bf16=False,                       # TRL defaults to bf16=True and checkpointing on: slow on CPU
        fp16=False,
        torch_compile=False,
        use_cpu=not on_gpu(),
        dataloader_num_workers=0,
        logging_steps=s["logging_steps"],
        logging_first_step=True,
        save_strategy="no",
        save_total_limit=2,               # inert without saving; mirrors posttrain's explicit settings
        save_only_model=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        **{checkpointing_field(): False},
    )
    if method == "sft":
        from trl import SFTConfig

        return SFTConfig(**common, max_length=s["max_length"], truncation_mode="keep_start", packing=False,
                         padding_free=False, assistant_only_loss=True, completion_only_loss=False,
                         dataset_num_proc=None, shuffle_dataset=True, activation_offloading=False)
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=s["beta"], loss_type=[s["loss_type"]], max_length=s["max_length"],
                         truncation_mode="keep_start", precompute_ref_log_probs=s["precompute_ref_log_probs"],
                         precompute_ref_batch_size=s["batch_size"], disable_dropout=True, padding_free=False,
                         sync_ref_model=False, label_smoothing=0.0, use_weighting=False,
                         activation_offloading=False, dataset_num_proc=None)
    ORPOConfig, _ = orpo_classes()
    return ORPOConfig(**common, beta=s["beta"], max_length=s["max_length"], max_completion_length=s["max_length"],
                      disable_dropout=True, dataset_num_proc=None)


def orpo_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def plain_trainer(method: str, rows: list[dict], steps: int, output_dir: str):
    """Load, dataset, config, trainer: what a minimal TRL script does before train()."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    model, tokenizer = load_model_and_tokenizer(ModelSource(name=MODEL))
    dataset = Dataset.from_list(rows)
    args = plain_config(method, steps, output_dir)
    if method == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    elif method == "dpo":
        from trl import DPOTrainer

        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        _, ORPOTrainer = orpo_classes()
        trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # With disable_tqdm transformers prints every log dict; posttrain removes that printer too.
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_plain(method: str, rows: list[dict], steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="trl_overhead_plain_") as tmp:
        start = time.perf_counter()
        trainer = plain_trainer(method, rows, steps, str(Path(tmp) / "trainer"))
        trainer.train()
        wall_s = time.perf_counter() - start
        epochs = trainer.state.epoch or 0.0
        tokens = round(dataset_tokens(trainer.train_dataset, SEQUENCES[method], trainer.args.max_length).tokens
                       * epochs)
        log = trainer.state.log_history
        summary = next((e for e in reversed(log) if "train_loss" in e), {})
        out = {"steps": trainer.state.global_step, "train_tokens": tokens, "wall_s": wall_s,
               "train_loss": summary.get("train_loss")}
        del trainer
    return out


# ---------------------------------------------------------------- posttrain


def stage_context(method: str, rows: list[dict], steps: int, out_dir: Path, cache: Path | None = None) -> StageContext:
    """posttrain's context for one stage; with `cache`, the engine's hooks as `posttrain run` sets
    them (rows as an on-disk dataset, reference log-prob cache, checkpoint policy), all empty."""
    from posttrain.cache import save_dataset
    from posttrain.stages.common import CheckpointPolicy

    spec = SPEC_CLASSES[method](method=method, data="benchmark", max_steps=steps, **SETTINGS[method])
    engine = {}
    if cache is not None:
        engine = dict(dataset_dir=save_dataset(rows, cache / "datasets" / "rows"), start_key="base",
                      reflogps_dir=cache / "reflogps", checkpoint=CheckpointPolicy(every_minutes=10.0),
                      stop_requested=lambda: False)
    return StageContext(name=method, spec=spec, seed=SEED, start=ModelSource(name=MODEL), examples=rows,
                        out_dir=out_dir, lora=None, show_progress=False, report_to=[], **engine)


def run_posttrain(method: str, rows: list[dict], steps: int) -> dict:
    """The stage as `posttrain run` trains it, with an empty cache: writing the rows to
    the on-disk dataset is timed too (it happens once per dataset in a real run)."""
    with tempfile.TemporaryDirectory(prefix="trl_overhead_posttrain_") as tmp:
        start = time.perf_counter()
        ctx = stage_context(method, rows, steps, Path(tmp) / "stage", cache=Path(tmp) / "cache")
        setup_s = time.perf_counter() - start
        ctx.out_dir.mkdir()
        result = run_stage(ctx)
    cost = result.cost
    return {"steps": cost["optimizer_steps"], "train_tokens": cost["train_tokens"],
            "wall_s": cost["wall_s"] + setup_s, "train_loss": result.metrics.get("train_loss_mean")}


# ---------------------------------------------------------------- settings check


def trainer_facts(trainer) -> dict:
    args = {k: v for k, v in trainer.args.to_dict().items() if k not in PATH_KEYS}
    return {**{f"args.{k}": v for k, v in args.items()},
            "trainer": type(trainer).__name__,
            "data_collator": type(trainer.data_collator).__name__,
            "train_columns": sorted(trainer.train_dataset.column_names),
            "train_rows": len(trainer.train_dataset),
            "ref_model": type(getattr(trainer, "ref_model", None)).__name__,
            "model_dtype": str(next(trainer.model.parameters()).dtype),
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


def settings_differences(method: str, rows: list[dict], steps: int) -> list[str]:
    """Build both trainers (no training) and list every setting that differs."""
    import importlib

    module = importlib.import_module(STAGE_MODULES[method])
    with tempfile.TemporaryDirectory(prefix="trl_overhead_check_") as tmp:
        posttrain_trainer, _ = module.build_trainer(stage_context(method, rows, steps, Path(tmp) / "posttrain"))
        ours = trainer_facts(posttrain_trainer)
        callbacks_posttrain = [type(c).__name__ for c in posttrain_trainer.callback_handler.callbacks]
        del posttrain_trainer
        plain = plain_trainer(method, rows, steps, str(Path(tmp) / "plain" / "trainer"))
        theirs = trainer_facts(plain)
        callbacks_plain = [type(c).__name__ for c in plain.callback_handler.callbacks]
        del plain
    diffs = [f"{key}: posttrain={ours.get(key)!r} plain={theirs.get(key)!r}"
             for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if callbacks_posttrain != callbacks_plain:  # extra callbacks are posttrain overhead, measured: not a setting
        print(f"  note [{method}]: callbacks at build time differ: posttrain={callbacks_posttrain} "
              f"plain={callbacks_plain}", flush=True)
    return diffs


# ---------------------------------------------------------------- main


def load_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def collect():
    gc.collect()
    if on_gpu():
        import torch

        torch.cuda.empty_cache()


def environment() -> dict:
    import torch
    import transformers
    import trl

    cpu = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    dev = torch.cuda.get_device_name(0) if on_gpu() else cpu
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "load_1m_start": load_1m()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps per run: a smoke test, ~2-3 s per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and method (default 3)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", type=Path, help="also write every run and the summary here")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--allow-settings-diff", action="store_true",
                        help="report setting differences between the two paths and time them anyway")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python benchmarks/trl_overhead.py" + "".join(f" {a}" for a in sys.argv[1:])
    env = environment()
    print(f"command: {command}", flush=True)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # posttrain's stages do this; do it up front for both paths
    mode = "quick" if args.quick else "full"
    steps = {m: STEPS[mode][m] for m in args.methods}
    rows = {m: rows_for(m, SETTINGS[m]["batch_size"] * steps[m]) for m in args.methods}

    # Warm-up (imports, first-call costs) and settings check, untimed.
    for method in args.methods:
        warm_rows = rows[method][:SETTINGS[method]["batch_size"] * WARMUP_STEPS]
        diffs = settings_differences(method, warm_rows, WARMUP_STEPS)
        if diffs:
            print(f"settings differ for {method}:\n  " + "\n  ".join(diffs), flush=True)
            if not args.allow_settings_diff:
                sys.exit(f"{method}: plain TRL and posttrain would not train alike; fix plain_config() "
                         "(or pass --allow-settings-diff)")
        else:
            print(f"settings check [{method}]: plain TRL config == posttrain's (all TrainingArguments, "
                  "trainer, collator, tokenized columns)", flush=True)
        run_plain(method, warm_rows, WARMUP_STEPS)
        run_posttrain(method, warm_rows, WARMUP_STEPS)
        collect()

    runners = {"plain": run_plain, "posttrain": run_posttrain}
    runs: list[dict] = []
    for repeat in range(args.repeats):
        order = ("plain", "posttrain") if repeat % 2 == 0 else ("posttrain", "plain")
        for method in args.methods:
            for path in order:
                run = runners[path](method, rows[method], steps[method])
                run.update(method=method, path=path, repeat=repeat,
                           tokens_per_s=run["train_tokens"] / run["wall_s"], load_1m=load_1m())
                runs.append(run)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()}),
                      flush=True)
                collect()

    summary = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        # The comparison is meaningless unless both paths did the same training.
        assert len({r["steps"] for r in mine}) == 1, f"{method}: optimizer steps differ: {mine}"
        assert len({r["train_tokens"] for r in mine}) == 1, f"{method}: train tokens differ: {mine}"
        assert mine[0]["steps"] == steps[method], f"{method}: {mine[0]['steps']} steps, expected {steps[method]}"
        tps = {p: [r["tokens_per_s"] for r in mine if r["path"] == p] for p in runners}
        wall = {p: [r["wall_s"] for r in mine if r["path"] == p] for p in runners}
        losses = {p: sorted({round(r["train_loss"], 6) for r in mine if r["path"] == p}) for p in runners}
        paired = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(
            [r for r in mine if r["path"] == "plain"], [r for r in mine if r["path"] == "posttrain"])]
        median = {p: statistics.median(v) for p, v in tps.items()}
        summary.append({"method": method, "steps": mine[0]["steps"], "train_tokens": mine[0]["train_tokens"],
                        "rows": len(rows[method]),
                        "plain_wall_s_median": statistics.median(wall["plain"]),
                        "posttrain_wall_s_median": statistics.median(wall["posttrain"]),
                        "plain_tokens_per_s": median["plain"], "posttrain_tokens_per_s": median["posttrain"],
                        "ratio": median["posttrain"] / median["plain"],
                        "best_ratio": max(tps["posttrain"]) / max(tps["plain"]),
                        "paired_ratio_min": min(paired), "paired_ratio_max": max(paired),
                        "train_loss_plain": losses["plain"], "train_loss_posttrain": losses["posttrain"]})

    env["load_1m_end"] = load_1m()
    busy = [r for r in runs if r["load_1m"] is not None and r["load_1m"] > (os.cpu_count() or 1)]
    print()
    if busy:
        print(f"WARNING: {len(busy)} of {len(runs)} runs ended with a 1-minute load average above "
              f"{os.cpu_count()} (max {max(r['load_1m'] for r in busy)}): the CPU was shared; rerun on a quiet "
              "machine before trusting the ratios.")
        print()
    print(f"Command: `{command}`  ")
    print(f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}; "
          f"torch threads {env['torch_threads']}; {MODEL}, float32, batch 16, max_length 128; medians of "
          f"{args.repeats} interleaved runs per path; 1-min load average {env['load_1m_start']} at start, "
          f"{env['load_1m_end']} at end.")
    print()
    print("| method | steps | train tokens | plain wall (s) | posttrain wall (s) | plain tokens/s "
          "| posttrain tokens/s | posttrain/plain | best runs | paired range | train loss plain / posttrain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        same_loss = "identical" if s["train_loss_plain"] == s["train_loss_posttrain"] else "DIFFER"
        print(f"| {s['method']} | {s['steps']} | {s['train_tokens']:,} | {s['plain_wall_s_median']:.2f} "
              f"| {s['posttrain_wall_s_median']:.2f} | {s['plain_tokens_per_s']:,.0f} "
              f"| {s['posttrain_tokens_per_s']:,.0f} | {s['ratio']:.3f}x "
              f"{'(>= 0.97)' if s['ratio'] >= TARGET_RATIO else '(< 0.97)'} | {s['best_ratio']:.3f}x "
              f"| {s['paired_ratio_min']:.3f}-{s['paired_ratio_max']:.3f} "
              f"| {'/'.join(f'{x:.4f}' for x in s['train_loss_plain'])} / "
              f"{'/'.join(f'{x:.4f}' for x in s['train_loss_posttrain'])} ({same_loss}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "environment": env, "mode": mode,
                                         "repeats": args.repeats, "summary": summary, "runs": runs}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
