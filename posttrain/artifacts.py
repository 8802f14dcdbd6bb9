"""Run directory layout, atomic writes, and environment capture."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "lm_eval", "wandb")


class RunDir:
    """runs/<name>/: recipe.resolved.yaml, env.json, stages/, evals/, results.jsonl, report.*"""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    def stage_dir(self, stage_name: str, seed: int, key: str) -> Path:
        return self.stages / f"{stage_name}-s{seed}-{key[:12]}"

    def eval_dir(self, pipeline: str, seed: int | None) -> Path:
        return self.evals / pipeline / ("base" if seed is None else f"seed{seed}")


def content_hash(payload) -> str:
    """SHA-256 of a JSON-able payload, independent of key order: the cache keys' hash."""
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Make a finished stage visible in one rename (replacing a stale copy)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


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
        "libraries": library_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
