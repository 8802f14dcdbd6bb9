"""GPU throughput: posttrain vs plain TRL (identical settings) vs TRL's defaults.

Two models built from their published configs with random weights -- SmolLM2-135M
(LlamaConfig) and Qwen2.5-0.5B (Qwen2Config) -- and a generated word-level tokenizer of
their vocabulary size (ChatML specials, posttrain's ChatML template). Generated data of
realistic lengths: SFT conversations of 300-1,500 tokens; preference pairs with a
100-400-token prompt and 100-600-token replies. Each of SFT, DPO (reference log-probs
precomputed) and ORPO trains the same number of optimizer steps three ways:

* posttrain: `posttrain.stages.run_stage` (the stage runner `posttrain run` uses);
* plain:   a plain TRL script: `from_pretrained`, `Dataset.from_list`, the method's TRL
           config given posttrain's resolved settings explicitly, the trainer, `train()`;
           every trainer setting is compared with posttrain's before timing (differences
           are printed and recorded, never hidden);
* default: TRL with its default settings: only batch size, steps, learning rate,
           max_length and beta are given; the model is passed by path (TRL loads it).

Every variant is measured the same way (posttrain.telemetry): real (non-padding) and
padded tokens of the trained forwards, over the trainer's train_runtime (no model load,
tokenising or reference precompute); MFU = model FLOPs / train_runtime / device peak
(6N + 12·L·A·t per trained token, 2N + 4·L·A·t per forward-only token; the formula is in
posttrain/telemetry.py); peak memory (CUDA max allocated and reserved; on CPU peak RSS).

    python benchmarks/gpu_throughput.py --out /tmp/gpu_throughput            # one GPU, < 8 min
    python benchmarks/gpu_throughput.py --tiny --out /tmp/gpu_throughput     # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                     ("TQDM_DISABLE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import posttrain.stages.common as common  # noqa: E402
from posttrain.models import CHATML_SPECIALS, CHATML_TEMPLATE, ModelSource  # noqa: E402
from posttrain.stages import METHODS, run_stage  # noqa: E402
from posttrain.stages.common import CostMeter, StageContext, count_tokens  # noqa: E402
from posttrain.telemetry import model_shape, peak_flops, throughput  # noqa: E402

SEED = 0
# Published sizes (config.json of HuggingFaceTB/SmolLM2-135M and Qwen/Qwen2.5-0.5B).
MODELS = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}
TINY_MODELS = {"tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                            tie_word_embeddings=True))}
# (min, max) tokens: SFT user/assistant turns, preference prompt/reply.
LENGTHS = {"full": {"user": (50, 300), "assistant": (250, 1200), "prompt": (100, 400), "reply": (100, 600)},
           "tiny": {"user": (5, 20), "assistant": (10, 40), "prompt": (5, 20), "reply": (5, 25)}}
WORDS = ("system", "user", "assistant")   # the template's role names: whole tokens


# ---------------------------------------------------------------- model, tokenizer, data


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens: ChatML specials, the role
    names, then w0, w1, ...; posttrain's ChatML template (with generation markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = CHATML_SPECIALS + list(WORDS)
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                        model_max_length=4096)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(name: str, kind: str, settings: dict, root: Path, dtype) -> Path:
    """The model with random weights (seeded) and its tokenizer, saved under root/name."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = root / "models" / name
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(SEED)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    tokenizer = build_tokenizer(settings["vocab_size"])
    config = config_class(**settings, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    # Random init of 0.5B parameters takes a while on CPU; on the GPU it is instant.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config).to(dtype)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def text(rng: random.Random, vocab_size: int, span: tuple[int, int]) -> str:
    first = len(CHATML_SPECIALS) + len(WORDS)
    return " ".join(f"w{rng.randrange(vocab_size - first)}" for _ in range(rng.randint(*span)))


def generated_rows(method: str, n: int, vocab_size: int, lengths: dict) -> list[dict]:
    """n rows in posttrain's canonical form (messages; or prompt/chosen/rejected), seeded."""
    rng = random.Random(f"{method}-{n}-{vocab_size}")
    if method == "sft":
        return [{"messages": [{"role": "user", "content": text(rng, vocab_size, lengths["user"])},
                              {"role": "assistant", "content": text(rng, vocab_size, lengths["assistant"])}]}
                for _ in range(n)]
    return [{"prompt": [{"role": "user", "content": text(rng, vocab_size, lengths["prompt"])}],
             "chosen": [{"role": "assistant", "content": text(rng, vocab_size, lengths["reply"])}],
             "rejected": [{"role": "assistant", "content": text(rng, vocab_size, lengths["reply"])}]} for _ in range(n)]


# ---------------------------------------------------------------- the three ways


def stage_spec(method: str, args) -> object:
    """posttrain's settings; the plain script gets the trainer settings they resolve to."""
    extra = {"precompute_ref_log_probs": True} if method == "dpo" else {}
    return METHODS[method].settings(method=method, data="generated", learning_rate=args.learning_rate,
                                    max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                                    logging_steps=max(1, args.steps // 4), **extra)


def run_posttrain(method: str, model_dir: Path, rows: list[dict], args, work: Path, captured: list) -> dict:
    out = work / f"posttrain-{method}"
    out.mkdir(parents=True)
    ctx = StageContext(name=method, spec=stage_spec(method, args), seed=SEED,
                       start=ModelSource(name=str(model_dir), dtype="auto"), examples=rows, out_dir=out)
    result = run_stage(ctx)
    cost = result.cost
    return {key: cost.get(key) for key in ("optimizer_steps", "tokens_real", "tokens_padded", "train_runtime_s",
                                            "tokens_per_s_real", "tokens_per_s_padded", "model_flops", "mfu",
                                            "peak_memory_mb", "peak_memory_reserved_mb", "device_name")}


def trainer_classes(method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        if method == "sft":
            from trl import SFTConfig, SFTTrainer

            return SFTConfig, SFTTrainer
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            return DPOConfig, DPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer


def same_settings(config_class, posttrain_args, output_dir: str) -> dict:
    """posttrain's resolved TRL settings, written out as a script would pass them."""
    init = {f.name for f in dataclasses.fields(config_class) if f.init}
    settings = {f.name: getattr(posttrain_args, f.name) for f in dataclasses.fields(posttrain_args)
                if f.init and f.name in init and not f.name.startswith("_")}
    settings["output_dir"] = output_dir
    if "logging_dir" in settings:
        settings["logging_dir"] = None     # derived from output_dir
    for key in ("lr_scheduler_type", "optim", "save_strategy", "eval_strategy", "logging_strategy",
                "hub_strategy", "report_to"):
        value = settings.get(key)
        if hasattr(value, "value"):
            settings[key] = value.value
    return settings


def default_settings(method: str, args, output_dir: str) -> dict:
    """TRL's defaults but for the experiment's own numbers (and no Hub, no W&B)."""
    settings = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.learning_rate, max_length=args.max_length, report_to="none",
                    logging_steps=max(1, args.steps // 4), disable_tqdm=True)
    if method != "sft":
        settings["beta"] = 0.1
    import torch

    if not torch.cuda.is_available():
        settings["use_cpu"] = True   # TRL's default bf16 refuses to start on CPU without it (--tiny)
    return settings


def run_trl(method: str, variant: str, model_dir: Path, rows: list[dict], args, work: Path, captured: list) -> dict:
    """The plain script (variant "plain") or TRL's defaults ("default"), metered alike."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    config_class, trainer_class = trainer_classes(method)
    output_dir = str(work / f"{variant}-{method}")
    with CostMeter() as meter:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if variant == "plain":
            config = config_class(**same_settings(config_class, captured[-1].args, output_dir))
            dtype = torch.bfloat16 if config.bf16 else torch.float32
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        else:
            config = config_class(**default_settings(method, args, output_dir))
            model = str(model_dir)
        trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        differences = settings_differences(captured[-1], trainer) if variant == "plain" else []
        tokens = count_tokens(trainer)
        trainer.train()
    tokens.remove()
    done = common.Trained(trainer, tokenizer, meter, {}, tokens)
    dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
    if config.bf16 and dtype == "float32":
        dtype = "bfloat16"    # mixed precision: the matmuls run in bf16
    measured = telemetry_of(done, dtype)
    return {"optimizer_steps": trainer.state.global_step, **measured, "peak_memory_mb": round(meter.peak_memory_mb, 1),
            "setting_differences": differences}


def telemetry_of(done, dtype: str) -> dict:
    import torch

    runtime = next((e["train_runtime"] for e in reversed(done.trainer.state.log_history) if "train_runtime" in e), None)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(device_name if device_name != "cpu" else None, dtype)
    out = throughput(done.tokens.counts, model_shape(done.trainer.model), runtime, 1, peak)
    reserved = done.meter.peak_reserved_mb
    return {**out, "device_name": device_name, "peak_memory_reserved_mb": round(reserved, 1) if reserved else None}


def trainer_facts(trainer) -> dict:
    """What must match between two trainers: every setting, collator, reference, dtype, rows."""
    facts = {k: v for k, v in trainer.args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    return {**facts, "collator": type(trainer.data_collator).__name__,
            "ref_model": type(getattr(trainer, "ref_model", None)).__name__,
            "dtype": str(next(trainer.model.parameters()).dtype), "rows": len(trainer.train_dataset)}


def settings_differences(posttrain: argparse.Namespace, plain_trainer) -> list[str]:
    """Every trainer setting that differs between posttrain's and the plain script's."""
    ours, theirs = posttrain.facts, trainer_facts(plain_trainer)
    return [f"{k}: posttrain={ours.get(k)!r} plain={theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)]


# ---------------------------------------------------------------- main


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(rows: list[dict]) -> dict:
    """Ratios the issue's targets name: posttrain/plain, posttrain/default, DPO/SFT tokens/s."""
    speed = {(r["model"], r["method"], r["variant"]): r.get("tokens_per_s_real") for r in rows}
    out = {}
    for model, method, variant in speed:
        if variant != "posttrain" or not speed[(model, method, variant)]:
            continue
        ours = speed[(model, method, "posttrain")]
        for other in ("plain", "default"):
            if speed.get((model, method, other)):
                out[f"{model}/{method}: posttrain / {other} tokens/s"] = round(ours / speed[(model, method, other)], 3)
        if method == "dpo" and speed.get((model, "sft", "posttrain")):
            out[f"{model}: dpo / sft tokens/s (posttrain)"] = round(ours / speed[(model, "sft", "posttrain")], 3)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | variant | steps | tokens/s real | tokens/s padded | MFU | peak alloc (MB) | "
             "peak reserved (MB) | train_runtime (s) |", "|" + "---|" * 10]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        reserved = f"{r['peak_memory_reserved_mb']:,.0f}" if r.get("peak_memory_reserved_mb") else "n/a"
        lines.append(f"| {r['model']} | {r['method']} | {r['variant']} | {r['optimizer_steps']} | "
                     f"{r['tokens_per_s_real']:,.0f} | {r['tokens_per_s_padded']:,.0f} | {mfu} | "
                     f"{r['peak_memory_mb']:,.0f} | {reserved} | {r['train_runtime_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="models, trainer folders and results.json")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short rows: a CPU smoke test")
    parser.add_argument("--models", help="comma-separated (default: both, or tiny-llama with --tiny)")
    parser.add_argument("--methods", default="sft,dpo,orpo")
    parser.add_argument("--variants", default="posttrain,plain,default")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --tiny 3)")
    parser.add_argument("--batch-size", type=int, help="per device (default 8; --tiny 2)")
    parser.add_argument("--max-length", type=int, default=2048, help="long enough that nothing is cut")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 30)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    catalogue = TINY_MODELS if args.tiny else MODELS
    names = args.models.split(",") if args.models else list(catalogue)
    variants = args.variants.split(",")
    if "plain" in variants and "posttrain" not in variants:
        parser.error("--variants: plain takes posttrain's resolved settings: run posttrain too")
    import torch
    import transformers
    import trl

    from posttrain.models import resolve_precision

    dtype = getattr(torch, resolve_precision("auto").dtype)
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "trl": trl.__version__, "tiny": args.tiny,
           "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
           "peak_bf16_tflops": (peak_flops(torch.cuda.get_device_name(), "bfloat16") or 0) / 1e12
           if torch.cuda.is_available() else None}
    print(json.dumps(env), flush=True)
    captured: list = []
    real_run_training = common.run_training

    def capture(trainer, ctx):  # posttrain's settings (the plain script's), not its trainer (memory)
        captured.append(argparse.Namespace(args=trainer.args, facts=trainer_facts(trainer)))
        return real_run_training(trainer, ctx)

    common.run_training = capture
    rows, started = [], time.perf_counter()
    for name in names:
        kind, settings = catalogue[name]
        model_dir = build_model(name, kind, settings, args.out, dtype)
        if name == names[0]:   # untimed: the process's first training pays one-off start-up costs (CUDA, kernels)
            warm = argparse.Namespace(**{**vars(args), "steps": 2})
            run_posttrain("sft", model_dir, generated_rows("sft", 2 * args.batch_size, settings["vocab_size"],
                                                           LENGTHS["tiny" if args.tiny else "full"]),
                          warm, args.out / "runs" / "warmup", captured)
            captured.clear()
        for method in args.methods.split(","):
            data = generated_rows(method, args.steps * args.batch_size, settings["vocab_size"],
                                  LENGTHS["tiny" if args.tiny else "full"])
            for variant in variants:
                work = args.out / "runs" / name / variant
                work.mkdir(parents=True, exist_ok=True)
                run = run_posttrain if variant == "posttrain" else lambda *a: run_trl(a[0], variant, *a[1:])
                row = {"model": name, "method": method, "variant": variant,
                       **run(method, model_dir, data, args, work, captured)}
                row["elapsed_s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                free_memory()
                result = {"environment": env, "rows": rows, "summary": summary(rows), "total_s": row["elapsed_s"]}
                (args.out / "results.json").write_text(json.dumps(result, indent=2))  # so far, if cut short
            captured.clear()
    print(markdown(rows))
    print(json.dumps(result["summary"], indent=2))
    print(f"total {result['total_s']} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
