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
from posttrain.errors import PosttrainError


def user_errors(command):
    """Print PosttrainError without a traceback and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PosttrainError as exc:
            click.echo(f"error: {exc.render()}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


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
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. -o stages.dpo.beta=0.2 (repeatable).")
def validate(recipes, overrides):
    """Check recipes without training; list every problem with its path.

    \b
    Example:
      posttrain validate recipes/*.yaml
      posttrain validate recipes/quickstart.yaml -o stages.dpo.beta=0.2
    Exit code 0 when all are valid, 2 otherwise.
    """
    from posttrain.config import load_recipe

    failed = False
    for path in recipes:
        try:
            recipe = load_recipe(path, list(overrides))
        except PosttrainError as exc:
            click.echo(exc.render(), err=True)
            failed = True
            continue
        click.echo(f"{path}: ok ({len(recipe.pipelines)} pipelines, {len(recipe.stages)} stages, "
                   f"{len(recipe.seeds)} seed(s))")
    sys.exit(2 if failed else 0)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. -o stages.dpo.beta=0.2 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: <output.dir>/<recipe name>).")
@click.option("--no-wandb", is_flag=True, help="Turn W&B tracking off whatever the recipe says.")
@click.option("--progress/--no-progress", default=None,
              help="Trainer progress bars (default: on when stderr is a terminal).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines; print only the final table.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the table.")
@user_errors
def run(recipe, overrides, out_dir, no_wandb, progress, quiet, as_json):
    """Train every pipeline of RECIPE, evaluate each and the base model, print the table.

    \b
    Example:
      posttrain run recipes/quickstart.yaml
      posttrain run recipes/quickstart.yaml -o stages.dpo.beta=0.2 --out runs/beta02
      posttrain run recipes/quickstart.yaml -o "seeds=[0,1,2]" --no-wandb --json > report.json
    Finished stages in the run directory are reused when the recipe is run again.
    """
    from posttrain.config import load_recipe

    overrides = list(overrides) + (["tracking.wandb.mode=disabled"] if no_wandb else [])
    parsed = load_recipe(recipe, overrides)  # every recipe error before any heavy import
    from posttrain.pipeline import RunOptions, run_recipe

    target = Path(out_dir) if out_dir else Path(parsed.output.dir) / parsed.name
    silent = quiet or as_json
    options = RunOptions(out_dir=target, base_dir=Path(recipe).resolve().parent,
                         show_progress=(sys.stderr.isatty() and not silent) if progress is None else progress,
                         log=(lambda line: None) if silent else (lambda line: click.echo(line, err=True)))
    options.log(f"posttrain {__version__}: running {recipe} -> {target}")
    import contextlib

    # Libraries print to stdout (transformers: "[INFO] Running in WANDB offline mode");
    # stdout is for the table or the JSON only.
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = run_recipe(parsed, options)
    show_report(run_dir, as_json)
    options.log(f"run directory: {run_dir} (report.md, report.html, results.csv)")


def show_report(report_dir: Path, as_json: bool) -> None:
    if as_json:
        click.echo((report_dir / "report.json").read_text())
        return
    import json

    from rich.console import Console

    from posttrain.report import terminal_table

    # Off a terminal rich would wrap the table at 80 columns; let it be as wide as it needs.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(terminal_table(json.loads((report_dir / "report.json").read_text())))


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
    write_report(Path(run_dirs[0]), [Path(d) for d in run_dirs[1:]], out_dir=target)
    show_report(target, as_json)


@main.group()
def data():
    """Inspect and curate datasets without training.

    \b
    Example:
      posttrain data inspect ../shared/data/alpaca_en_sample.json
      posttrain data curate recipes/curation.yaml --dataset curated --out curated.jsonl
    """


@data.command("inspect")
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", default=None, help="With a recipe: which of its datasets (default: the only one).")
@click.option("--format", "fmt", default="auto", show_default=True, help="Data format of a file.")
@click.option("--samples", default=3, show_default=True, help="Sample rows to show.")
@user_errors
def data_inspect(target, dataset, fmt, samples):
    """Statistics of a data file, or of a recipe's dataset: rows, lengths, turns, duplicates.

    \b
    Example:
      posttrain data inspect train.jsonl
      posttrain data inspect recipes/quickstart.yaml --dataset instructions
    """
    from posttrain.datacmd import inspect_target

    click.echo(inspect_target(Path(target), dataset, fmt, samples, progress=sys.stderr.isatty()))


@data.command("curate")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", required=True, help="The recipe's dataset to curate.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Curated rows (jsonl); the curation report goes beside it (.curation.json).")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
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
