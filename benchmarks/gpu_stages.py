"""GPU path check: SFT -> DPO and ORPO on builtin:tiny-llama in bf16 vs float32.

Runs posttrain's own stage adapters (not the CLI: lm-eval is not installed on the
device image) and reports, per stage and dtype: wall time, train tokens/s, peak
CUDA memory, final loss; then greedy exact match on the held-out skills split with
a plain generate loop, to show that bf16 training learns like float32.

    python benchmarks/gpu_stages.py --out /tmp/gpu_bench   # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.recipe.load import load_recipe  # noqa: E402
from posttrain.data.builtin import eval_rows, instruction_rows, preference_rows  # noqa: E402
from posttrain.models import ModelSource, load_model_and_tokenizer  # noqa: E402
from posttrain.stages import run_stage  # noqa: E402
from posttrain.stages.common import StageContext  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def exact_match(source: ModelSource) -> float:
    import torch

    model, tok = load_model_and_tokenizer(source, device="cuda")
    model.eval()
    tok.padding_side = "left"
    rows, correct = eval_rows(), 0
    for i in range(0, len(rows), 100):
        batch = rows[i:i + 100]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        for row, ids in zip(batch, out):
            reply = tok.decode(ids[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            correct += reply == row["answer"]
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    results = []
    for dtype in ("bfloat16", "float32"):
        base = ModelSource(name="builtin:tiny-llama", dtype=dtype)
        plan = [("sft", base, instruction_rows()), ("dpo", None, preference_rows()),
                ("orpo", base, preference_rows())]
        for name, start, examples in plan:
            out = args.out / dtype / name
            out.mkdir(parents=True, exist_ok=True)
            start = start or ModelSource(name=str(args.out / dtype / "sft" / "model"), dtype=dtype)
            ctx = StageContext(name=name, spec=recipe.stages[name], seed=0, start=start, examples=examples,
                               out_dir=out)
            result = run_stage(ctx)
            em = exact_match(ModelSource(name=str(out / "model"), dtype=dtype))
            row = {"dtype": dtype, "stage": name, **result.cost,
                   "tokens_per_s": round(result.cost["train_tokens"] / result.cost["wall_s"]),
                   "final_loss": result.metrics.get("loss"), "exact_match": em}
            print(json.dumps(row), flush=True)
            results.append(row)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
