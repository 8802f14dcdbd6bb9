"""A recipe's named datasets -> canonical examples (mixed, curated), with a fingerprint.

`builtin:` sources are generated in code (posttrain.data.builtin / .noisy);
everything else goes through the file/hub loader in posttrain.data.io. A dataset
may be a `mix` of others, and may be curated (posttrain.data.curate); curated sets
are cached by content in posttrain's cache (`<cache>/curated`), so curating the same way twice is
free and curating differently changes the fingerprint the stage keys hash.

Order: read (`limit`: the first N source rows) -> mix (`cap`, `size`: source rows)
-> curate -> convert to the kind the stage trains on (`formats.as_kind`). Every step
before the conversion sees the source rows as published (pairs stay pairs), so every
stage reading a dataset gets the same rows of it: `limit: 100` is 100 pairs for DPO,
their 100 chosen replies for SFT and their 200 labelled replies for KTO, and
`min_score_margin` keeps the same pairs whichever stage reads them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from posttrain.artifacts import content_hash
from posttrain.data import builtin, noisy
from posttrain.data.formats import KIND_NEEDS, as_kind, can_feed, convert_row, kind_of
from posttrain.data.io import load_examples
from posttrain.errors import DataError


@dataclass
class LoadedData:
    name: str
    examples: list[dict]
    format: str
    kind: str              # "instruction" | "preference" | "unpaired" (the stage's, after to_kind)
    skipped: list[str]
    fingerprint: str       # sha256 of the canonical examples: what the stage keys hash
    curation: dict | None = None   # CurationReport.to_dict() when curated
    rows_before_curation: int | None = None


@dataclass
class DataEnv:
    """What loading needs beyond a dataset's own spec: the recipe's other datasets,
    and, for curation, a token counter, eval texts, a scorer and a cache folder."""

    base_dir: Path | None
    datasets: dict = field(default_factory=dict)             # name -> DataSpec (for mixes)
    count_tokens: Callable[[], Callable[[str], int]] | None = None   # lazy: loads a tokenizer
    eval_texts: Callable[[], dict[str, list[str]]] | None = None
    scorer: Callable[[str | None], object] | None = None     # scorer model name (None: recipe's) -> Scorer
    cache_dir: Path | None = None
    seed: int = 0
    log: Callable[[str], None] = lambda line: None


def fingerprint(examples: list[dict]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# Every `builtin:` dataset's loader, by name (their splits and formats: builtin.BUILTIN_SPLITS/FORMATS).
BUILTIN_DATASETS: dict[str, Callable[..., list[dict]]] = {
    **builtin.BUILTIN_DATASETS, "skills-noisy": noisy.noisy_rows}


def builtin_rows(source: str, split: str) -> tuple[list[dict], str]:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown builtin dataset {source!r}; choose one of: "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
    rows = BUILTIN_DATASETS[name](split=split)
    return rows, ("preference" if "prompt" in rows[0] else "messages")


def load_raw(name: str, spec, want: str, env: DataEnv) -> tuple[list[dict], str, list[str]]:
    """One dataset's canonical examples before its curation, as a stage needing `want`
    reads them: (examples, format, skipped rows)."""
    examples, fmt, skipped = load_source_rows(name, spec, want, env)
    return as_kind(examples, want), fmt, skipped


def load_source_rows(name: str, spec, want: str, env: DataEnv) -> tuple[list[dict], str, list[str]]:
    """One dataset's source rows as canonical examples of their own kind (a mix: of its
    parts' kinds, each part curated as its own spec says), before the dataset's own
    curation: (examples, format, skipped rows).

    Checked to feed a stage that needs `want` (DataError otherwise), not converted.
    `limit` keeps the first N source rows (of a mix: of its parts, concatenated).
    """
    if spec.mix is not None:
        return load_mix(name, spec, want, env)[: spec.limit or None], "mix", []
    if spec.source.startswith("builtin:"):
        rows, fmt = builtin_rows(spec.source, spec.split)
        fmt = fmt if spec.format == "auto" else spec.format
        if not can_feed(kind_of(fmt), want):
            raise DataError(f"data.{name}: this stage needs {KIND_NEEDS[want]}; "
                            f"{spec.source} is {kind_of(fmt)} data")
        return [convert_row(row, fmt) for row in rows[: spec.limit or None]], fmt, []
    try:
        result = load_examples(spec.source, spec.format, split=spec.split, on_bad_rows=spec.on_bad_rows,
                               want=want, base_dir=env.base_dir, limit=spec.limit, convert=False,
                               subset=spec.subset)
    except DataError as exc:
        if str(exc).startswith("could not load dataset"):   # a hub id or folder: say which recipe entry
            raise DataError(f"data.{name}: {exc}", exc.problems) from None
        raise
    return result.examples, result.format, result.skipped


def load_mix(name: str, spec, want: str, env: DataEnv) -> list[dict]:
    """Concatenate parts' source rows: each capped (`cap`) or sized by weight (`weight` of
    `size`), seeded; counted in source rows (a pair is one row whichever stage reads it)."""
    weights = [part.weight for part in spec.mix if part.weight is not None]
    if weights and spec.size is None:
        raise DataError(f"data.{name}: a mix with weights needs size (the total number of rows)")
    examples: list[dict] = []
    for part in spec.mix:
        if part.data not in env.datasets or part.data == name:
            raise DataError(f"data.{name}.mix: unknown dataset {part.data!r}")
        rows = curated_source_rows(part.data, env.datasets[part.data], want, env)[0]
        take = len(rows)
        if part.weight is not None:
            take = round(spec.size * part.weight / sum(weights))
        if part.cap is not None:
            take = min(take, part.cap)
        if take < len(rows):
            rows = random.Random(f"{env.seed}-{name}-{part.data}").sample(rows, take)
        elif take > len(rows):
            env.log(f"data {name}: {part.data} has {len(rows)} rows, fewer than its share {take}; using all")
        examples += rows
    return examples


def curated_source_rows(name: str, spec, want: str, env: DataEnv) -> tuple[list[dict], str, list[str], dict | None]:
    """`load_source_rows`, then the dataset's own curation: (examples, format, skipped, curation report)."""
    examples, fmt, skipped = load_source_rows(name, spec, want, env)
    curation = None
    if spec.curate is not None:
        examples, curation = curated(name, examples, spec.curate, env)
    return examples, fmt, skipped, curation


def load_data(name: str, spec, want: str, env_or_base_dir) -> LoadedData:
    """Load dataset `name` of a recipe for a stage that needs `want` kind of data:
    read, mixed and curated as source rows, then converted (module docstring)."""
    env = env_or_base_dir if isinstance(env_or_base_dir, DataEnv) else DataEnv(base_dir=env_or_base_dir)
    rows, fmt, skipped, curation = curated_source_rows(name, spec, want, env)
    examples = as_kind(rows, want)
    rows_before = curation["rows_in"] if curation else None
    return LoadedData(name=name, examples=examples, format=fmt, kind=want, skipped=skipped,
                      fingerprint=fingerprint(examples), curation=curation, rows_before_curation=rows_before)


def curated(name: str, examples: list[dict], curate_spec, env: DataEnv) -> tuple[list[dict], dict]:
    """Curate, or reuse a cached result keyed by the input and everything curation depends on."""
    from posttrain.data.curate import curate

    _check_scores(name, examples, curate_spec)
    eval_texts = env.eval_texts() if (curate_spec.decontaminate and env.eval_texts) else None
    select = curate_spec.select
    scorer_name = select.scorer if select else None
    key = content_hash({
        "input": fingerprint(examples), "spec": curate_spec.model_dump(mode="json"), "seed": env.seed,
        "eval": fingerprint([eval_texts]) if eval_texts else None, "scorer": scorer_name,
    })[:16]
    cache = env.cache_dir / f"{name}-{key}.jsonl" if env.cache_dir else None
    if cache is not None and cache.is_file():
        from posttrain.cache import load_curated

        rows, summary, problems = load_curated(cache)
        if not problems:
            env.log(f"data {name}: curated set reused from {cache.name}")
            return rows, summary
        env.log(f"data {name}: corrupt cached curated set ({problems[0]}); curating again")
    if curate_spec.decontaminate and not eval_texts:
        env.log(f"data {name}: decontaminate is on but no local eval task data to check against")
    needs_scorer = select is not None and (select.strategy == "ifd" or (select.strategy == "diverse" and scorer_name))
    scorer = env.scorer(scorer_name) if needs_scorer and env.scorer else None
    count_tokens = env.count_tokens() if env.count_tokens else (lambda text: len(text.split()))
    rows, report = curate(examples, curate_spec, count_tokens=count_tokens, eval_texts=eval_texts, seed=env.seed,
                          scorer=scorer, progress=lambda msg: env.log(f"data {name}: {msg}"))
    summary = report.to_dict()
    env.log(f"data {name}: curated {summary['rows_in']} -> {summary['rows_out']} rows")
    if cache is not None:
        from posttrain.artifacts import Area

        area = Area(env.cache_dir)  # the cache's curated folder: nothing is written elsewhere
        area.write_text(cache, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        area.write_json(cache.with_suffix(".curation.json"), summary)
    return rows, summary


def _check_scores(name: str, examples: list[dict], curate_spec) -> None:
    """`min_score_margin` on rows none of which is a scored pair would filter nothing,
    silently: refused, naming the setting."""
    if curate_spec.min_score_margin is None or not examples:
        return
    if not any(e.get("score_chosen") is not None and e.get("score_rejected") is not None for e in examples):
        raise DataError(f"data.{name}.curate.min_score_margin: no row of data.{name} is a preference pair "
                        "with score_chosen and score_rejected, so the margin would filter nothing; "
                        "remove min_score_margin or use scored pairs (UltraFeedback-style)")
