"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class for user-facing errors (bad recipe, bad data, missing file).

    ``problems`` holds one line per problem so that every problem is reported at
    once, each naming its place (``recipe.yaml: stages.dpo.beta: must be > 0``).
    """

    exit_code = 2
    prefix = "error"        # how the CLI introduces the message

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])

    def render(self) -> str:
        lines = [str(self)] + [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


class RecipeError(PosttrainError):
    """The recipe (file or overrides) does not validate."""


class DataError(PosttrainError):
    """A data file is missing, unreadable, or has malformed rows."""


class ModelError(PosttrainError):
    """The model, tokenizer or chat template cannot be used as configured."""


class Interrupted(PosttrainError):
    """The user stopped a run (Ctrl-C, SIGTERM); finished work is kept to resume from."""

    exit_code = 130
    prefix = "interrupted"
