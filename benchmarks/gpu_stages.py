"""GPU path check: every method of recipes/methods.yaml on builtin:tiny-llama, bf16 vs float32.

Runs posttrain's own stage adapters (not the CLI: lm-eval is not installed on the
device image) and reports, per stage and dtype: wall time, train tokens/s, peak
CUDA memory, final loss; then greedy exact match on the held-out skills split with
a plain generate loop (either acceptable form counts; `concise` counts the bare
number only), to show that bf16 training learns like float32. Methods that are not
single-step (dpo, ipo, kto, simpo) start from the SFT stage's output, as in the recipe.

    python benchmarks/gpu_stages.py --out /tmp/gpu_bench [--dtypes bfloat16,float32]   # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.data.builtin import eval_rows, instruction_rows, preference_rows  # noqa: E402
from posttrain.data.formats import to_kind  # noqa: E402
from posttrain.recipe.load import load_recipe  # noqa: E402
from posttrain.stages import METHODS  # noqa: E402
from posttrain.models import ModelSource, load_model_and_tokenizer  # noqa: E402
from posttrain.stages import run_stage  # noqa: E402
from posttrain.stages.common import StageContext  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def exact_match(source: ModelSource) -> tuple[float, float]:
    import torch

    model, tok = load_model_and_tokenizer(source, device="cuda")
    model.eval()
    tok.padding_side = "left"
    rows, correct, concise = eval_rows(), 0, 0
    for i in range(0, len(rows), 100):
        batch = rows[i:i + 100]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False)   # "There are 12 words." is 19
        for row, ids in zip(batch, out):
            reply = tok.decode(ids[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            correct += reply in (row["answer"], row["wordy"])
            concise += reply == row["answer"]
    return correct / len(rows), concise / len(rows)


def stage_rows(method: str) -> list[dict]:
    kind = METHODS[method].data
    return instruction_rows() if kind == "instruction" else to_kind(preference_rows(), "preference", kind)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--stages", default="sft,dpo,ipo,kto,orpo,cpo,simpo")
    args = parser.parse_args()
    recipe = load_recipe(REPO / "recipes" / "methods.yaml")
    stages = dict(recipe.stages)
    # cpo is not in the recipe: ORPO's schedule with CPO's default loss.
    stages["cpo"] = METHODS["cpo"].settings(**{**stages["orpo"].model_dump(exclude={"beta"}), "method": "cpo"})
    results = []
    for dtype in args.dtypes.split(","):
        base = ModelSource(name="builtin:tiny-llama", dtype=dtype)
        sft_out = ModelSource(name=str(args.out / dtype / "sft" / "model"), dtype=dtype)
        for name in args.stages.split(","):
            spec = stages[name]
            # As in the recipe: SFT and single-step methods from the base, the others after SFT.
            start = base if spec.method == "sft" or METHODS[spec.method].single_step else sft_out
            out = args.out / dtype / name
            out.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(name=name, spec=spec, seed=0, start=start, examples=stage_rows(spec.method),
                               out_dir=out)
            result = run_stage(ctx)
            correct, concise = exact_match(ModelSource(name=str(out / "model"), dtype=dtype))
            row = {"dtype": dtype, "stage": name, "method": spec.method, **result.cost,
                   "tokens_per_s": round(result.cost["train_tokens"] / result.cost["wall_s"]),
                   "final_loss": result.metrics.get("loss"), "correct": correct, "concise": concise}
            print(json.dumps(row), flush=True)
            results.append(row)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
