"""Run directory layout, atomic writes, and environment capture."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from posttrain.errors import PosttrainError

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "lm_eval", "wandb")


MARKER = ".posttrain-run.json"   # identifies a directory posttrain made (a run, or a merged report)
LEGACY_MARKER = "recipe.resolved.yaml"  # run directories written before the marker existed
# The run directory's format, in its marker: 2 since the records were typed (stage.json
# carries its own format); a directory whose marker lacks it (or that has none) is format 1.
RUN_FORMAT = 2
STAGE_RECORD = "stage.json"        # a stage's records.StageRecord, in its cache entry and its run folder
TRAINER_LOG = "trainer_log.jsonl"  # a stage's logged curves, in the same two places


class RunDir:
    """runs/<name>/: every file posttrain writes there is named here, and only here.

    A merged report's folder has the same layout (its report files and marker).
    """

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))  # absolute: paths under it compare whatever the cwd
        self.area = Area(self.root)   # every write under the run directory goes through it

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def env(self) -> Path:
        """Versions, hardware, git commit; no secrets."""
        return self.root / "env.json"

    @property
    def recipe(self) -> Path:
        """The recipe after defaults, overrides and compute matching."""
        return self.root / LEGACY_MARKER

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def data(self) -> Path:
        """Per dataset: rows, fingerprint, curation."""
        return self.root / "data.json"

    @property
    def pipelines(self) -> Path:
        """{pipeline: {seed: [stage folder, ...]}}: which stage records make each pipeline."""
        return self.root / "pipelines.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def results(self) -> Path:
        """The one source of the report: a records.ResultRow a line."""
        return self.root / "results.jsonl"

    @property
    def failed(self) -> Path:
        """Written when a stage fails (which one, why); removed when the run completes."""
        return self.root / "failed.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage_record(self, stage_dir: str) -> Path:
        """stages/<stage folder>/stage.json (the folder as pipelines.json names it)."""
        return self.area.child(self.stages, stage_dir, STAGE_RECORD)  # a recorded name never leads outside

    def trainer_log(self, stage_dir: str) -> Path:
        return self.area.child(self.stages, stage_dir, TRAINER_LOG)

    @property
    def format(self) -> int:
        """The format the directory was written in (1: before the marker recorded it)."""
        try:
            version = json.loads(self.marker.read_text()).get("format", 1)
        except (OSError, ValueError, AttributeError):
            return 1
        return version if isinstance(version, int) and not isinstance(version, bool) else 1

    def stage_dir(self, stage_name: str, seed: int, key: str) -> Path:
        return self.area.path("stages", f"{stage_name}-s{seed}-{key[:12]}")

    def eval_dir(self, pipeline: str, seed: int | None) -> Path:
        return self.area.path("evals", pipeline, "base" if seed is None else f"seed{seed}")

    def claim(self, recipe_name: str, force: bool = False, kind: str = "run") -> None:
        """Make root this recipe's run directory, or refuse (never write into a user's folder).

        A missing or empty directory is claimed; one holding posttrain's marker (or,
        from before the marker, a recipe.resolved.yaml) is reused when it belongs to the
        same recipe name, and only with `force` when it belongs to another. Anything
        else (a file, a non-empty folder of the user's) is refused.
        """
        owner = directory_owner(self.root)
        if owner == "":
            problem = ("is not empty and is not a posttrain run directory; posttrain never writes into "
                       "a folder of yours: choose a new or empty directory")
            raise PosttrainError(f"{self.root}: {problem}")
        if owner is not None and owner != recipe_name and not force:
            raise PosttrainError(
                f"{self.root}: is the run directory of recipe {owner!r}, not {recipe_name!r}; choose another "
                "--out, or add --force to write this recipe's results into it")
        self.root.mkdir(parents=True, exist_ok=True)
        self.area.write_json(self.marker, {"recipe": recipe_name, "kind": kind, "format": RUN_FORMAT})


def directory_owner(root: Path) -> str | None:
    """Whose directory `root` is: None (missing or empty: free), the recipe name from
    posttrain's marker (or a legacy recipe.resolved.yaml), or "" (the user's: refuse).
    Raises PosttrainError when root is not a directory."""
    if not root.exists() and not root.is_symlink():
        return None
    if not root.is_dir():
        raise PosttrainError(f"{root}: exists and is not a directory")
    if not any(root.iterdir()):
        return None
    for marker, key in ((MARKER, "recipe"), (LEGACY_MARKER, "name")):
        path = root / marker
        if path.is_file():
            try:
                data = json.loads(path.read_text()) if marker == MARKER else _yaml_mapping(path)
                name = data.get(key)
            except (OSError, ValueError, AttributeError):
                name = None
            return name if isinstance(name, str) and name else "?"
    return ""


def _yaml_mapping(path: Path) -> dict:
    from posttrain.recipe.yamlfile import strict_yaml_load

    try:
        data, _ = strict_yaml_load(path.read_bytes(), str(path))
    except PosttrainError as exc:
        raise ValueError(str(exc)) from None
    return data if isinstance(data, dict) else {}


def content_hash(payload) -> str:
    """SHA-256 of a JSON-able payload, independent of key order: the cache keys' hash."""
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class PathEscape(PosttrainError):
    """A write, rename or delete aimed outside the directory posttrain owns there."""


# What a recipe name (pipeline, stage, dataset, external, eval task) may be: it
# becomes a path component, so it can hold no separator, no "..", no NUL, nothing
# that a filesystem or a shell treats specially. Sweep names (`sft+dpo[beta=0.1]`,
# `dpo[beta=1e-05,loss_type=ipo]`) fit it.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-=,\[\]@]*")
NAME_MAX = 120
NAME_RULE = (f"a name is 1-{NAME_MAX} characters from A-Z a-z 0-9 _ . + - = , [ ] @, starting with a "
             "letter, digit or _, and without '..' (it names files)")


def name_problem(name) -> str | None:
    """Why `name` cannot be used as a path component, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string; {NAME_RULE}"
    if not name or len(name) > NAME_MAX or ".." in name or not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        return f"{shown!r} is not a valid name: {NAME_RULE}"
    return None


class Area:
    """A directory posttrain owns (a run directory, the cache, a scratch dir).

    Every write, rename and delete posttrain makes goes through an Area, which
    resolves the target and refuses it (PathEscape) unless it lies strictly inside
    the root: whatever a recipe names, nothing outside can be touched. The final
    path component is not followed, so a symlink inside (a run's `model` link into
    the cache) can be replaced or removed, but not written through.
    """

    def __init__(self, root: Path | str):
        self.root = Path(os.path.abspath(Path(root).expanduser()))

    def __repr__(self) -> str:
        return f"Area({str(self.root)!r})"

    def check(self, path: Path | str, action: str = "write") -> Path:
        """`path`, absolute, if it lies strictly inside the root and no folder between the
        root and it is a symbolic link (a link planted inside a run directory or the cache
        must not lead a write outside). The final component itself is not followed."""
        text = os.fspath(path)
        if "\x00" in text:
            raise PathEscape(f"refusing to {action} a path with a NUL character: {text!r}")
        target = Path(os.path.abspath(text))  # ".." removed lexically
        real_root = self.root.resolve()
        for root in (self.root, real_root):
            if target.is_relative_to(root) and target != root:
                parts = target.relative_to(root).parts
                break
        else:
            raise PathEscape(f"refusing to {action} {text}: outside {self.root}")
        folder = real_root
        for part in parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                raise PathEscape(f"refusing to {action} {text}: {folder} is a symbolic link "
                                 "(posttrain never writes through links inside its folders)")
        return real_root.joinpath(*parts)

    def path(self, *parts: str) -> Path:
        """root/part/part..., each part one path component (no separator, not '..')."""
        return self.child(self.root, *parts)

    def child(self, folder: Path | str, *parts: str) -> Path:
        """folder/part/..., each part one path component (a task or pipeline name)."""
        for part in parts:
            if not isinstance(part, str) or part in ("", ".", "..") or any(c in part for c in "/\\\x00"):
                raise PathEscape(f"refusing to use {part!r} as a path component under {folder}")
        self.check(Path(folder).joinpath(*parts), "use")
        return Path(folder).joinpath(*parts)

    def mkdir(self, path: Path | str) -> Path:
        target = self.check(path, "create")
        target.mkdir(parents=True, exist_ok=True)
        return target

    def write_text(self, path: Path | str, text: str) -> Path:
        """Write beside the target, then rename: readers never see half a file. On
        failure (disk full) the temporary file is removed and the old file stays."""
        return self.write_bytes(path, text.encode("utf-8"))

    def write_json(self, path: Path | str, data) -> Path:
        return self.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def write_bytes(self, path: Path | str, data: bytes) -> Path:
        target = self.check(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A fresh, exclusive temporary name: never an existing file or a planted link.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def create_new(self, path: Path | str, data: bytes) -> bool:
        """Create `path` holding `data` only if nothing is there (O_CREAT|O_EXCL, atomic on
        local filesystems and on NFSv3+): False when it exists. A lock's way to be taken once."""
        target = self.check(path, "create")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def touch(self, path: Path | str) -> None:
        """Set an existing file's modification time to now (a lock's heartbeat); the content stays."""
        os.utime(self.check(path, "touch"), follow_symlinks=False)

    def rmtree(self, path: Path | str) -> None:
        """Remove a directory tree, a file or a symlink (not its target); missing is fine."""
        target = self.check(path, "delete")
        if target.is_symlink() or target.is_file():
            target.unlink(missing_ok=True)
        elif target.exists():
            shutil.rmtree(target, ignore_errors=True)

    def unlink(self, path: Path | str) -> None:
        self.check(path, "delete").unlink(missing_ok=True)

    def replace(self, source: Path | str, target: Path | str) -> None:
        os.replace(self.check(source, "move"), self.check(target, "replace"))

    def publish(self, tmp_dir: Path | str, final_dir: Path | str) -> None:
        """Make a finished directory visible in one rename (replacing a stale copy)."""
        final = self.check(final_dir, "replace")
        if final.exists() or final.is_symlink():
            self.rmtree(final)
        os.replace(self.check(tmp_dir, "move"), final)

    def copytree(self, source: Path | str, target: Path | str) -> Path:
        """Copy a tree (read from anywhere) into the area; symlinks are copied as links."""
        final = self.check(target)
        shutil.copytree(source, final, symlinks=True)
        return final

    def copyfile(self, source: Path | str, target: Path | str) -> Path:
        """Copy a file's bytes (read from anywhere) atomically into the area."""
        return self.write_bytes(target, Path(source).read_bytes())

    def symlink(self, link: Path | str, target: Path | str) -> Path:
        """`link` (inside the area) -> `target` (anywhere); an old link or dir there is replaced."""
        final = self.check(link)
        if final.is_symlink() or final.exists():
            self.rmtree(final)
        final.symlink_to(target, target_is_directory=Path(target).is_dir())
        return final


def write_text_atomic(path: Path, text: str, area: Area | None = None) -> None:
    """Atomic write through `area` (default: the file's own folder, for a user-named output file)."""
    (area or Area(Path(path).absolute().parent)).write_text(path, text)


def write_json_atomic(path: Path, data, area: Area | None = None) -> None:
    (area or Area(Path(path).absolute().parent)).write_json(path, data)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        dist = "lm-eval" if name == "lm_eval" else name
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_defaults() -> dict:
    """The machine's facts the GPU defaults depend on (device, GPUs and their memory, bf16,
    flash-attn/liger/deepspeed installed) and the run-level defaults they give; each
    stage's resolved settings are in its stage.json (`resolved`)."""
    from posttrain.defaults import machine

    facts = machine()
    on_gpu = facts.device == "cuda"
    return {"machine": facts.as_dict(), "defaults": {
        "attn_implementation": ("flash_attention_2" if facts.flash_attn else "sdpa") if on_gpu else None,
        "bf16_for_dtype_auto": on_gpu and facts.bf16, "dataloader_pin_memory": on_gpu,
        "dataloader_num_workers": 0}}


def environment() -> dict:
    """Versions and hardware; deliberately no environment variables (they hold keys)."""
    import torch

    from posttrain import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "posttrain": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        **run_defaults(),
        "libraries": library_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
