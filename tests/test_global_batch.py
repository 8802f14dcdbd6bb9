"""The global batch is the invariant: a recipe's batch_size x gradient_accumulation is laid
out over the world size (per-device batch, accumulation), the keys depend on it and on the
resolved precision, not on the world size; `plan --world-size N` shows the layout and refuses
a global batch N cannot share, naming the nearest valid settings."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.distributed import BatchLayout, batch_layout, batch_problem, world_size
from posttrain.errors import PosttrainError
from posttrain.models import resolve_precision
from tiny_recipes import write_recipe

REPO = Path(__file__).resolve().parent.parent
ALL_RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))

ONE_STAGE = """
name: layout
model: {name: builtin:micro-llama, dtype: DTYPE}
data:
  ins: {source: builtin:skills, limit: 16}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 2, batch_size: 4, max_length: 96 EXTRA}
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 4
"""


def one_stage(tmp_path, repo, dtype="float32", extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_recipe(tmp_path, repo, ONE_STAGE.replace("DTYPE", dtype).replace(" EXTRA", extra))


@pytest.mark.parametrize("batch, accumulation, world, cap, expected", [
    (8, 1, 1, None, (1, 8, 1)),      # one process: the recipe's own numbers
    (4, 16, 1, None, (1, 4, 16)),
    (8, 1, 8, None, (8, 1, 1)),
    (4, 16, 8, None, (8, 4, 2)),      # 64 / 8 = 8 per process: 4 x 2
    (16, 8, 8, None, (8, 16, 1)),     # 128 / 8 = 16 per process: one batch of 16
    (1, 32, 8, None, (8, 1, 4)),      # the handbook's ORPO: 32 = 1 x 4 x 8
    (12, 1, 2, None, (2, 6, 1)),
    (16, 1, 1, 4, (1, 4, 4)),         # the per-device cap: accumulation makes up the rest
    (6, 2, 2, 4, (2, 3, 2)),          # 6 per process, at most 4 a device: 3 x 2
])
def test_the_layout_keeps_the_global_batch(batch, accumulation, world, cap, expected):
    layout = batch_layout(batch, accumulation, world, cap)
    assert (layout.world_size, layout.per_device_batch, layout.gradient_accumulation) == expected
    assert layout.global_batch == batch * accumulation
    assert layout.strategy == ("single" if world == 1 else "ddp")


def test_every_divisible_layout_is_the_largest_per_device_batch_allowed():
    for batch in range(1, 17):
        for accumulation in (1, 2, 3, 8):
            for world in (1, 2, 3, 8):
                if batch * accumulation % world:
                    continue
                layout = batch_layout(batch, accumulation, world)
                assert layout.global_batch == batch * accumulation and layout.per_device_batch <= batch
                bigger = range(layout.per_device_batch + 1, batch + 1)
                assert not [d for d in bigger if (batch * accumulation // world) % d == 0]


def test_an_indivisible_global_batch_names_the_nearest_valid_settings():
    assert batch_problem(12, 1, 8) == (
        "batch_size 12 x gradient_accumulation 1 = 12 is not divisible by 8 processes (the global batch is split "
        "evenly over them); use batch_size 8 or 16, or gradient_accumulation 2")
    assert batch_problem(3, 3, 2).endswith("use batch_size 2 or 4, or gradient_accumulation 2 or 4")
    assert batch_problem(12, 2, 8) is None
    with pytest.raises(ValueError, match="not divisible by 8"):
        batch_layout(12, 1, 8)


def test_world_size_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(PosttrainError, match="WORLD_SIZE='four'"):
        world_size()


def test_precision_is_resolved_in_one_place():
    assert resolve_precision("auto", "cpu") == resolve_precision("float32", "cuda") == (
        resolve_precision("float32", "cpu"))
    assert resolve_precision("auto", "cpu").dtype == "float32" and not resolve_precision("auto", "cpu").bf16
    assert (resolve_precision("auto", "cuda").dtype, resolve_precision("auto", "cuda").bf16) == ("bfloat16", True)
    # bf16 mixed precision never on CPU, even with bf16 weights (5-16x slower there)
    assert (resolve_precision("bfloat16", "cpu").dtype, resolve_precision("bfloat16", "cpu").bf16) == (
        "bfloat16", False)
    import torch

    if not torch.cuda.is_available():   # this machine, asked
        assert resolve_precision("auto").dtype == "float32"


def test_trainer_gets_the_per_device_share(tmp_path, monkeypatch):
    from posttrain.models import ModelSource
    from posttrain.stages.common import StageContext, reference_config, trainer_kwargs
    from posttrain.stages.dpo import DPOStage

    spec = DPOStage(method="dpo", data="d", learning_rate=1e-3, batch_size=8, gradient_accumulation=2)
    ctx = StageContext(name="dpo", spec=spec, seed=0, start=ModelSource(name="builtin:micro-llama"), examples=[],
                       out_dir=tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "8")
    kwargs = trainer_kwargs(ctx)
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (2, 1)
    assert kwargs["per_device_eval_batch_size"] == reference_config(ctx)["precompute_ref_batch_size"] == 2
    ctx.batch = BatchLayout(1, 4, 4)   # the engine's resolution wins
    assert (trainer_kwargs(ctx)["per_device_train_batch_size"], trainer_kwargs(ctx)["gradient_accumulation_steps"]) \
        == (4, 4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    ctx.batch = None
    with pytest.raises(PosttrainError, match=r"stages\.dpo\.batch_size: batch_size 8 x gradient_accumulation 2"):
        trainer_kwargs(ctx)


def keys(recipe_path, **where):
    from posttrain.plan import make_plan
    from posttrain.recipe.load import load_recipe

    plan = make_plan(load_recipe(recipe_path), recipe_path.parent, **where)
    return [node.key for node in plan.nodes.values()], plan.base_key, plan


def test_keys_depend_on_the_global_batch_and_resolved_precision_not_the_world_size(tmp_path, repo, monkeypatch):
    path = one_stage(tmp_path, repo)
    one, base, plan = keys(path, world_size=1)
    assert "precision" not in next(iter(plan.nodes.values())).inputs   # explicit dtype: keys as before
    assert keys(path, world_size=8)[:2] == keys(path, world_size=2, device="cuda")[:2] == (one, base)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert keys(path)[0] == one and keys(path)[2].world_size == 4
    capped = one_stage(tmp_path / "capped", repo, extra=", max_device_batch: 2")
    assert keys(capped)[0] == one   # a memory cap is not the stage's identity
    other = one_stage(tmp_path / "other", repo, extra=", gradient_accumulation: 2")
    assert keys(other)[0] != one    # another global batch is another stage

    auto = one_stage(tmp_path / "auto", repo, dtype="auto")
    on_cpu, on_gpu = keys(auto, device="cpu"), keys(auto, device="cuda")
    assert on_cpu[0] != on_gpu[0] and on_cpu[1] != on_gpu[1]   # stage keys and base key
    assert next(iter(on_gpu[2].nodes.values())).inputs["precision"] == "bfloat16"
    from posttrain.plan import key_changes

    before, now = (next(iter(p[2].nodes.values())).inputs for p in (on_cpu, on_gpu))
    assert key_changes(before, now) == ["resolved precision: float32 -> bfloat16"]


def plan_json(path, *args):
    result = CliRunner().invoke(main, ["plan", str(path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_world_size_shows_the_layout_and_refuses_what_it_cannot_share(tmp_path, repo):
    path = one_stage(tmp_path, repo, extra=", gradient_accumulation: 4")   # global batch 16
    (single,) = plan_json(path)["stages"]
    (eight,) = plan_json(path, "--world-size", "8", "--device", "cuda")["stages"]
    assert single["key"] == eight["key"] and single["steps"] == eight["steps"]
    assert {k: single[k] for k in ("world_size", "per_device_batch", "gradient_accumulation", "global_batch",
                                   "strategy", "precision")} == {
        "world_size": 1, "per_device_batch": 4, "gradient_accumulation": 4, "global_batch": 16,
        "strategy": "single", "precision": "float32"}
    assert (eight["per_device_batch"], eight["gradient_accumulation"], eight["strategy"]) == (2, 1, "ddp")
    text = CliRunner().invoke(main, ["plan", str(path), "--world-size", "8"])
    header, row = text.stdout.splitlines()[:2]
    assert header.split()[-7:] == ["batch", "device", "batch", "accum", "precision", "strategy", "disk"]
    assert row.split()[-7:-2] == ["16", "2", "1", "float32", "ddp"]   # then the disk, "<n> MB"
    assert "world size 8 (cpu)" in text.stdout

    refused = CliRunner().invoke(main, ["plan", str(path), "--world-size", "3"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert ("tiny.yaml:7: stages.sft.batch_size: batch_size 4 x gradient_accumulation 4 = 16 is not divisible by 3 "
            "processes (the global batch is split evenly over them); use batch_size 3 or 6, or gradient_accumulation "
            "3 or 6") in refused.output


def test_validate_checks_the_world_size_given_or_launched(tmp_path, repo, monkeypatch):
    path = one_stage(tmp_path, repo)
    assert CliRunner().invoke(main, ["validate", str(path), "--world-size", "4"]).exit_code == 0
    refused = CliRunner().invoke(main, ["validate", str(path), "--world-size", "8"])
    assert refused.exit_code == 2 and "use batch_size 8, or gradient_accumulation 2" in refused.output
    monkeypatch.setenv("WORLD_SIZE", "8")   # under a launcher: its world size
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 2


@pytest.mark.parametrize("world", [1, 2, 8])
def test_every_shipped_recipe_validates_for_world_sizes_1_2_and_8(world):
    assert len(ALL_RECIPES) >= 11
    result = CliRunner().invoke(main, ["validate", *map(str, ALL_RECIPES), "--world-size", str(world)])
    assert result.exit_code == 0, result.output


def test_stage_record_holds_the_resolution_and_reads_old_records():
    from posttrain.records import Cost, StageRecord

    record = StageRecord(stage="sft", seed=0, key="k", chain=["sft"], adapter=False, cost=Cost(), metrics={},
                         resolved={"world_size": 2, "per_device_batch": 4, "gradient_accumulation": 1,
                                   "precision": "float32"})
    assert StageRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    old = {k: v for k, v in record.to_json().items() if k != "resolved"}
    assert StageRecord.from_json(old).resolved is None


def test_a_capped_stage_trains_the_same_steps_and_records_its_layout(tmp_path, repo):
    """max_device_batch 2 on batch_size 4: two forwards of 2 per step, the same optimizer steps
    and (up to float rounding) the same loss as one forward of 4; stage.json says how it trained."""
    from posttrain.artifacts import RunDir
    from posttrain.cache import Cache
    from posttrain.tracking import Tracker
    from posttrain.training import RunOptions, train_node

    records = {}
    for cap in (None, 2):
        path = one_stage(tmp_path / str(cap), repo, extra=f", max_device_batch: {cap or 'null'}")
        _, _, plan = keys(path, world_size=1)
        (node,) = plan.nodes.values()
        run = RunDir(tmp_path / str(cap) / "run")
        run.claim("layout")
        options = RunOptions(out_dir=run.root, base_dir=path.parent, log=lambda line: None,
                             cache=Cache(tmp_path / str(cap) / "cache"))
        options.cache.ensure()
        records[cap] = train_node(plan, node, run, options, Tracker(None, run.root, "layout", log=lambda line: None))
    plain, capped = records[None], records[2]
    assert plain.key == capped.key
    assert plain.resolved["per_device_batch"] == 4 and plain.resolved["gradient_accumulation"] == 1
    assert (capped.resolved["per_device_batch"], capped.resolved["gradient_accumulation"]) == (2, 2)
    assert capped.resolved["world_size"] == 1 and capped.resolved["precision"] == "float32"
    assert plain.cost.optimizer_steps == capped.cost.optimizer_steps == 2
    assert plain.cost.examples_seen == capped.cost.examples_seen
    assert capped.metrics["train_loss_mean"] == pytest.approx(plain.metrics["train_loss_mean"], rel=1e-4)
