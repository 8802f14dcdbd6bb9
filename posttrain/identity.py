"""What the base model's weights are, beyond its name: part of every stage and eval key.

A name and a revision do not pin weights: a hub branch (`main`) moves, and a local
model folder can be overwritten in place. Stages and evaluations made from the old
weights must then not be reused. So the key also holds:
- a hub model: the commit its revision resolves to (the snapshot in the local hub
  cache, else the hub's answer); a 40-hex revision is already one;
- a local folder: a SHA-256 over its files (weights, config, tokenizer, template),
  each file's hash remembered by size and modification time, so a large model is
  read once, not at every run;
- a builtin model: nothing (it is generated from its name in code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from posttrain.errors import ModelError

COMMIT = re.compile(r"[0-9a-f]{40}")
HASHES = "hashes"            # in the cache root: remembered file hashes, one JSON per model folder
CHUNK = 1 << 20


def weights_identity(name: str, revision: str | None, cache_root: Path | None = None) -> str | None:
    """`commit:<sha>` for a hub model, `sha256:<digest>` for a local folder, None for builtin."""
    from posttrain.models import is_builtin

    if is_builtin(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return "sha256:" + folder_digest(path, cache_root)
    return "commit:" + hub_commit(name, revision)


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit `revision` (default `main`) of a hub model resolves to: a commit hash as
    given; else the snapshot the local hub cache holds for it; else the hub's answer."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return Path(cached).parent.name   # .../snapshots/<commit>/config.json
    from posttrain.models import hub_offline

    if hub_offline():
        raise ModelError(f"model {repo_id}: revision {revision or 'main'} is not in the local hub cache and the hub "
                         "is offline (HF_HUB_OFFLINE): its commit, part of every stage key, cannot be resolved")
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # not found, gated, no network
        raise ModelError(f"model {repo_id}: cannot resolve revision {revision or 'main'} to a commit: "
                         f"{type(exc).__name__}: {exc}") from None


def model_files(folder: Path) -> list[Path]:
    """The files that make a model folder's weights, config and tokenizer: every regular
    file in it and its subfolders, hidden ones (.git, .cache) left out."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return files


def folder_digest(folder: Path, cache_root: Path | None = None) -> str:
    """SHA-256 over (relative path, file SHA-256) of every model file. With `cache_root`,
    each file's hash is remembered under <cache_root>/hashes/ by (size, mtime): unchanged
    files are not read again."""
    folder = folder.resolve()
    memo_path = (cache_root / HASHES / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"
                 if cache_root is not None else None)
    memo = _read_memo(memo_path)
    fresh, digest = {}, hashlib.sha256()
    for path in model_files(folder):
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        seen = memo.get(relative)
        if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
            file_hash = seen[2]
        else:
            file_hash = _file_sha256(path)
        fresh[relative] = [stat.st_size, stat.st_mtime_ns, file_hash]
        digest.update(f"{relative}\0{file_hash}\n".encode())
    if memo_path is not None and fresh != memo:
        from posttrain.artifacts import Area

        Area(cache_root).write_text(memo_path, json.dumps(fresh, sort_keys=True))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_memo(path: Path | None) -> dict:
    """Remembered hashes; anything unreadable means none (the files are hashed again)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
