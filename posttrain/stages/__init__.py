"""Training stages: thin adapters over TRL trainers, one module per method."""

from __future__ import annotations

import importlib

STAGE_MODULES = {"sft": "posttrain.stages.sft", "dpo": "posttrain.stages.dpo", "orpo": "posttrain.stages.orpo"}


def run_stage(ctx):
    """Dispatch to the method's module (imported lazily: each pulls in TRL)."""
    module = importlib.import_module(STAGE_MODULES[ctx.spec.method])
    return module.train(ctx)
