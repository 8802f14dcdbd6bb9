"""The `posttrain` command: a thin Click layer. It parses, calls, prints; no logic.

Heavy libraries are imported inside the commands that need them, so `--help` and
`validate` stay fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from posttrain import __version__
from posttrain.errors import PosttrainError, environment_failure


def user_errors(command):
    """Print PosttrainError without a traceback and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PosttrainError as exc:
            if not said_by_rank_zero(exc):
                click.echo(f"{exc.prefix}: {exc.render()}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            failure = environment_failure(exc)
            if failure is None:
                raise  # a bug: keep its traceback
            click.echo(f"{failure.prefix}: {failure.render()}", err=True)
            sys.exit(failure.exit_code)
        except KeyboardInterrupt:
            if not said_by_rank_zero(None):
                click.echo("\ninterrupted: finished stages and evaluations are kept in the cache; "
                           "run the same command again to continue", err=True)
            sys.exit(130)

    return wrapper


def said_by_rank_zero(exc: PosttrainError | None) -> bool:
    """Under a launcher, whether rank 0 reports this error of another rank: the recipe's
    checks (every rank runs them on the same files, before the processes meet), a stop
    (Ctrl-C, SIGTERM), a diverged stage and rank 0's own failure are said once, by rank 0.
    An error only this rank met (`rank` set, e.g. while planning after rank 0) is its own."""
    from posttrain.ranks import launcher_rank

    if launcher_rank() == 0:
        return False
    return exc is None or getattr(exc, "rank", None) is None


override_option = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
                               help="Override a recipe value, e.g. -o stages.dpo.beta=0.2 (repeatable).")
cache_option = click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
                            envvar="POSTTRAIN_CACHE",
                            help="The stage cache (default: $POSTTRAIN_CACHE, else ~/.cache/posttrain).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="posttrain")
def main():
    """Compare post-training pipelines (SFT, SFT->DPO, ORPO) from one YAML recipe.

    \b
    Example:
      posttrain validate recipes/quickstart.yaml
      posttrain run recipes/quickstart.yaml
    """


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@override_option
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Check that N processes/GPUs can share each stage's global batch (default: the launcher's, else 1).")
@user_errors
def validate(recipes, overrides, world_size):
    """Check recipes without training; list every problem with its path.

    \b
    Example:
      posttrain validate recipes/*.yaml
      posttrain validate recipes/quickstart.yaml -o stages.dpo.beta=0.2
      posttrain validate recipes/examples/*.yaml --world-size 8
    Exit code 0 when all are valid, 2 otherwise.
    """
    from posttrain.checks import check_static
    from posttrain.recipe.load import load_recipe

    failed = False
    for path in recipes:
        try:
            recipe = load_recipe(path, list(overrides))
            check_static(recipe, Path(path).resolve().parent, path, world_size)  # files, names: no heavy import
        except PosttrainError as exc:
            click.echo(exc.render(), err=True)
            failed = True
            continue
        click.echo(f"{path}: ok ({len(recipe.pipelines)} pipelines, {len(recipe.stages)} stages, "
                   f"{len(recipe.seeds)} seed(s))")
    sys.exit(2 if failed else 0)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@override_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: <output.dir>/<recipe name>).")
@click.option("--no-wandb", is_flag=True, help="Turn W&B tracking off whatever the recipe says.")
@click.option("--progress/--no-progress", default=None,
              help="Trainer progress bars (default: on when stderr is a terminal).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines; print only the final table.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the table.")
@cache_option
@click.option("--dry-run", is_flag=True, help="Print the plan (what trains, what is reused) and stop.")
@click.option("--force", is_flag=True,
              help="Write into --out even when it is the run directory of a recipe with another name.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Train on N GPUs of this machine: runs this command again under `accelerate launch` "
                   "(printed). With --dry-run: plan for N GPUs.")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: train here; slurm: submit data preparation, each stage and the evaluation as "
                   "SLURM jobs (submitit, with afterok dependencies) and return.")
@user_errors
def run(recipe, overrides, out_dir, no_wandb, progress, quiet, as_json, cache_dir, dry_run, force, gpus, executor):
    """Train every pipeline of RECIPE, evaluate each and the base model, print the table.

    \b
    Example:
      posttrain run recipes/quickstart.yaml
      posttrain run recipes/quickstart.yaml -o stages.dpo.beta=0.2 --out runs/beta02
      posttrain run recipes/quickstart.yaml -o "seeds=[0,1,2]" --no-wandb --json > report.json
    Finished stages and evaluations are cached by content and reused by any later run;
    an interrupted run (Ctrl-C, crash) resumes its unfinished stage from its last checkpoint.
    """
    from posttrain.checks import check_static
    from posttrain.ranks import launcher_rank
    from posttrain.recipe.load import load_recipe

    overrides = list(overrides) + (["tracking.wandb.mode=disabled"] if no_wandb else [])
    parsed = load_recipe(recipe, overrides)  # every recipe error before any heavy import
    if executor == "slurm" and gpus is not None:
        raise PosttrainError("--gpus with --executor slurm: a stage's GPUs are its `resources.gpus` in the recipe")
    check_static(parsed, Path(recipe).resolve().parent, recipe, gpus)   # with --gpus N: the batches divide over N
    if dry_run and executor == "slurm":   # the jobs, not this machine's plan
        from posttrain.cluster import cluster_jobs

        click.echo("\n".join(cluster_jobs(parsed)))
        click.echo("each stage job plans for its own gpus x nodes: posttrain plan --world-size N --device cuda")
        return
    if dry_run:   # under a launcher: printed once, by rank 0, for the launcher's world size
        return print_plan(recipe, parsed, cache_dir, as_json, world_size=gpus,
                          device="cuda" if gpus else None) if launcher_rank() == 0 else None
    target = Path(out_dir) if out_dir else Path(parsed.output.dir) / parsed.name
    if executor == "slurm":
        from posttrain.executors import run_on_cluster

        run_on_cluster(parsed, recipe, target, cache_dir, force, lambda line: click.echo(line, err=quiet))
        return
    if gpus == 1:
        from posttrain.ranks import visible_gpus

        if visible_gpus() < 1:
            raise PosttrainError("--gpus 1: this machine has no CUDA GPU visible; drop --gpus to train on the CPU")
    elif gpus is not None:
        from posttrain.ranks import relaunch_on_gpus

        again = ["run", recipe, *[arg for o in overrides for arg in ("-o", o)], *(["--out", out_dir] if out_dir else []),
                 *(["--cache", cache_dir] if cache_dir else []), *(["--quiet"] if quiet else []),
                 *(["--json"] if as_json else []), *(["--force"] if force else []),
                 *([] if progress is None else ["--progress" if progress else "--no-progress"])]
        from posttrain.distributed import launch_config

        config = launch_config(parsed, Path(recipe).resolve().parent, gpus)
        sys.exit(relaunch_on_gpus(gpus, again, config, lambda line: click.echo(line, err=True)))
    from posttrain.cache import Cache
    from posttrain.pipeline import RunOptions, run_recipe

    silent = quiet or as_json
    store = Cache(cache_dir)
    store.ensure()  # a --cache that is a folder of the user's is refused before anything is written
    options = RunOptions(out_dir=target, base_dir=Path(recipe).resolve().parent,
                         show_progress=(sys.stderr.isatty() and not silent) if progress is None else progress,
                         log=(lambda line: None) if silent else (lambda line: click.echo(line, err=True)),
                         cache=store, force=force)
    if launcher_rank() != 0:
        options.log = lambda line: None   # rank 0 says what the run does
    options.log(f"posttrain {__version__}: running {recipe} -> {target}")
    import contextlib

    # Libraries print to stdout (transformers: "[INFO] Running in WANDB offline mode");
    # stdout is for the table or the JSON only.
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = run_recipe(parsed, options)
    if run_dir is None:
        return   # a rank other than 0 under a launcher: rank 0 reports
    show_report(run_dir, as_json)
    options.log(f"run directory: {run_dir} (report.md, report.html, results.csv)")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@override_option
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Plan for N processes/GPUs (default: the launcher's WORLD_SIZE, else 1).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Plan for this device (default: this machine's); resolves model.dtype: auto.")
@click.option("--gpu-memory", "gpu_memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Plan for GPUs with this much memory each, in GB (implies --device cuda): picks the `auto` "
                   "strategy and gradient checkpointing.")
@user_errors
def plan(recipe, overrides, cache_dir, as_json, world_size, device, gpu_memory):
    """Show what `posttrain run RECIPE` would do: stages to train or reuse, keys, sizes.

    \b
    Example:
      posttrain plan recipes/quickstart.yaml
      posttrain plan recipes/quickstart.yaml -o "sweep.stages.dpo.beta=[0.05,0.1,0.3]"
      posttrain plan recipes/examples/qwen2.5-0.5b.yaml --world-size 8 --device cuda
      posttrain plan recipes/examples/llama-3.1-8b-lora.yaml --world-size 8 --gpu-memory 80
    Loads (and curates) the data to know the stage keys; trains nothing. Each stage's
    batch_size x gradient_accumulation is its global batch, shared by the world size.
    """
    from posttrain.checks import check_static
    from posttrain.recipe.load import load_recipe

    parsed = load_recipe(recipe, list(overrides))
    check_static(parsed, Path(recipe).resolve().parent, recipe, world_size)  # before any heavy import
    if device == "cpu" and gpu_memory is not None:
        raise click.BadParameter("--gpu-memory plans for GPUs; it does not go with --device cpu",
                                 param_hint="--gpu-memory")
    from posttrain.ranks import launcher_rank

    if launcher_rank() == 0:   # under a launcher: printed once, by rank 0
        print_plan(recipe, parsed, cache_dir, as_json, world_size, device, gpu_memory)


@main.command()
@click.argument("name", required=False)
@user_errors
def methods(name):
    """The training methods a stage can use (`method:` in a recipe), or one with its settings.

    
    Examples:
      posttrain methods
      posttrain methods kto
    """
    from posttrain.stages import METHODS, method_names
    from posttrain.stages.method import method_lines

    if name is not None and name not in METHODS:
        raise click.BadParameter(f"unknown method {name!r} (methods: {method_names()})", param_hint="NAME")
    for method in [METHODS[name]] if name else METHODS.values():
        click.echo("\n".join(method_lines(method, settings=name is not None)))
    if name is None:
        click.echo("\nEvery stage also takes the common settings (learning_rate, epochs, max_steps, batch_size, "
                   "...); `posttrain methods NAME` lists a method's own.")


def print_plan(recipe_path: str, recipe, cache_dir: str | None, as_json: bool, world_size: int | None = None,
               device: str | None = None, gpu_memory: float | None = None) -> None:
    import contextlib
    import json

    from posttrain.cache import Cache
    from posttrain.pipeline import RunOptions, plan_recipe

    store = Cache(cache_dir)
    store.ensure()  # plan writes into the cache too (curated sets)
    options = RunOptions(out_dir=Path("."), base_dir=Path(recipe_path).resolve().parent,
                         log=lambda line: click.echo(line, err=True), cache=store, world_size=world_size,
                         device="cuda" if gpu_memory is not None else device, gpu_memory_gb=gpu_memory)
    with contextlib.redirect_stdout(sys.stderr):
        planned = plan_recipe(recipe, options)
    text = planned.pop("text")
    click.echo(json.dumps(planned, indent=2) if as_json else text)


def show_report(report_dir: Path, as_json: bool) -> None:
    from posttrain.artifacts import RunDir

    report_json = RunDir(report_dir).report_json
    if as_json:
        click.echo(report_json.read_text())
        return
    import json

    from rich.console import Console

    from posttrain.report import terminal_table

    # Off a terminal rich would wrap the table at 80 columns; let it be as wide as it needs.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(terminal_table(json.loads(report_json.read_text())))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write a merged report (default: the first RUN_DIR; required for several).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the table.")
@user_errors
def report(run_dirs, out_dir, as_json):
    """Regenerate the report of RUN_DIR (or merge several runs) from their recorded results.

    \b
    Example:
      posttrain report runs/quickstart
      posttrain report runs/quickstart runs/beta02 --out runs/compare
    Runs evaluated with different eval specs are refused.
    """
    from posttrain.report import write_report

    if len(run_dirs) > 1 and out_dir is None:
        raise PosttrainError("merging several runs needs --out DIR (a run's own report stays as it is)")
    target = Path(out_dir or run_dirs[0])
    claim_report_dir(target, [Path(d) for d in run_dirs])
    try:
        write_report(Path(run_dirs[0]), [Path(d) for d in run_dirs[1:]], out_dir=target)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # Records that parse but do not fit together (edited or mixed by hand).
        from posttrain.records import DAMAGED_HINT

        raise PosttrainError(f"{', '.join(run_dirs)}: the run's records do not fit together "
                             f"({type(exc).__name__}: {exc}); {DAMAGED_HINT}") from None
    show_report(target, as_json)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("pipeline")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="A new or empty folder for the model.")
@click.option("--merge", is_flag=True, help="Merge every LoRA adapter into full weights (needed when adapters "
              "are stacked, sit on a full fine-tune, or on a builtin model).")
@click.option("--seed", type=int, default=None, help="Which seed's model (required when the run has several).")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO_ID",
              help="Then create the Hub model repository (kept if it exists) and upload the folder.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@cache_option
@user_errors
def export(run_dir, pipeline, out_dir, merge, seed, repo_id, private, cache_dir):
    """Write PIPELINE of the finished run RUN_DIR as a model plain transformers loads.

    \b
    Example:
      posttrain export runs/quickstart sft+dpo --out models/sft-dpo --merge
      posttrain export runs/smol sft --out models/smol-sft --push-to-hub me/smol-sft --private
    The model is the one the run evaluated: base, chat template and its added tokens,
    then each stage in order. A pipeline of one LoRA stage on a Hub or local base is
    written as an adapter unless --merge; one ending in a full fine-tune as full weights.
    Tokenizer (chat template, EOS), generation config, posttrain_export.json and a model
    card (README.md with the run's scores) are always written.
    """
    if private and not repo_id:
        raise PosttrainError("--private goes with --push-to-hub REPO_ID")
    from posttrain.export import check_repo_id, export_pipeline, find_pipeline, push_to_hub

    if repo_id:
        check_repo_id(repo_id)   # before minutes of merging
    model = find_pipeline(Path(run_dir), pipeline, seed, Path(cache_dir) if cache_dir else None)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):   # libraries print; stdout is for the result
        record = export_pipeline(model, Path(out_dir), merge, log=lambda line: click.echo(line, err=True))
    stages = " -> ".join(stage["stage"] for stage in record["stages"])
    click.echo(f"exported {pipeline} (seed {record['seed']}: {stages}) as {record['export']} to {out_dir}")
    if repo_id:
        click.echo(f"pushed to {push_to_hub(Path(out_dir), repo_id, private)}")


def claim_report_dir(target: Path, run_dirs: list[Path]) -> None:
    """A merged report goes into a new or empty folder, a run directory, or an earlier merge."""
    from posttrain.artifacts import MARKER, RunDir, directory_owner

    owner = directory_owner(target)
    if any(target.resolve() == d.resolve() for d in run_dirs):
        if not owner:  # a run's own report is rewritten only in a folder posttrain made
            raise PosttrainError(f"{target}: is not a posttrain run directory (no {MARKER} or recipe.resolved.yaml);"
                                 " posttrain never writes into a folder of yours")
        return
    if owner == "":
        raise PosttrainError(f"--out {target}: is not empty and is not a posttrain run or report directory; "
                             "posttrain never writes into a folder of yours: choose a new or empty directory")
    if owner is None or not (target / MARKER).is_file():
        RunDir(target).claim(owner or "(merged report)", kind="report")


@main.group()
def data():
    """Inspect and curate datasets without training.

    \b
    Example:
      posttrain data inspect alpaca_en_sample.json
      posttrain data curate recipes/curation.yaml --dataset curated --out curated.jsonl
    """


@data.command("inspect")
@click.argument("target", type=click.Path(exists=True))
@click.option("--dataset", default=None, help="With a recipe: which of its datasets (default: the only one).")
@click.option("--format", "fmt", default="auto", show_default=True, help="Data format of a file.")
@click.option("--split", default="train", show_default=True, help="Of a folder in the hub layout: which split.")
@click.option("--subset", default=None, help="Of a folder in the hub layout: which subset (config name).")
@click.option("--samples", default=3, show_default=True, help="Sample rows to show.")
@user_errors
def data_inspect(target, dataset, fmt, split, subset, samples):
    """Statistics of a data file, a dataset folder, or a recipe's dataset: rows, lengths, turns, duplicates.

    \b
    Example:
      posttrain data inspect train.jsonl
      posttrain data inspect ultrachat_200k --split train_sft
      posttrain data inspect recipes/quickstart.yaml --dataset instructions
    """
    from posttrain.datacmd import inspect_target

    click.echo(inspect_target(Path(target), dataset, fmt, samples, progress=sys.stderr.isatty(), split=split,
                              subset=subset))


@data.command("curate")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", required=True, help="The recipe's dataset to curate.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Curated rows (jsonl); the curation report goes beside it (.curation.json).")
@override_option
@user_errors
def data_curate(recipe, dataset, out_file, overrides):
    """Write a recipe's curated dataset and its curation report, without training.

    \b
    Example:
      posttrain data curate recipes/curation.yaml --dataset curated --out /tmp/curated.jsonl
    """
    from posttrain.datacmd import curate_to_file

    click.echo(curate_to_file(Path(recipe), dataset, Path(out_file), list(overrides),
                              log=lambda line: click.echo(line, err=True)))


@main.group()
def cache():
    """Inspect and clean the stage cache (finished stages, checkpoints, datasets, evaluations).

    \b
    Example:
      posttrain cache ls
      posttrain cache verify
      posttrain cache rm 3f2a9c1b
      posttrain cache gc --older-than 30 --max-size 50GB
    The cache is $POSTTRAIN_CACHE, else ~/.cache/posttrain (or --cache DIR).
    """


def entry_lines(items, corrupt=frozenset()) -> list[str]:
    """One line per entry; `corrupt`: the paths of entries that failed their checks."""
    import time

    from posttrain.cache import age_days, human_size

    now = time.time()
    lines = []
    for e in items:
        status = "CORRUPT (made again when next needed)" if e.path in corrupt else ""
        if e.kind == "partial":
            step = e.info.get("resume_step")
            status = f"resume@{step}" if step is not None else "no checkpoint"
        lines.append(f"{e.kind:<9} {e.key[:12]:<12} {human_size(e.size):>10}  {age_days(e, now):6.1f}d  "
                     f"{e.label} {status}".rstrip())
    return lines


@cache.command("ls")
@cache_option
@click.option("--kind", type=click.Choice(["all", "stages", "partial", "datasets", "curated", "reflogps", "evals"]),
              default="all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Entries as JSON.")
@user_errors
def cache_ls(cache_dir, kind, as_json):
    """List cache entries with size and days since last use, and totals per kind.

    Entries whose files no longer have the sizes they were published with are marked
    CORRUPT (a quick check; `posttrain cache verify` compares hashes too).
    """
    import json

    from posttrain.cache import Cache, check, entries, human_size

    store = Cache(cache_dir)
    items = [e for e in entries(store) if kind in ("all", e.kind)]
    problems = {e.path: check(store, e, hashes=False).problems for e in items}
    if as_json:
        click.echo(json.dumps([{"kind": e.kind, "key": e.key, "path": str(e.path), "size": e.size,
                                "last_used": e.last_used, "label": e.label, "problems": problems[e.path]}
                               for e in items], indent=2))
        return
    click.echo(f"cache: {store.root}")
    if not items:
        click.echo("(empty)")
        return
    click.echo(f"{'kind':<9} {'key':<12} {'size':>10}  {'unused':>7}  what")
    for line in entry_lines(items, {path for path, found in problems.items() if found}):
        click.echo(line)
    totals: dict[str, int] = {}
    for e in items:
        totals[e.kind] = totals.get(e.kind, 0) + e.size
    click.echo("total: " + human_size(sum(totals.values())) + " ("
               + ", ".join(f"{k} {human_size(v)}" for k, v in totals.items()) + ")")


@cache.command("rm")
@cache_option
@click.argument("keys", nargs=-1)
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry.")
@user_errors
def cache_rm(cache_dir, keys, remove_all):
    """Remove entries by key prefix (at least 6 characters), as `cache ls` shows them."""
    from posttrain.cache import Cache, entries, find, human_size, in_training, remove

    store = Cache(cache_dir)
    store.ensure(create=False)  # never delete from a folder of the user's
    items = entries(store)
    if remove_all:
        chosen = items
    else:
        if not keys:
            raise PosttrainError("give key prefixes to remove (see `posttrain cache ls`), or --all")
        chosen, problems = [], []
        for prefix in keys:
            found = find(items, prefix)
            if len(prefix) < 6:
                problems.append(f"{prefix}: use at least 6 characters of the key")
            elif not found:
                problems.append(f"{prefix}: no cache entry with this key")
            elif len({e.key for e in found}) > 1:
                problems.append(f"{prefix}: ambiguous ({len(found)} entries); use more characters")
            chosen += found
        if problems:
            raise PosttrainError("cache rm: nothing removed", problems)
    busy = [e for e in chosen if in_training(store, e)]
    if busy:
        raise PosttrainError("cache rm: nothing removed; a run is training "
                             + ", ".join(e.key[:12] for e in busy))
    for entry in chosen:
        remove(store, entry)
    click.echo(f"removed {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}, "
               f"{human_size(sum(e.size for e in chosen))}")


@cache.command("verify")
@cache_option
@click.argument("keys", nargs=-1)
@click.option("--fix", is_flag=True, help="Remove corrupt entries (made again when next needed) and record "
              "manifests for intact entries published before manifests existed.")
@click.option("--json", "as_json", is_flag=True, help="Every checked entry and its problems as JSON.")
@user_errors
def cache_verify(cache_dir, keys, fix, as_json):
    """Check every cache entry (or those whose key starts with KEY) against its manifest.

    Each file's size and SHA-256 is compared with what was recorded when the entry was
    published; entries from before manifests get a structural check (JSON parses,
    safetensors files are whole, zip CRCs). Every problem is printed with the entry's
    key and the file's path. Exit status: 0 when every checked entry is intact (with
    --fix: when every corrupt one was removed), 2 when a corrupt entry remains.
    """
    import json
    import time

    from posttrain.cache import Cache, entries, find, human_size, verify_cache

    store = Cache(cache_dir)
    if fix:
        store.ensure(create=False)  # never delete from a folder of the user's
    items = entries(store)
    if keys:
        unknown = [key for key in keys if not find(items, key)]
        if unknown:
            raise PosttrainError("cache verify: nothing checked",
                                 [f"{key}: no cache entry with this key (see `posttrain cache ls`)" for key in unknown])
        items = [e for e in items if any(e.key.startswith(key) for key in keys)]
    started = time.perf_counter()
    checked = verify_cache(store, items, fix=fix)
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps([{"kind": c.entry.kind, "key": c.entry.key, "path": str(c.entry.path),
                                "problems": c.verdict.problems, "manifest": c.verdict.manifest,
                                "action": c.action} for c in checked], indent=2))
    for c in checked if not as_json else ():
        where = f"{c.entry.kind}/{c.entry.key[:12]} {c.entry.label}".rstrip()
        action = f" ({c.action})" if c.action else ""
        if c.verdict.problems:
            click.echo(f"corrupt  {where}{action}")
            for problem in c.verdict.problems:
                click.echo(f"  {problem}")
        elif c.entry.kind in ("stages", "evals", "datasets") and not c.verdict.manifest:
            click.echo(f"no manifest  {where}: published before manifests; "
                       + ("rebuilt when next used" if c.entry.kind == "datasets" else "its structure checks out")
                       + action)
    corrupt = [c for c in checked if c.verdict.problems]
    left = [c for c in corrupt if not c.action.startswith("removed")]
    if not as_json:
        click.echo(f"checked {len(checked)} entries ({human_size(sum(c.entry.size for c in checked))} in "
                   f"{seconds:.1f}s) in {store.root}: {len(checked) - len(corrupt)} intact, {len(corrupt)} corrupt"
                   + (f", {len(corrupt) - len(left)} removed" if fix and corrupt else ""))
    if left:
        raise PosttrainError(f"cache verify: {len(left)} corrupt entr{'y' if len(left) == 1 else 'ies'}; "
                             "runs retrain them; `posttrain cache verify --fix` removes them now")


class DaysType(click.ParamType):
    """A finite, non-negative number of days."""

    name = "days"

    def convert(self, value, param, ctx):
        import math

        try:
            days = float(value)
        except (TypeError, ValueError):
            days = math.nan
        if not math.isfinite(days) or days < 0:
            self.fail(f"{value!r} is not a number of days >= 0 (e.g. 30, 0.5)", param, ctx)
        return days


class SizeType(click.ParamType):
    """A size such as 500MB or 20GB (binary units), finite and not negative."""

    name = "size"

    def convert(self, value, param, ctx):
        from posttrain.cache import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@cache.command("gc")
@cache_option
@click.option("--older-than", "older_than", type=DaysType(), default=30.0, show_default=True,
              help="Remove entries unused for this many days.")
@click.option("--max-size", type=SizeType(), default=None,
              help="Then remove least recently used entries until the cache fits (e.g. 50GB).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@user_errors
def cache_gc(cache_dir, older_than, max_size, dry_run):
    """Evict old and least recently used entries, and leftovers of crashed writers.

    Entries a running posttrain is training are never removed.
    """
    from posttrain.cache import Cache, entries, human_size, in_training, remove, select_garbage, stale_temporaries

    store = Cache(cache_dir)
    if not dry_run:
        store.ensure(create=False)  # never delete from a folder of the user's
    items = entries(store)
    doomed = select_garbage(items, older_than, max_size,
                            locked=lambda e: in_training(store, e))
    leftovers = stale_temporaries(store)
    for line in entry_lines(doomed):
        click.echo(("would remove " if dry_run else "remove ") + line)
    if not dry_run:
        for entry in doomed:
            remove(store, entry)
        for path in leftovers:
            store.area.rmtree(path)
    freed = sum(e.size for e in doomed)
    click.echo(f"{'would free' if dry_run else 'freed'} {human_size(freed)} in {len(doomed)} entries"
               + (f" and {len(leftovers)} leftovers of crashed writers" if leftovers else "")
               + f"; {human_size(sum(e.size for e in items) - freed)} kept in {store.root}")
