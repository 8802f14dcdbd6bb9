"""Training methods: one module per method, each a thin adapter over a TRL trainer.

A module here that declares `METHOD = method.Method(...)`, `build_trainer(ctx)` (the
TRL trainer, before training: tests inspect it) and `train(ctx) -> StageResult` is a
method: the recipe schema, the plan, the estimator, compute matching and the CLI read
METHODS, so adding a method is adding its module (and its tests). Modules import TRL
inside functions.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace

from posttrain.stages.method import Method


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, Method):
            continue
        if method.name in found:
            raise ImportError(f"two modules declare method {method.name!r}: {found[method.name].module}, "
                              f"{module.__name__}")
        missing = [name for name in ("build_trainer", "train") if not callable(getattr(module, name, None))]
        if missing:
            raise ImportError(f"{module.__name__} declares method {method.name!r} but has no "
                              f"{' or '.join(f'{name}(ctx)' for name in missing)}")
        found[method.name] = replace(method, module=module.__name__)
    return found


METHODS: dict[str, Method] = _discover()


def method_names(conjunction: str = "or") -> str:
    """'cpo, dpo, ... or sft' for messages."""
    names = list(METHODS)
    return ", ".join(names[:-1]) + f" {conjunction} {names[-1]}" if len(names) > 1 else names[0]


def run_stage(ctx):
    """Train with the method's module (its TRL import happens inside)."""
    return importlib.import_module(METHODS[ctx.spec.method].module).train(ctx)
