"""What a training method declares, once, in its own module under `posttrain/stages/`.

Everything else derives from these declarations: the recipe schema's stage union
(`settings`), which data a stage loads (`data`), the plan and its estimates
(`sequences`, `prompt_bos`, `reply_eos`), the max_length checks (`prompt_bos`),
compute matching (`single_step`), the stage record (`metrics`), the report's
training curves (`curves`), the CLI's help
(`summary`, `trainer`, `reference`). A module declares `METHOD = Method(...)`,
`build_trainer(ctx)` and `train(ctx) -> StageResult`; it imports TRL only inside
functions, so declaring costs nothing at `posttrain validate`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The kinds of training data (posttrain.data.formats converts published layouts to them).
INSTRUCTION = "instruction"   # {"messages": [...]} conversations
PREFERENCE = "preference"     # {"prompt", "chosen", "rejected"} pairs
UNPAIRED = "unpaired"         # {"prompt", "completion", "label": bool} labelled completions

# How the reference model is obtained (None: reference-free).
REFERENCE_START = "the model the stage starts from, frozen (LoRA: the adapter disabled)"


@dataclass(frozen=True)
class Method:
    name: str                      # the recipe's `method:` value; the settings' Literal
    settings: type                 # a recipe.fields.StageBase subclass with `method: Literal[name]`
    summary: str                   # one line for `posttrain methods` and the docs
    trainer: str                   # the TRL class it adapts
    data: str                      # INSTRUCTION | PREFERENCE | UNPAIRED
    reference: str | None = None   # REFERENCE_START, or None (reference-free)
    single_step: bool = False      # one stage from the base model: compute matching may set its steps
    metrics: tuple[str, ...] = ()  # trainer-log keys kept as the stage's final metrics
    curves: tuple[str, ...] = ()   # trainer-log keys (of `metrics`) the report plots over steps
    sequences: int = 1             # sequences trained per example (passes; tokens are counted per sequence)
    prompt_bos: bool = False       # its tokenization puts BOS before a prompt that lacks it (first trained token)
    reply_eos: bool = False        # its tokenization puts EOS after a reply that lacks it (sequence length)
    module: str = ""               # filled in by the registry: where `train` lives

    def __post_init__(self):
        if not set(self.curves) <= set(self.metrics):
            raise ValueError(f"method {self.name}: curves {sorted(set(self.curves) - set(self.metrics))} are not "
                             "among its metrics")
        if self.data not in (INSTRUCTION, PREFERENCE, UNPAIRED):
            raise ValueError(f"method {self.name}: unknown data kind {self.data!r}")
        declared = self.settings.model_fields["method"].annotation.__args__
        if declared != (self.name,):
            raise ValueError(f"method {self.name}: its settings declare method {declared}, not ({self.name!r},)")


def method_lines(method: Method, settings: bool = False) -> list[str]:
    """A method described for `posttrain methods`: what it trains on, its reference, its
    TRL trainer, and (with `settings`) the settings it adds to every stage's."""
    common = set().union(*(base.model_fields for base in method.settings.__bases__ if hasattr(base, "model_fields")))
    lines = [f"{method.name}: {method.summary}",
             f"  trains on: {method.data} data; reference: {method.reference or 'none'}"
             + ("; single-step (compute matching may set its steps)" if method.single_step else ""),
             f"  TRL: {method.trainer}"]
    if settings:
        own = [(name, field) for name, field in method.settings.model_fields.items()
               if name not in common and name != "method"]
        for name, field in own:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {name} (default {default!r})" + (f": {field.description}" if field.description else ""))
    return lines
