"""Evaluation with lm-evaluation-harness: the only module that imports ``lm_eval``.

A recipe's ``eval.tasks`` entries are either local task YAMLs (``evals/skills_mc.yaml``)
or lm-eval registry names (``hellaswag``). ``resolve_tasks`` finds them,
``prepare_task_dir`` copies the local ones into the run directory in a form that
works from any cwd, and ``evaluate_model`` runs lm-eval on an in-memory model and
writes lm-eval's own output files (results json + per-sample jsonl) beside them.

``lm_eval`` (and torch) are imported inside the functions: importing this module is
cheap, so ``posttrain validate`` can call ``resolve_tasks`` without them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from posttrain.artifacts import Area, name_problem
from posttrain.errors import ModelError, RecipeError

TASK_FILE_SUFFIXES = (".yaml", ".yml")
REPO_ROOT = Path(__file__).resolve().parent.parent
# lm-eval's own logger names all start with "lm_eval" (lm_eval.evaluator, lm_eval.models...).
LM_EVAL_LOGGER = "lm_eval"
# Warnings HFLM emits every time it is given an in-memory model; expected here, so noise.
_EXPECTED_HFLM_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@dataclass(frozen=True)
class TaskRef:
    """One eval task: its lm-eval name, and its YAML file when it is a local task."""

    name: str
    path: Path | None = None   # None: an lm-eval registry task (data from the hub)

    @property
    def is_local(self) -> bool:
        return self.path is not None


def lm_eval_version() -> str:
    """Installed lm-eval version, without importing lm_eval (for env.json / stage keys)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- tasks

def task_search_dirs(base_dir: Path) -> list[Path]:
    """Where a relative task file is looked up: the recipe's folder, the cwd, the repo root."""
    return [Path(base_dir), Path.cwd(), REPO_ROOT]


def resolve_tasks(tasks: list[str], search_dirs: list[Path]) -> list[TaskRef]:
    """Recipe ``eval.tasks`` entries -> TaskRefs; every problem at once as a RecipeError.

    See ``check_task_entries``; a problem is reported as ``eval.tasks[i]: ...``.
    """
    refs, problems = check_task_entries(tasks, search_dirs)
    lines = [f"eval.tasks[{i}]: {message}" if i is not None else f"eval.tasks: {message}"
             for i, message in problems]
    if len(lines) == 1:
        raise RecipeError(lines[0])
    if lines:
        raise RecipeError(f"{len(lines)} problems in eval.tasks", lines)
    return refs


def check_task_entries(tasks: list[str], search_dirs: list[Path]) -> tuple[list[TaskRef], list[tuple[int | None, str]]]:
    """Each entry -> a TaskRef, each local task file checked whole: (refs, [(entry index, problem)]).

    An entry ending in ``.yaml``/``.yml`` is a local task file, looked up as given if
    absolute, else under each of ``search_dirs`` in order (recipe dir, cwd, repo root).
    Its lm-eval name is the file's ``task:`` key, which must be a valid name (it names
    the task's folder in the run directory); its ``include:`` files and data files must
    exist. Any other entry is a registry name. Reads YAML only: no lm_eval, no torch.
    """
    refs: list[TaskRef] = []
    problems: list[tuple[int | None, str]] = []
    for i, entry in enumerate(tasks):
        if not entry.lower().endswith(TASK_FILE_SUFFIXES):
            refs.append(TaskRef(name=entry))
            continue
        path = _find_task_file(entry, search_dirs)
        if path is None:
            looked = ", ".join(str(d) for d in search_dirs) if not Path(entry).is_absolute() else "-"
            problems.append((i, f"task file not found: {entry} (looked in: {looked})"))
            continue
        try:
            name = _read_task_name(path)
            _flatten_task_yaml(path, seen=set(), modules=[])   # includes, data files, !function names
        except RecipeError as exc:
            problems += [(i, problem) for problem in exc.problems or [str(exc)]]
            continue
        refs.append(TaskRef(name=name, path=path))
    seen: set[str] = set()
    for ref in refs:
        if ref.name in seen:
            problems.append((None, f"task {ref.name!r} is listed twice"))
        seen.add(ref.name)
    return refs, problems


def _find_task_file(entry: str, search_dirs: list[Path]) -> Path | None:
    candidate = Path(entry).expanduser()
    if candidate.is_absolute():
        return candidate.resolve() if candidate.is_file() else None
    for directory in search_dirs:
        path = Path(directory) / candidate
        if path.is_file():
            return path.resolve()
    return None


def _read_task_name(path: Path) -> str:
    config = _load_task_yaml(path)
    name = config.get("task")
    if not isinstance(name, str) or not name:
        # A file without `task:` is a group or a base meant for `include:`.
        raise RecipeError(f"{path}: no 'task:' name in the file (only single-task YAMLs are supported)")
    problem = name_problem(name)   # the name becomes a folder of the run directory
    if problem:
        raise RecipeError(f"{path}: task: {problem}")
    return name


# lm-eval task YAMLs may hold `!function module.fn` tags. A safe loader refuses them,
# so they are read into (and written back from) this small holder, untouched.
class _FunctionTag(str):
    pass


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_FunctionTag, lambda dumper, data: dumper.represent_scalar("!function", str(data)))
    return Dumper


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML, strictly (duplicate keys, alias bombs, non-UTF-8 refused with file:line);
    ``!function`` values kept as ``_FunctionTag`` strings. Raises RecipeError."""
    from posttrain.recipe.yamlfile import strict_yaml_load

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    config, _lines = strict_yaml_load(text, str(path), tags={"!function": _FunctionTag})
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: not a YAML mapping")
    return config


def prepare_task_dir(refs: list[TaskRef], dest: Path, area: Area | None = None) -> Path:
    """Copy the local task YAMLs into ``dest`` so they work from any cwd.

    lm-eval resolves ``dataset_kwargs.data_files`` (and a local ``dataset_path``)
    against the *cwd*, not the YAML's folder. Each copy has those paths made absolute
    (relative paths are taken from the YAML's folder, else from the cwd), its
    ``include:`` chain merged in, and the ``.py`` modules its ``!function`` tags name
    copied beside it. Each task gets its own folder ``dest/<task>/<task>.yaml``, which
    is also the record of the exact task spec used. Returns ``dest``.

    Every write and delete goes through ``area`` (the run directory's; default: one
    rooted at ``dest``'s parent): a task name or a module path that points elsewhere,
    or a link planted inside, is refused (PathEscape), never followed.
    """
    import yaml

    dest = Path(dest)
    area = area or Area(dest.parent)
    area.mkdir(dest)
    for ref in refs:
        if ref.path is None:
            continue
        task_dir = area.child(dest, ref.name)
        area.rmtree(task_dir)
        area.mkdir(task_dir)
        modules: list[tuple[Path, str]] = []
        config = _flatten_task_yaml(ref.path, seen=set(), modules=modules)
        for source, relative in modules:
            area.copyfile(source, task_dir / relative)
        # lm-eval's TaskManager only indexes `*.yaml` (not `.yml`), hence the suffix.
        text = yaml.dump(config, Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True)
        area.write_text(task_dir / f"{ref.name}.yaml",
                        f"# Generated by posttrain from {ref.path}; data paths made absolute.\n{text}")
    return dest


def _flatten_task_yaml(path: Path, seen: set[Path], modules: list[tuple[Path, str]]) -> dict[str, Any]:
    """Load ``path`` with its includes merged (as lm-eval merges them), paths absolute.

    Appends to ``modules`` each local ``!function`` module as (source file, path
    relative to the YAML's folder), for the caller to copy beside the flattened YAML.
    """
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: include cycle")
    seen.add(path)
    config = _load_task_yaml(path)
    _absolutize_data_paths(config, path.parent)
    modules += _function_modules(config, path)
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        if not isinstance(include, str):
            raise RecipeError(f"{path}: include: expected a file name, got {include!r}")
        include_path = Path(include) if Path(include).is_absolute() else path.parent / include
        if not include_path.is_file():
            raise RecipeError(f"{path}: include not found: {include}")
        included = _flatten_task_yaml(include_path, seen, modules)
        included.pop("task_list", None)   # as lm-eval: task_list is not inherited
        merged.update(included)
    merged.update(config)                 # the including file's keys win
    return merged


def _absolute(value: str, base_dir: Path) -> str:
    """A local relative path -> absolute (YAML folder first, then cwd); URLs untouched."""
    if "://" in value or Path(value).expanduser().is_absolute():
        return _readable_data_path(value, base_dir)
    for base in (base_dir, Path.cwd()):
        if (base / value).exists():
            return _readable_data_path(str((base / value).resolve()), base_dir)
    if any(ch in value for ch in "*?["):  # a glob pattern: taken relative to the YAML
        return str(base_dir.resolve() / value)
    raise RecipeError(f"{base_dir}: data file not found: {value} (relative to the task YAML or the cwd)")


def _readable_data_path(value: str, base_dir: Path) -> str:
    """`value`, unless it names a FIFO or a device (lm-eval would block or read forever)."""
    from posttrain.data.io import not_regular_file

    path = Path(value).expanduser()
    problem = not_regular_file(path) if "://" not in value and path.exists() and not path.is_dir() else None
    if problem:
        raise RecipeError(f"{base_dir}: data file {problem}")
    return value


def _absolutize_data_paths(config: dict[str, Any], base_dir: Path) -> None:
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        files = kwargs["data_files"]
        if isinstance(files, str):
            kwargs["data_files"] = _absolute(files, base_dir)
        elif isinstance(files, list):
            kwargs["data_files"] = [_absolute(f, base_dir) for f in files]
        elif isinstance(files, dict):
            kwargs["data_files"] = {
                split: ([_absolute(f, base_dir) for f in spec] if isinstance(spec, list)
                        else _absolute(spec, base_dir))
                for split, spec in files.items()}
    # `dataset_path` is a builder name ("json"), a hub id, or a local folder; only the
    # last is rewritten, and only when it exists next to the YAML.
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (base_dir / dataset_path).exists() and (
            dataset_path.startswith(".") or "/" in dataset_path):
        config["dataset_path"] = str((base_dir / dataset_path).resolve())


_FUNCTION_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _function_modules(config: Any, yaml_path: Path) -> list[tuple[Path, str]]:
    """The local ``.py`` module of every ``!function module.fn`` (lm-eval looks beside the YAML first).

    A reference that is not dotted identifiers (``../x.fn``) is refused: it would name
    a file outside the task's folder. A module not beside the YAML must be installed
    (lm-eval imports it by name); whether it imports is checked before training.
    """
    found: list[tuple[Path, str]] = []
    values = config.values() if isinstance(config, dict) else config if isinstance(config, list) else []
    for value in values:
        if isinstance(value, _FunctionTag):
            if not _FUNCTION_REF.fullmatch(value):
                raise RecipeError(f"{yaml_path}: !function {value}: expected module.function (dotted names)")
            module = value.rpartition(".")[0]
            relative = module.replace(".", "/") + ".py"
            if (yaml_path.parent / relative).is_file():
                found.append((yaml_path.parent / relative, relative))
            elif importlib.util.find_spec(module.split(".")[0]) is None:   # finds, imports nothing
                raise RecipeError(f"{yaml_path}: !function {value}: no {relative} beside the file, "
                                  f"and no installed module {module.split('.')[0]!r}")
        elif isinstance(value, (dict, list)):
            found += _function_modules(value, yaml_path)
    return found


# --------------------------------------------------------------------------- checks before training

# Extras of lm-eval that are not task dependencies (tooling, model backends).
_NOT_TASK_EXTRAS = {"dev", "api", "hf", "vllm", "wandb", "zeno", "trackio", "tasks", "archiver", "litellm"}
# Import names that differ from the name pip installs.
_DISTRIBUTION_OF = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "Levenshtein": "python-Levenshtein",
                    "Stemmer": "PyStemmer", "google.protobuf": "protobuf", "dotenv": "python-dotenv",
                    "antlr4": "antlr4-python3-runtime"}


def task_problems(refs: list[TaskRef], task_dir: Path | None,
                  log=lambda line: None) -> list[tuple[int, str]]:
    """What would make lm-eval fail on ``refs`` after training: ``[(index in refs, message)]``.

    Registry names must exist (lm-eval's index of its ~10k task files is built only
    when a recipe names a registry task: it costs 5-17 s); each task's ``!function``
    modules must import (a missing package is named with the pip extra to install);
    each task's dataset must be reachable, or cached when the Hub is off (a group's
    members: one configuration per distinct dataset). Builds no Task object and
    downloads no data. At most one import and one data problem per task.
    """
    registry = [ref.name for ref in refs if not ref.is_local]
    index = _registry_index(registry, task_dir, log) if registry else {}
    problems: list[tuple[int, str]] = []
    for i, ref in enumerate(refs):
        if ref.is_local:
            leaves = [(task_dir / ref.name / f"{ref.name}.yaml" if task_dir else ref.path, None)]
        elif ref.name not in index:
            problems.append((i, _unknown_task_message(ref.name, index)))
            continue
        else:
            leaves = _leaf_tasks(ref.name, index)
        problems += [(i, problem) for problem in _leaf_problems(ref.name, leaves)]
    return problems


def _leaf_problems(name: str, leaves: list[tuple[Path, dict | None]]) -> list[str]:
    import_problem = data_problem = nltk_problem = None
    datasets_seen: set[str] = set()
    for yaml_path, overrides in leaves:
        if nltk_problem is None:
            nltk_problem = _nltk_data_problem(name, yaml_path)
        if import_problem is None:
            with _no_nltk_downloads():   # IFEval's module downloads punkt_tab at import
                import_problem = _import_check(name, yaml_path)
        if data_problem is None:
            config = _task_config(yaml_path, overrides)
            dataset = config.get("dataset_path")
            if dataset not in datasets_seen:
                datasets_seen.add(dataset)
                data_problem = _dataset_problem(name, config)
        if import_problem and data_problem:
            break
    return [problem for problem in (nltk_problem, import_problem, data_problem) if problem]


@contextmanager
def _no_nltk_downloads() -> Iterator[None]:
    """A check imports task modules; none of them may fetch anything (NLTK data is checked apart)."""
    try:
        import nltk
    except ImportError:
        yield
        return
    download, nltk.download = nltk.download, lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = download


def _registry_index(names: list[str], task_dir: Path | None, log) -> dict:
    import time

    started, built_before = time.perf_counter(), _registry_manager.cache_info().misses
    manager = task_manager(str(task_dir) if task_dir is not None else None, True)
    how = ("built in" if _registry_manager.cache_info().misses > built_before else "reused, built earlier; ready in")
    log(f"checks: lm-eval task index {how} {time.perf_counter() - started:.1f} s "
        f"({len(manager.all_tasks)} names; needed for {', '.join(names)})")
    return manager.task_index


def task_manager(include_path: str | None, include_defaults: bool):
    """lm-eval's TaskManager. With lm-eval's ~10k bundled task YAMLs (`include_defaults`)
    the index costs 5-17 s, so it is built once per task folder in a process: the
    pre-flight check and every evaluated model of a run share it (loading tasks from it
    changes nothing). Local tasks alone index in milliseconds and are indexed afresh."""
    from lm_eval.tasks import TaskManager

    if include_defaults:
        return _registry_manager(include_path)
    return TaskManager(include_path=include_path, include_defaults=False)


@functools.lru_cache(maxsize=4)
def _registry_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=True)


def _unknown_task_message(name: str, index: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (f"{name!r} is not an lm-eval task, group or tag{hint} "
            f"(a local task file must end in .yaml or .yml)")


def _leaf_tasks(name: str, index: dict, overrides: dict | None = None,
                depth: int = 0) -> list[tuple[Path, dict | None]]:
    """The YAML files of the tasks a registry name stands for (a task, or a group's/tag's members)."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None or depth > 8:
        return []
    if entry.kind == Kind.TAG:
        return [leaf for member in sorted(entry.tags) for leaf in _leaf_tasks(member, index, overrides, depth + 1)]
    if entry.kind != Kind.GROUP:
        return [(entry.yaml_path, overrides)] if entry.yaml_path else []
    leaves = []
    for member in (entry.cfg or {}).get("task") or []:
        member_name = member if isinstance(member, str) else member.get("task") if isinstance(member, dict) else None
        member_overrides = member if isinstance(member, dict) else None
        if isinstance(member_name, str):
            leaves += _leaf_tasks(member_name, index, member_overrides, depth + 1)
    return leaves


def _import_check(name: str, yaml_path: Path) -> str | None:
    """Load the task YAML as lm-eval will, importing its ``!function`` modules; why that fails, or None."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        load_yaml(yaml_path, resolve_func=True)
    except ImportError as exc:
        return _import_problem(name, exc, yaml_path)
    except Exception as exc:  # a broken module or YAML of the task: the user's to fix
        return f"task {name!r}: cannot load {yaml_path}: {type(exc).__name__}: {exc}"
    return None


NLTK_RESOURCE = re.compile(r"""nltk\.(?:data\.find|download)\(\s*["']([\w./-]+)["']""")
NLTK_FOLDERS = ("tokenizers", "corpora", "taggers", "chunkers", "misc", "models", "grammars", "stemmers")


def _nltk_data_problem(name: str, yaml_path: Path) -> str | None:
    """NLTK data a task's Python modules look up or download (IFEval: `punkt_tab`) that is not
    installed: offline, lm-eval's download at import fails and the task breaks mid-evaluation."""
    resources = {match for source in Path(yaml_path).parent.glob("*.py")
                 for match in NLTK_RESOURCE.findall(source.read_text(encoding="utf-8", errors="replace"))}
    if not resources:
        return None
    try:
        import nltk
    except ImportError:
        return None   # the import check names the package to install
    missing = []
    for resource in sorted(resources):
        paths = [resource] if "/" in resource else [f"{folder}/{resource}" for folder in NLTK_FOLDERS]
        if not any(_nltk_has(nltk, path) for path in paths):
            missing.append(resource.rsplit("/", 1)[-1])
    missing = list(dict.fromkeys(missing))
    if not missing:
        return None
    return (f"task {name!r} needs NLTK data that is not installed: {', '.join(missing)}; "
            f"run once online: python -m nltk.downloader {' '.join(missing)}")


def _nltk_has(nltk, path: str) -> bool:
    try:
        nltk.data.find(path)
        return True
    except LookupError:
        return False


def _task_config(yaml_path: Path, overrides: dict | None) -> dict:
    """The task's settings with includes merged, ``!function`` tags left unresolved (nothing imported)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(yaml_path, resolve_func=False)
    except Exception:  # reported by _import_check
        return {}
    return {**config, **{k: v for k, v in (overrides or {}).items() if k != "task"}}


def _import_problem(name: str, exc: ImportError, yaml_path: Path) -> str:
    missing = _missing_module(exc)
    if missing is None:
        return f"task {name!r}: a module it uses does not import: {exc}"
    return (f"task {name!r} needs the Python package {missing!r}, which is not installed; "
            f"{install_hint(missing, yaml_path)}")


def _missing_module(exc: BaseException | None) -> str | None:
    """The module a (possibly wrapped) ImportError could not find."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return exc.name
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def install_hint(module: str, yaml_path: Path | None = None) -> str:
    """How to install ``module``: the lm-eval extra that provides it when one does, else the package."""
    top = module.split(".")[0]
    distribution = _DISTRIBUTION_OF.get(module, _DISTRIBUTION_OF.get(top, top))
    candidates = sorted(extra for extra, packages in _lm_eval_extras().items()
                        if _normalized(distribution) in packages and extra not in _NOT_TASK_EXTRAS)
    folder = _registry_folder(yaml_path)
    if folder is not None and _normalized(folder) in candidates:
        candidates = [_normalized(folder)]
    if len(candidates) == 1:
        return f'install it with: pip install "lm-eval[{candidates[0]}]"'
    return f"install it with: pip install {distribution}"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _lm_eval_extras() -> dict[str, set[str]]:
    """{extra: normalized package names} from the installed lm-eval's own metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("lm_eval") or []
    except PackageNotFoundError:
        return {}
    extras: dict[str, set[str]] = {}
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*).*extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if match:
            extras.setdefault(_normalized(match.group(2)), set()).add(_normalized(match.group(1)))
    return extras


def _registry_folder(yaml_path: Path | None) -> str | None:
    """``ifeval`` for .../lm_eval/tasks/ifeval/ifeval.yaml; None for a task outside lm-eval."""
    parts = Path(yaml_path).parts if yaml_path else ()
    for i in range(len(parts) - 2):
        if parts[i] == "lm_eval" and parts[i + 1] == "tasks":
            return parts[i + 2]
    return None


def _dataset_problem(name: str, config: dict) -> str | None:
    """Can ``datasets`` find the task's data (without downloading it)? Offline: is it cached?"""
    from posttrain.models import hub_offline

    path = config.get("dataset_path")
    if not isinstance(path, str) or not path:
        return None   # a Python task that loads its own data
    dataset_name = config.get("dataset_name")
    kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
    # Only what locates the data; lm-eval passes the rest to load_dataset, not to the builder.
    kwargs = {k: v for k, v in kwargs.items() if k in ("data_files", "data_dir", "revision")}
    shown = path + (f" ({dataset_name})" if dataset_name else "")
    try:
        _find_dataset(path, dataset_name, kwargs)
    except Exception as exc:  # not found, gated, not cached, bad config name, missing data files
        # Offline, `datasets` says ConnectionError, or "Couldn't find cache" for an uncached config.
        if hub_offline() and (isinstance(exc, ConnectionError) or "Couldn't find cache" in str(exc)):
            loader = f"datasets.load_dataset({path!r}" + (f", {dataset_name!r}" if dataset_name else "") + ")"
            return (f"task {name!r} needs the Hugging Face Hub (dataset {shown} is not in the local cache, "
                    f"and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); run once online: "
                    f"python -c \"import datasets; {loader}\" to cache it, or use a local task file")
        return f"task {name!r}: its dataset {shown} cannot be loaded: {type(exc).__name__}: {exc}"
    return None


def _find_dataset(path: str, name: str | None, kwargs: dict) -> None:
    """Resolve a dataset's builder as ``load_dataset`` does, quietly (no data download)."""
    import datasets

    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.ERROR)   # "Using the latest cached version..." is expected offline
    try:
        datasets.load_dataset_builder(path, name, **kwargs)
    finally:
        quiet.setLevel(level)


# --------------------------------------------------------------------------- running

def evaluate_model(model, tokenizer, refs: list[TaskRef], *, task_dir: Path | None, out_dir: Path,
                   label: str, apply_chat_template: bool = True, num_fewshot: int | None = None,
                   batch_size: int = 32, limit: int | None = None, max_gen_toks: int | None = None,
                   seed: int = 0, device: str | None = None) -> list[dict]:
    """Evaluate an in-memory model on ``refs`` with lm-eval; return tidy metric rows.

    ``task_dir`` is the folder made by ``prepare_task_dir`` (needed when a ref is
    local). lm-eval's output is written to ``out_dir`` as its CLI writes it with
    ``--output_path out_dir/results.json --log_samples``:
    ``results_<date>.json`` and one ``samples_<task>_<date>.jsonl`` per task.
    ``label`` is recorded as the model name in the results file.
    ``max_gen_toks`` overrides the tasks' generation length (``gen_kwargs``).

    Returns ``[{"task", "metric", "value", "stderr"}, ...]``, one row per task and
    metric; a metric computed after a filter other than "none" is named
    ``metric[filter]``.
    """
    if not refs:
        raise RecipeError("eval.tasks: no tasks to evaluate")
    if any(ref.is_local for ref in refs) and task_dir is None:
        raise RecipeError("local eval tasks need a task_dir (see prepare_task_dir)")

    out_dir = Path(out_dir)
    Area(out_dir.parent).mkdir(out_dir)
    _quiet_lm_eval()

    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import sanitize_model_name

    if device is not None:
        model = model.to(device)
    was_training = model.training
    with _stop_at_end_of_turn(model, tokenizer), _hide_expected_hflm_warnings(), _quiet_git_hash():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      # None keeps the tokenizer's own BOS behaviour, as lm-eval's CLI does
                      # (posttrain's builtin tokenizer has no BOS at all).
                      add_bos_token=None)
            manager = task_manager(str(task_dir) if task_dir is not None else None,
                                   # Indexing lm-eval's bundled task YAMLs costs 5-17 s: only when needed.
                                   any(not ref.is_local for ref in refs))
            tracker = EvaluationTracker(output_path=str(out_dir / "results.json"))
            results = simple_evaluate(
                model=lm,
                tasks=[ref.name for ref in refs],
                task_manager=manager,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                limit=limit,
                log_samples=True,
                evaluation_tracker=tracker,
                apply_chat_template=apply_chat_template,
                # A chat model sees few-shot examples as earlier turns, not one blob.
                fewshot_as_multiturn=apply_chat_template,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)   # HFLM puts the model in eval mode
    if results is None:  # only non-zero ranks get None; we run single-process
        raise RuntimeError("lm-eval returned no results")

    # The tracker names the model from model_args, which an in-memory model lacks.
    tracker.general_config_tracker.model_name = label
    tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(label)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    _check_written(out_dir, tracker, list(results["configs"]))
    return tidy_rows(results)


def tidy_rows(results: dict) -> list[dict]:
    """lm-eval's ``results["results"]`` -> ``[{task, metric, value, stderr}]``."""
    rows = []
    for task, metrics in results["results"].items():
        by_metric: dict[str, dict] = {}
        for key, value in metrics.items():
            # Metrics are "name,filter"; "alias", "name", "sample_len" are bookkeeping.
            if "," not in key:
                continue
            name, _, filter_name = key.partition(",")
            is_stderr = name.endswith("_stderr")
            name = name.removesuffix("_stderr")
            metric = name if filter_name in ("", "none") else f"{name}[{filter_name}]"
            row = by_metric.setdefault(metric, {"task": task, "metric": metric, "value": None, "stderr": None})
            row["stderr" if is_stderr else "value"] = _number(value)
        rows.extend(row for row in by_metric.values() if row["value"] is not None)
    return rows


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for stderrs it cannot compute; those become None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _check_written(out_dir: Path, tracker, task_names: list[str]) -> None:
    """EvaluationTracker logs and swallows write errors; a missing file must not pass silently."""
    date_id = getattr(tracker, "date_id", None)
    expected = [out_dir / f"results_{date_id}.json"] + [
        out_dir / f"samples_{name}_{date_id}.jsonl" for name in task_names]
    missing = [str(path) for path in expected if date_id is None or not path.is_file()]
    if missing:
        raise OSError(f"lm-eval did not write its output files: {', '.join(missing)}")


def output_files(out_dir: Path) -> dict[str, list[Path]]:
    """lm-eval's files in ``out_dir``: {"results": [...], "samples:<task>": [...]}, oldest first."""
    out_dir = Path(out_dir)
    files: dict[str, list[Path]] = {"results": sorted(out_dir.glob("results_*.json"))}
    for path in sorted(out_dir.glob("samples_*.jsonl")):
        task = re.sub(r"^samples_(.+)_\d{4}-\d\d-\d\dT[\d.-]+\.jsonl$", r"\1", path.name)
        files.setdefault(f"samples:{task}", []).append(path)
    return files


def _quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO; keep warnings and errors only."""
    logging.getLogger(LM_EVAL_LOGGER).setLevel(logging.WARNING)


class _DropExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(text) for text in _EXPECTED_HFLM_WARNINGS)


@contextmanager
def _hide_expected_hflm_warnings() -> Iterator[None]:
    hflm_logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropExpectedWarnings()
    hflm_logger.addFilter(drop)
    try:
        yield
    finally:
        hflm_logger.removeFilter(drop)


@contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """lm-eval records the cwd's git commit with `git describe`, whose stderr reaches the
    terminal ("fatal: not a git repository") wherever a user runs outside a repository:
    the same lookup, its stderr discarded."""
    import subprocess

    import lm_eval.evaluator as evaluator

    def git_hash() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextmanager
def _stop_at_end_of_turn(model, tokenizer) -> Iterator[None]:
    """Make ``generate`` stop each reply at the tokenizer's EOS (the chat template's end of turn).

    HFLM decodes generations with ``skip_special_tokens=True``: if ``generate`` ran on
    past an EOS it does not know about, the EOS text vanishes from the output and the
    words after it are glued onto the answer. So the EOS must be one of the model's
    generation ``eos_token_id``s; it is added for the duration of the evaluation.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ModelError("the tokenizer has no eos_token; generation would not stop at the end of a reply")
    config = getattr(model, "generation_config", None)
    if config is None:
        yield
        return
    original = config.eos_token_id
    current = [] if original is None else [original] if isinstance(original, int) else list(original)
    if eos_id not in current:
        logging.getLogger(__name__).warning(
            "generation eos_token_id %s lacks the tokenizer's EOS %r (id %s); added for evaluation",
            original, tokenizer.eos_token, eos_id)
        config.eos_token_id = current + [eos_id] if current else eos_id
    try:
        yield
    finally:
        config.eos_token_id = original


# --------------------------------------------------------------------------- spec hash

def eval_spec_hash(refs: list[TaskRef], task_dir: Path | None, settings: dict) -> str:
    """A short hash of everything that decides what an evaluation measures.

    Task specs as prepared (includes merged) with every data file replaced by the
    hash of its *content* (absolute paths differ between machines), `!function`
    modules by their content, registry tasks by name, plus `settings` (few-shot,
    chat template, generation settings, limit, lm-eval version). Two result tables
    are comparable only when their hashes agree.
    """
    import hashlib

    from posttrain.artifacts import content_hash

    def file_hash(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else path

    def content(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: content(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [content(v) for v in value]
        if isinstance(value, str) and Path(value).is_absolute():
            return file_hash(value)
        return value

    tasks = []
    for ref in refs:
        if ref.path is None or task_dir is None:
            tasks.append({"name": ref.name})
            continue
        folder = Path(task_dir) / ref.name
        config = _load_task_yaml(folder / f"{ref.name}.yaml")
        modules = {str(p.relative_to(folder)): file_hash(str(p)) for p in sorted(folder.rglob("*.py"))}
        tasks.append({"name": ref.name, "config": content(config), "modules": modules})
    payload = {"tasks": tasks, "settings": settings, "lm_eval": lm_eval_version()}
    return content_hash(payload)[:12]


# --------------------------------------------------------------------------- task texts

def task_texts(refs: list[TaskRef], task_dir: Path | None, min_words: int = 4) -> dict[str, list[str]]:
    """Every string field (of >= `min_words` words) of every doc of each local task.

    What decontamination checks. Short fields (answers like "5", labels, single
    choices) are left out: as whole-text n-grams they would match almost any row.
    Registry tasks are skipped (their data needs the hub); the caller reports that.
    """
    from posttrain.data.io import read_records

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    texts: dict[str, list[str]] = {}
    for ref in refs:
        if ref.path is None or task_dir is None:
            continue
        config = _load_task_yaml(Path(task_dir) / ref.name / f"{ref.name}.yaml")
        files = (config.get("dataset_kwargs") or {}).get("data_files") or []
        files = list(strings(files))
        texts[ref.name] = [text for path in files if Path(path).is_file()
                           for _, row in read_records(Path(path)) if isinstance(row, dict)
                           for text in strings(row) if len(text.split()) >= min_words]
    return texts
