"""Weights & Biases tracking: one W&B run per trained stage, per evaluation, and for the report.

The only module that imports wandb, and only inside functions: importing this module
imports neither wandb nor torch, and a disabled tracker never imports wandb at all.

Runs of one experiment share `group` (the recipe name) and differ by `job_type`
(the stage's method, "eval", "report"). Training curves reach the stage's run
through the trainer's own WandbCallback: `Tracker.stage` starts the run first and
yields `report_to=["wandb"]`; transformers' callback reuses the active `wandb.run`
instead of starting another (it only calls `wandb.init` when `wandb.run is None`),
and adds the TrainingArguments and model config to that run's config.

Files go under `<run_dir>/wandb/` (offline runs: `offline-run-*`, upload later with
`wandb sync <run_dir>/wandb/offline-run-*`). No environment variable or API key is
ever put into a run's config.
"""

from __future__ import annotations

import configparser
import netrc
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping
from urllib.parse import urlsplit

from posttrain.errors import PosttrainError

MODES = ("auto", "online", "offline", "disabled")
# WANDB_MODE values wandb accepts, mapped onto ours ("dryrun"/"run" are its old names).
_ENV_MODES = {"online": "online", "run": "online", "shared": "online",
              "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
# Hosts whose .netrc entry holds a W&B API key (wandb >= 0.31 defaults to the Forge URL
# and falls back to api.wandb.ai behind it); WANDB_BASE_URL adds a self-hosted server.
_WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


class TrackingError(PosttrainError):
    """W&B is configured in a way that cannot work (unknown mode, online without a key)."""


@dataclass
class WandbSettings:
    project: str = "posttrain"
    entity: str | None = None
    mode: str = "auto"                 # auto | online | offline | disabled
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        self.tags = tuple(self.tags or ())


def resolve_mode(mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """The mode a run uses ("online", "offline" or "disabled") for a recipe's `mode`.

    An explicit online/offline/disabled is kept. `auto` follows WANDB_MODE when it is
    set, else is online when an API key is available (WANDB_API_KEY, an identity
    token file, `wandb login`'s .netrc entry, or wandb's settings file) and offline
    otherwise, so a run without a key still records everything for `wandb sync`.
    """
    if mode not in MODES:
        raise TrackingError(f"tracking.wandb.mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        if env_mode not in _ENV_MODES:
            raise TrackingError(f"WANDB_MODE={env_mode!r}: expected online, offline or disabled")
        return _ENV_MODES[env_mode]
    return "online" if has_credentials(environ) else "offline"


def has_credentials(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether wandb would find an API key without prompting (checked without importing wandb)."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    hosts = set(_WANDB_HOSTS)
    if environ.get("WANDB_BASE_URL"):
        hosts.add(urlsplit(environ["WANDB_BASE_URL"]).netloc)
    netrc_paths = [Path(environ["NETRC"]).expanduser()] if environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in netrc_paths:
        try:
            entries = netrc.netrc(str(path))
        except (OSError, netrc.NetrcParseError):
            continue
        if any((entries.authenticators(host) or (None, None, None))[2] for host in hosts):
            return True
    config_dir = Path(environ["WANDB_CONFIG_DIR"]) if environ.get("WANDB_CONFIG_DIR") else home / ".config" / "wandb"
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
    except configparser.Error:
        return False
    return bool(parser.get("default", "api_key", fallback=""))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Tracker:
    """Starts and finishes the W&B runs of one experiment (`group`), files under run_dir/wandb."""

    def __init__(self, settings: WandbSettings | None, run_dir: Path, group: str,
                 log: Callable[[str], None] = _stderr):
        self.settings = settings or WandbSettings(mode="disabled")
        self.mode = resolve_mode(self.settings.mode)
        self.run_dir = Path(run_dir)
        self.group = group
        self.log = log
        if self.mode == "online" and not has_credentials():
            # Fail before training rather than let wandb.init prompt for a key.
            raise TrackingError("tracking.wandb.mode is online but no W&B API key is configured: set "
                                "WANDB_API_KEY or run `wandb login`, or use mode offline/auto")

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @contextmanager
    def stage(self, name: str, method: str, seed: int, config: dict) -> Iterator[list[str]]:
        """One run for one trained stage; yields the trainer's `report_to`.

        The run is active while the block runs, so the trainer built inside it with
        this `report_to` logs its curves into it. It is finished on exit, marked
        failed (exit code 1) when the block raises.
        """
        # Our settings sit under one key: the trainer's callback adds every
        # TrainingArguments field (learning_rate, seed, ...) at the top level.
        run_config = {"posttrain": {**config, "stage": name, "method": method, "seed": seed}}
        run = self._start(job_type=method, name=f"{name}-s{seed}", config=run_config, system_stats=True)
        if run is None:
            yield []
            return
        try:
            yield ["wandb"]
        except BaseException:
            self._finish(run, exit_code=1)
            raise
        self._finish(run, exit_code=0)

    def log_eval(self, pipeline: str, seed: int | None, rows: list[dict]) -> None:
        """One run per evaluated (pipeline, seed): `{task}/{metric}` (and `_stderr`) as summary."""
        name = f"eval-{pipeline}" + ("" if seed is None else f"-s{seed}")
        run = self._start(job_type="eval", name=name, config={"posttrain": {"pipeline": pipeline, "seed": seed}})
        if run is None:
            return
        summary = {}
        for row in rows:
            summary[f"{row['task']}/{row['metric']}"] = row["value"]
            if row.get("stderr") is not None:
                summary[f"{row['task']}/{row['metric']}_stderr"] = row["stderr"]
        self._record(run, lambda: run.summary.update(summary))

    def log_report(self, header: list[str], rows: list[list[str]], html_path: Path | None) -> None:
        """One run with the report table (a wandb.Table) and report.html as an artifact."""
        run = self._start(job_type="report", name="report", config={})
        if run is None:
            return

        def record():
            import wandb

            run.log({"report": wandb.Table(columns=[str(h) for h in header],
                                           data=[[str(cell) for cell in row] for row in rows])})
            if html_path is not None and Path(html_path).is_file():
                artifact = wandb.Artifact(name=_artifact_name(f"{self.group}-report"), type="report")
                artifact.add_file(str(html_path), name=Path(html_path).name)
                run.log_artifact(artifact)

        self._record(run, record)

    # ---------------------------------------------------------------- internals

    def _start(self, *, job_type: str, name: str, config: dict, system_stats: bool = False):
        """A new active run, or None when disabled or wandb cannot start one (training goes on)."""
        if not self.enabled:
            return None
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True,                      # no banners, no "View run at" lines
            console="off",                    # stdout/stderr stay ours, not copied into the run
            disable_git=True,                 # env.json records the commit; remotes may embed tokens
            save_code=False,
            x_disable_stats=not system_stats,  # CPU/GPU sampling only for training runs
        )
        try:
            return wandb.init(
                project=self.settings.project, entity=self.settings.entity, group=self.group,
                job_type=job_type, name=name, tags=list(self.settings.tags), config=config,
                dir=str(self.run_dir),        # wandb adds its own wandb/ folder below this
                mode=self.mode, reinit="finish_previous", settings=settings)
        except Exception as exc:  # noqa: BLE001 - tracking must not cost a finished training
            self.log(f"W&B: could not start run {name!r} ({type(exc).__name__}: {exc}); "
                     "going on without tracking")
            self.mode = "disabled"
            return None

    def _record(self, run, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException:
            self._finish(run, exit_code=1)
            raise
        self._finish(run, exit_code=0)

    def _finish(self, run, exit_code: int) -> None:
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self.log(f"W&B: could not finish run {run.name!r} ({type(exc).__name__}: {exc})")


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.' (a recipe name may hold '+')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)
