"""A whole experiment through posttrain's engine vs by hand; re-runs; a one-setting change.

Measures, each as a separate process (imports included, as a user would see it):

1. **posttrain**: `posttrain run RECIPE` with an empty cache: shared prefixes train
   once (SFT once for `sft` and `sft+dpo`), DPO reference log-probs are precomputed
   once per (reference, data) and shared by sweep points.
2. **by hand**: the naive way to get the same table: every pipeline trained on its
   own from the base model (SFT again for every SFT->DPO pipeline), DPO with TRL's
   default of recomputing the reference's log-probs alongside every step (a frozen
   reference copy), every final model evaluated, the base once. It uses posttrain's
   own stage and evaluation code with no cache, so the difference is the engine only.
3. **re-run**: the same `posttrain run` again (same cache): every stage and
   evaluation is reused; only the report is rebuilt.
4. **one change** (`--change`, default `stages.dpo.beta=0.2`; same cache): only
   DPO and its evaluation should run again; the log is parsed to list what ran.

    python benchmarks/experiment_vs_naive.py                        # the quickstart, ~15 min on 2 cores
    python benchmarks/experiment_vs_naive.py -o "sweep.stages.dpo.beta=[0.05,0.1,0.3]" --change none
    python benchmarks/experiment_vs_naive.py --recipe my.yaml --json /tmp/bench.json

W&B is off in every run (it adds the same start-up cost to both sides).
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

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return wall, done.stderr


def posttrain_run(recipe: Path, out: Path, cache: Path, overrides: list[str]) -> tuple[float, str]:
    command = [sys.executable, "-m", "posttrain", "run", str(recipe), "--out", str(out), "--cache", str(cache),
               "--no-wandb", "--no-progress"]
    for override in overrides:
        command += ["-o", override]
    return timed(command, ENV)


def trained_and_evaluated(log: str) -> tuple[list[str], list[str]]:
    trained = [line.split()[1] for line in log.splitlines() if line.startswith("  train  ")]
    evaluated = [line.split("eval", 1)[1].strip() for line in log.splitlines() if line.startswith("  eval  ")]
    return trained, evaluated


# ---------------------------------------------------------------- the naive way (child process)


def naive(recipe_path: Path, out: Path, overrides: list[str]) -> None:
    """Every pipeline on its own, from the base model; no cache, no shared stage."""
    from dataclasses import replace

    sys.path.insert(0, str(REPO))
    from posttrain.artifacts import RunDir
    from posttrain.cache import Cache
    from posttrain.recipe.load import load_recipe
    from posttrain.recipe.schema import resolve_lora
    from posttrain.models import ModelSource
    from posttrain.evaluation import evaluate_source, prepare_eval
    from posttrain.plan import base_source, data_env, data_key, load_stage_data
    from posttrain.training import RunOptions
    from posttrain.stages import run_stage
    from posttrain.stages.common import StageContext

    recipe = load_recipe(recipe_path, overrides)
    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    options = RunOptions(out_dir=out, base_dir=recipe_path.resolve().parent, log=lambda line: None,
                         cache=Cache(out / "unused-cache"))
    setup = prepare_eval(recipe, run, options.base_dir)
    data = load_stage_data(recipe, data_env(recipe, options.base_dir))
    evaluate_source(recipe, "base", None, base_source(recipe), run, options, setup)
    for pipeline, chain in recipe.pipelines.items():
        for seed in recipe.seeds:
            source: ModelSource = base_source(recipe)
            for index, stage_name in enumerate(chain):
                spec = recipe.stages[stage_name]
                if spec.method == "dpo":  # TRL's default: the reference scores every batch
                    spec = spec.model_copy(update={"precompute_ref_log_probs": False})
                stage_dir = out / "naive" / f"{pipeline}-s{seed}-{index}-{stage_name}"
                stage_dir.mkdir(parents=True, exist_ok=True)
                examples = data[data_key(spec)].examples
                result = run_stage(StageContext(name=stage_name, spec=spec,
                                                seed=spec.seed if spec.seed is not None else seed, start=source,
                                                examples=examples, out_dir=stage_dir, lora=resolve_lora(recipe, spec)))
                model_dir = str(stage_dir / "model")
                source = (replace(source, adapter_dirs=source.adapter_dirs + (model_dir,)) if result.adapter
                          else replace(source, name=model_dir, adapter_dirs=(), revision=None))
                print(f"naive: {pipeline} seed {seed}: {stage_name} {result.cost['wall_s']:.1f}s", file=sys.stderr)
            evaluate_source(recipe, pipeline, seed, source, run, options, setup)


# ---------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    parser.add_argument("--change", default="stages.dpo.beta=0.2",
                        help="the one-setting change to time ('none' to skip; a swept key changes nothing)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--naive-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child is not None:
        naive(args.recipe, args.naive_child, args.overrides)
        return

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as scratch:
        root = Path(scratch)
        cache = root / "cache"
        figures: dict = {"recipe": str(args.recipe), "overrides": args.overrides}
        wall, log = posttrain_run(args.recipe, root / "first", cache, args.overrides)
        figures["posttrain_s"] = round(wall, 1)
        figures["posttrain_trained"], figures["posttrain_evaluated"] = trained_and_evaluated(log)
        print(f"posttrain (empty cache): {wall:.1f} s", file=sys.stderr)

        naive_cmd = [sys.executable, __file__, "--recipe", str(args.recipe), "--naive-child", str(root / "naive")]
        for override in args.overrides:
            naive_cmd += ["-o", override]
        wall, log = timed(naive_cmd, ENV)
        figures["naive_s"] = round(wall, 1)
        figures["naive_stages"] = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("naive:")]
        print(f"by hand: {wall:.1f} s", file=sys.stderr)

        wall, log = posttrain_run(args.recipe, root / "rerun", cache, args.overrides)
        figures["rerun_s"] = round(wall, 1)
        figures["rerun_trained"], figures["rerun_evaluated"] = trained_and_evaluated(log)
        print(f"re-run: {wall:.1f} s", file=sys.stderr)

        if args.change != "none":
            wall, log = posttrain_run(args.recipe, root / "changed", cache, [*args.overrides, args.change])
            figures["change"] = args.change
            figures["change_s"] = round(wall, 1)
            figures["change_trained"], figures["change_evaluated"] = trained_and_evaluated(log)
            print(f"{args.change}: {wall:.1f} s", file=sys.stderr)

    figures["speedup_vs_naive"] = round(figures["naive_s"] / figures["posttrain_s"], 2)
    figures["rerun_fraction"] = round(figures["rerun_s"] / figures["posttrain_s"], 3)
    print(f"\ncommand: python benchmarks/experiment_vs_naive.py --recipe {args.recipe}"
          + "".join(f" -o '{o}'" for o in args.overrides))
    print("| measurement | wall (s) | what ran |\n|---|---|---|")
    print(f"| posttrain, empty cache | {figures['posttrain_s']} | trained {', '.join(figures['posttrain_trained'])}; "
          f"evaluated {len(figures['posttrain_evaluated'])} models |")
    print(f"| by hand (no sharing, reference recomputed) | {figures['naive_s']} | "
          f"{len(figures['naive_stages'])} stage trainings |")
    print(f"| re-run, same cache | {figures['rerun_s']} | trained {figures['rerun_trained'] or 'nothing'}; "
          f"evaluated {figures['rerun_evaluated'] or 'nothing'} |")
    if "change" in figures:
        print(f"| `-o {figures['change']}` | {figures['change_s']} | trained {figures['change_trained']}; "
              f"evaluated {figures['change_evaluated']} |")
    print(f"\nby hand / posttrain = {figures['speedup_vs_naive']}x; re-run = "
          f"{100 * figures['rerun_fraction']:.1f}% of the first run")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
