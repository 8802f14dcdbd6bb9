"""The content-addressed cache shared by every run: finished stages and what feeds them.

Layout under the cache root (`POSTTRAIN_CACHE`, else `$XDG_CACHE_HOME/posttrain`,
else `~/.cache/posttrain`; `posttrain run --cache DIR` overrides both):

    stages/<key>/              a finished stage: model/, stage.json, trainer_log.jsonl
    stages/.partial-<key>/     a stage in progress: trainer/checkpoint-N/ to resume from
    datasets/<fingerprint>/    canonical rows as an Arrow dataset; `datasets` keeps its
                               tokenization caches beside it, so TRL's map() calls are
                               reused by every run and seed that feeds the same rows
    curated/                   curated datasets, by content of the source and the curation
    reflogps/<key>.npz         DPO reference log-probs per (reference model, tokenized pairs)
    evals/<key>/               one model's evaluation: lm-eval's output and result rows
    locks/<key>.lock           held while a stage trains, so two runs never train one key

A stage's key hashes everything that determines its output (see
`pipeline.stage_key`), so an entry is valid wherever it is found. Entries only
appear complete: each is written aside and renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.artifacts import Area

PARTIAL_PREFIX = ".partial-"
PROGRESS_FILE = "posttrain_progress.json"   # written into a checkpoint once it is complete
KINDS = ("stages", "datasets", "curated", "reflogps", "evals")


def default_root() -> Path:
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "posttrain"


class Cache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root else default_root()
        self.area = Area(self.root)   # every write and delete in the cache goes through it

    # ------------------------------------------------------------ stages

    def stage_dir(self, key: str) -> Path:
        return self.root / "stages" / key

    def partial_dir(self, key: str) -> Path:
        return self.root / "stages" / f"{PARTIAL_PREFIX}{key}"

    def has_stage(self, key: str) -> bool:
        return (self.stage_dir(key) / "stage.json").is_file()

    def stage_info(self, key: str) -> dict:
        return json.loads((self.stage_dir(key) / "stage.json").read_text())

    def touch(self, path: Path) -> None:
        """Mark an entry used now: `cache gc --older-than` evicts by last use."""
        try:
            (path / ".last_used").touch()
        except OSError:
            pass  # a read-only cache still serves

    def lock(self, key: str):
        """An inter-process lock for training `key` (another run may be training it)."""
        from filelock import FileLock

        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def resume_checkpoint(self, key: str) -> Path | None:
        """The newest complete checkpoint of an unfinished stage, or None."""
        return latest_checkpoint(self.partial_dir(key) / "trainer")

    # ------------------------------------------------------------ below the stage

    def dataset_dir(self, fingerprint: str) -> Path:
        return self.root / "datasets" / fingerprint

    def curated_dir(self) -> Path:
        return self.root / "curated"

    def reflogps_file(self, key: str) -> Path:
        return self.root / "reflogps" / f"{key}.npz"

    def eval_dir(self, key: str) -> Path:
        return self.root / "evals" / key


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(trainer_dir: Path) -> Path | None:
    """Checkpoints count only once posttrain marked them complete (after transformers'
    own files): a process killed mid-save leaves a directory that is skipped."""
    if not trainer_dir.is_dir():
        return None
    complete = [p for p in trainer_dir.glob("checkpoint-*") if (p / PROGRESS_FILE).is_file()]
    return max(complete, key=checkpoint_step, default=None)


def drop_incomplete_checkpoints(trainer_dir: Path) -> None:
    area = Area(trainer_dir)
    for path in trainer_dir.glob("checkpoint-*"):
        if not (path / PROGRESS_FILE).is_file():
            area.rmtree(path)


def save_dataset(examples: list[dict], target: Path) -> Path:
    """Rows as an Arrow dataset on disk (written aside, renamed), once per fingerprint."""
    if (target / "dataset_info.json").is_file():
        return target
    from datasets import Dataset

    area = Area(target.parent)
    tmp = area.check(target.with_name(f".tmp-{target.name}-{os.getpid()}"))
    area.rmtree(tmp)
    Dataset.from_list(examples).save_to_disk(str(tmp))
    try:
        area.replace(tmp, target)
    except OSError:  # another process published it first
        area.rmtree(tmp)
    return target


# ---------------------------------------------------------------- inspection and cleaning


@dataclass
class Entry:
    kind: str            # stages | partial | datasets | curated | reflogps | evals
    key: str
    path: Path
    size: int            # bytes
    last_used: float     # epoch seconds
    info: dict

    @property
    def label(self) -> str:
        if self.kind in ("stages", "partial"):
            chain = " -> ".join(self.info.get("chain", [])) or self.info.get("stage", "?")
            seed = self.info.get("seed")
            return f"{chain} (seed {seed})" if seed is not None else chain
        return self.info.get("label", "")


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def last_used(path: Path) -> float:
    marker = path / ".last_used"
    try:
        return marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
    except OSError:
        return 0.0


def entries(cache: Cache, kinds=KINDS) -> list[Entry]:
    """Every entry in the cache with its size and last use (locks are not entries)."""
    out = []
    for kind in kinds:
        folder = cache.root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".tmp-") or path.name.endswith(".curation.json"):
                continue  # a curation report is part of its curated set's entry
            entry_kind, key = kind, path.name
            if kind == "stages" and key.startswith(PARTIAL_PREFIX):
                entry_kind, key = "partial", key[len(PARTIAL_PREFIX):]
            info = {}
            if entry_kind in ("stages", "partial"):
                info = read_json(path / "stage.json") or read_json(path / "pending.json") or {}
                if entry_kind == "partial":
                    ckpt = latest_checkpoint(path / "trainer")
                    info["resume_step"] = checkpoint_step(ckpt) if ckpt else None
            elif kind == "evals":
                info = read_json(path / "eval.json") or {}
            size = tree_size(path)
            key = key.removesuffix(".npz")
            if kind == "curated":  # <dataset>-<key>.jsonl beside its <dataset>-<key>.curation.json
                report = path.with_suffix(".curation.json")
                size += tree_size(report) if report.is_file() else 0
                dataset, _, key = key.removesuffix(".jsonl").rpartition("-")
                info = {"label": f"curated {dataset}"}
            out.append(Entry(entry_kind, key, path, size, last_used(path), info))
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_locked(cache: Cache, key: str) -> bool:
    """True while some process holds the training lock of `key`."""
    from filelock import Timeout

    lock = cache.lock(key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def in_training(cache: Cache, entry: Entry) -> bool:
    """A stage (or its partial dir) that a running posttrain holds the lock of: never removed."""
    return entry.kind in ("stages", "partial") and is_locked(cache, entry.key)


def remove(cache: Cache, entry: Entry) -> None:
    cache.area.rmtree(entry.path)
    if entry.kind == "curated":
        cache.area.unlink(entry.path.with_suffix(".curation.json"))


def age_days(entry: Entry, now: float | None = None) -> float:
    return ((now or time.time()) - entry.last_used) / 86400


def stale_temporaries(cache: Cache, min_age_s: float = 3600) -> list[Path]:
    """Leftovers of writers that died (`.tmp-*`), older than `min_age_s`."""
    now = time.time()
    out = []
    for kind in KINDS:
        folder = cache.root / kind
        if folder.is_dir():
            out += [p for p in folder.glob(".tmp-*") if now - p.stat().st_mtime > min_age_s]
    return out


def select_garbage(items: list[Entry], older_than_days: float | None, max_size: int | None,
                   locked=lambda entry: False, now: float | None = None) -> list[Entry]:
    """Entries to evict: unused for `older_than_days`, then least recently used ones
    until the rest fits in `max_size` bytes. Entries being trained (locked) are kept."""
    candidates = [e for e in items if not locked(e)]
    doomed = [e for e in candidates if older_than_days is not None and age_days(e, now) > older_than_days]
    if max_size is not None:
        remaining = sum(e.size for e in items) - sum(e.size for e in doomed)
        for entry in sorted((e for e in candidates if e not in doomed), key=lambda e: e.last_used):
            if remaining <= max_size:
                break
            doomed.append(entry)
            remaining -= entry.size
    return doomed


def find(items: list[Entry], prefix: str) -> list[Entry]:
    return [e for e in items if e.key.startswith(prefix)]


UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
         "T": 2**40, "TB": 2**40}


def parse_size(text: str) -> int:
    """'20GB', '500M', '1.5G', '1024' -> bytes (binary units)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 500MB, 20GB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
