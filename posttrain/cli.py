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
@click.option("--progress/--no-progress", default=None,
              help="Trainer progress bars (default: on when stderr is a terminal).")
@user_errors
def run(recipe, overrides, out_dir, progress):
    """Train every pipeline of RECIPE, evaluate each and the base model, print the table.

    \b
    Example:
      posttrain run recipes/quickstart.yaml
      posttrain run recipes/quickstart.yaml -o stages.dpo.beta=0.2 --out runs/beta02
    Finished stages in the run directory are reused when the recipe is run again.
    """
    from posttrain.config import load_recipe

    parsed = load_recipe(recipe, list(overrides))  # every recipe error before any heavy import
    from posttrain.pipeline import RunOptions, run_recipe

    target = Path(out_dir) if out_dir else Path(parsed.output.dir) / parsed.name
    options = RunOptions(out_dir=target, base_dir=Path(recipe).resolve().parent,
                         show_progress=sys.stderr.isatty() if progress is None else progress,
                         log=lambda line: click.echo(line, err=True))
    click.echo(f"posttrain {__version__}: running {recipe} -> {target}", err=True)
    run_dir = run_recipe(parsed, options)
    click.echo((run_dir / "report.md").read_text())
    click.echo(f"run directory: {run_dir}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def report(run_dir):
    """Regenerate report.md and results.csv of RUN_DIR from its results.jsonl.

    \b
    Example:
      posttrain report runs/quickstart
    """
    from posttrain.report import write_report

    if not (Path(run_dir) / "results.jsonl").is_file():
        raise PosttrainError(f"{run_dir}: no results.jsonl (is this a finished run directory?)")
    click.echo(write_report(Path(run_dir)))
