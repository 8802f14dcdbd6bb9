"""Errors a user can fix. The CLI prints them without a traceback and exits with the
class's `exit_code`:

    0    success
    1    the environment refused (disk full, read-only folder): EnvironmentFailure
    2    the recipe, data or model cannot be used as given: RecipeError, DataError, ModelError
    3    a stage diverged (non-finite loss, grad norm or weights): TrainingDiverged
    130  stopped by the user (Ctrl-C, SIGTERM): Interrupted
"""

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
        return "\n".join(printable(line) for line in lines)


def printable(text: str) -> str:
    """`text` with control and format characters escaped (a NUL, an ANSI escape or a
    right-to-left override in a recipe name must not reach the terminal as such)."""
    import unicodedata

    return "".join(ch if ch in "\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
                   else ascii(ch)[1:-1] for ch in text)


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


class EnvironmentFailure(PosttrainError):
    """The machine refused (disk full, read-only or unwritable folder): not the recipe's fault.

    Exits 1. Writes are atomic, so the run directory and the cache keep their last
    complete state; the same command resumes once the cause is fixed.
    """

    exit_code = 1


# errno values that mean "the environment refused", with what to tell the user.
_OS_HINTS = {
    "ENOSPC": "the disk is full",
    "EDQUOT": "the disk quota is exceeded",
    "EROFS": "the file system is read-only",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EIO": "an input/output error",
    "EMFILE": "too many open files",
    "ENAMETOOLONG": "a file name is too long",
}


def environment_failure(exc: BaseException) -> EnvironmentFailure | None:
    """An EnvironmentFailure for an OSError of the kinds above, anywhere in `exc`'s chain
    (libraries wrap them: safetensors, torch.save), else None."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, "")
            if name in _OS_HINTS:
                where = exc.filename or "a file"
                return EnvironmentFailure(
                    f"could not write {where}: {_OS_HINTS[name]} ({exc.strerror or name}). Finished stages are "
                    "kept in the cache and the run directory keeps its last complete files; free space or fix "
                    "the permissions, then run the same command again.")
        if "No space left on device" in str(exc):
            return EnvironmentFailure(f"the disk is full ({exc}); free space, then run the same command again.")
        exc = exc.__cause__ or exc.__context__
    return None


class TrainingDiverged(PosttrainError):
    """A stage's loss or gradient norm became NaN or infinite, or its trained weights did.

    Caused by the settings (learning rate, clipping, dtype), so a user error, but with
    its own exit code 3 rather than 2: a 2 says the recipe is invalid and nothing
    trained; this is found only by training, after earlier stages may have finished and
    been cached, and a sweep driver can tell "this point diverged" from "broken recipe".
    Nothing of the diverged stage is published or kept to resume from.
    """

    exit_code = 3

    def __init__(self, message: str, *, stage: str, seed: int, key: str, step: int, details: dict | None = None):
        super().__init__(message)
        self.stage, self.seed, self.key, self.step = stage, seed, key, step
        self.details = dict(details or {})

    def record(self) -> dict:
        """What the run directory keeps about the failure (failed.json)."""
        return {"stage": self.stage, "seed": self.seed, "key": self.key, "step": self.step,
                "message": str(self), **self.details}
