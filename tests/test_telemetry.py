"""Throughput telemetry: token counts (real/padded) per method family, MFU arithmetic,
null MFU on CPU, old records, and the report's columns."""

from __future__ import annotations

import json

import pytest
import torch

import posttrain.stages.common as common
from posttrain.records import Cost, StageRecord
from posttrain.report.build import pipeline_throughput
from posttrain.report.cells import cost_table
from posttrain.stages import METHODS, run_stage
from posttrain.telemetry import ModelShape, TokenCounter, TokenCounts, model_shape, peak_flops, throughput

from test_stages import context, method_rows


class Echo(torch.nn.Module):
    """A stand-in model: the counter only reads the forward's inputs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return input_ids.float().sum() * self.weight


def padded_batch(lengths: list[int]) -> dict:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": torch.ones_like(mask), "attention_mask": mask}


def active_counter(model, reference=None) -> TokenCounter:
    counter = TokenCounter(model, reference)
    counter.active = True
    model.train()
    return counter


def test_known_lengths_at_batch_two_count_real_and_padded_tokens():
    model = Echo()
    counter = active_counter(model)
    for lengths in ([3, 5], [7, 9]):      # 4 rows of lengths 3, 5, 7, 9 at batch 2, unshuffled
        model(**padded_batch(lengths))
    assert (counter.counts.real, counter.counts.padded) == (24, 28)
    assert counter.counts.real_squared == 9 + 25 + 49 + 81
    assert counter.counts.forward_only == 0


def test_padding_free_rows_forward_only_passes_and_other_times_are_told_apart():
    model, reference = Echo(), Echo()
    counter = active_counter(model, reference)
    # Padding-free: sequences of 3 and 5 packed into one row, position ids restarting at 0.
    model(input_ids=torch.ones(1, 8, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    assert (counter.counts.real, counter.counts.padded, counter.counts.real_squared) == (8, 8, 9 + 25)
    reference(**padded_batch([3, 5]))                 # a frozen reference: FLOPs, no trained token
    with torch.no_grad():
        model(**padded_batch([7]))                    # a forward without gradients (KTO's KL)
    assert (counter.counts.real, counter.counts.forward_only, counter.counts.forward_only_squared) == (8, 15, 83)
    model.eval()
    model(**padded_batch([9]))                        # evaluation is not training
    model.train()
    counter.active = False
    model(**padded_batch([9]))                        # nor is anything outside the training loop
    counter.remove()
    counter.active = True
    model(**padded_batch([9]))
    assert (counter.counts.real, counter.counts.forward_only) == (8, 15)


def test_under_several_processes_the_counts_are_the_whole_jobs():
    class TwoProcesses:   # accelerate's reduce as two identical processes would see it
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor * 2

    model = Echo()
    counter = active_counter(model)
    callback = counter.callback(TwoProcesses())
    callback.on_train_begin(None, None, None)
    model(**padded_batch([3, 5]))
    callback.on_train_end(None, None, None)
    model(**padded_batch([7, 9]))                     # after training: not counted
    assert (counter.counts.real, counter.counts.padded, counter.counts.real_squared) == (16, 20, 68)


TWO_PROCESSES = """
import torch
from accelerate import Accelerator
from posttrain.telemetry import TokenCounter

accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(1, 1)
model.forward = lambda input_ids, attention_mask=None: None
counter = TokenCounter(model)
callback = counter.callback(accelerator)
callback.on_train_begin(None, None, None)
real = 3 + 2 * accelerator.process_index       # rank 0 trains 3 of 6 tokens, rank 1 5 of 6
model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=torch.tensor([[1] * real + [0] * (6 - real)]))
callback.on_train_end(None, None, None)
import sys
out = " ".join(map(str, ("counts", accelerator.process_index, counter.counts.real, counter.counts.padded,
                         counter.counts.real_squared)))
open(sys.argv[1] + f".{accelerator.process_index}", "w").write(out)   # two processes: one file each
"""


def test_under_torchrun_every_process_reads_the_whole_jobs_counts(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "counts")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = sorted((tmp_path / f"counts.{rank}").read_text() for rank in (0, 1))
    assert lines == ["counts 0 8 12 34", "counts 1 8 12 34"]


def test_mfu_arithmetic_with_an_injected_peak():
    shape = ModelShape(params=1000, layers=2, attention_width=8)
    counts = TokenCounts(real=10, padded=16, real_squared=50, forward_only=4, forward_only_squared=16)
    flops = 6 * 1000 * 10 + 12 * 2 * 8 * 50 + 2 * 1000 * 4 + 4 * 2 * 8 * 16
    assert shape.flops(counts) == flops
    out = throughput(counts, shape, runtime_s=2.0, world_size=4, peak_per_device=1e4)
    assert out["mfu"] == round(flops / 2.0 / (1e4 * 4), 4)
    assert (out["tokens_per_s_real"], out["tokens_per_s_padded"], out["world_size"]) == (5.0, 8.0, 4)
    assert throughput(counts, shape, 2.0, 1, None)["mfu"] is None          # no known peak: no MFU
    assert throughput(counts, shape, None, 1, 1e4)["tokens_per_s_real"] is None


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989), ("NVIDIA H100 PCIe", "bfloat16", 756),
    ("NVIDIA H100 NVL", "float16", 835), ("NVIDIA H200", "bfloat16", 989), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
    ("NVIDIA L40S", "bfloat16", 362), ("NVIDIA L4", "bfloat16", 121), ("NVIDIA A10", "bfloat16", 125),
    ("NVIDIA H100 80GB HBM3", "float32", None), ("NVIDIA A10G", "bfloat16", None), ("Some GPU", "bfloat16", None),
    (None, "bfloat16", None),
])
def test_device_peaks_are_datasheet_figures_or_none(name, dtype, tflops):
    assert peak_flops(name, dtype) == (tflops * 1e12 if tflops else None)


@pytest.mark.parametrize("tied", [True, False])
def test_model_parameters_exclude_the_embedding_lookup_but_count_the_head(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    shape = model_shape(model)
    assert shape.params == (total if tied else total - 50 * 16)   # tied: the head's matmul replaces the lookup
    assert (shape.layers, shape.attention_width) == (2, 16)


# ----------------------------------------------------------------------------- real trainers


def lengths_of(dataset, columns: tuple[str, ...]) -> list[int]:
    return [sum(len(row[c]) for c in columns) for row in dataset]


def expected_counts(method: str, dataset) -> tuple[int, int]:
    """(real, padded) tokens of one epoch at batch 2 in dataset order, from the tokenized
    columns: each batch is padded to its longest sequence; a preference batch holds the
    two pairs' chosen and rejected sequences together (DPO, ORPO/CPO/SimPO)."""
    if method == "sft-packed":   # conversations packed into rows, batches padding-free: no pad
        real = sum(lengths_of(dataset, ("input_ids",)))
        return real, real
    if method == "sft":
        groups = [lengths_of(dataset, ("input_ids",))]
    elif method == "kto":
        groups = [lengths_of(dataset, ("prompt_ids", "completion_ids"))]
    elif method == "dpo":
        groups = [lengths_of(dataset, ("prompt_ids", "chosen_ids")), lengths_of(dataset, ("prompt_ids", "rejected_ids"))]
    else:
        groups = [lengths_of(dataset, ("chosen_input_ids",)), lengths_of(dataset, ("rejected_input_ids",))]
    real = sum(sum(group) for group in groups)
    padded = 0
    for start in range(0, len(groups[0]), 2):
        batch = [n for group in groups for n in group[start:start + 2]]
        padded += len(batch) * max(batch)
    return real, padded


@pytest.fixture
def trainers(monkeypatch):
    """The trainer each stage built (for the tokenized lengths it trained on)."""
    seen = []
    real_run_training = common.run_training

    def spy(trainer, ctx):
        seen.append(trainer)
        return real_run_training(trainer, ctx)

    monkeypatch.setattr(common, "run_training", spy)
    return seen


def one_epoch(tmp_path, method: str, **settings):
    """Four rows (pairs) of the method at batch 2, one epoch, in dataset order."""
    spec = METHODS[method].settings(**{"method": method, "data": "d", "learning_rate": 1e-3, "epochs": 1,
                                       "batch_size": 2, "max_length": 96,
                                       "trainer": {"train_sampling_strategy": "sequential"}, **settings})
    rows = method_rows(method, 2 if METHODS[method].data == "unpaired" else 4)
    return context(tmp_path, spec, examples=rows)


@pytest.mark.parametrize("method, settings", [("sft", {}), ("sft", {"packing": True, "max_length": 256}),
                                              ("dpo", {"precompute_ref_log_probs": False}),
                                              ("kto", {}), ("orpo", {}), ("simpo", {})])
def test_real_and_padded_tokens_per_method_family(tmp_path, trainers, method, settings):
    ctx = one_epoch(tmp_path, method, **settings)
    cost = run_stage(ctx).cost
    dataset = trainers[-1].train_dataset
    packed = settings.get("packing", False)
    assert len(dataset) < 4 if packed else len(dataset) == 4
    real, padded = expected_counts("sft-packed" if packed else method, dataset)
    assert (cost["tokens_real"], cost["tokens_padded"]) == (real, padded)
    assert real == padded if packed else real < padded   # the rows differ in length: pads counted apart
    if packed:   # attention within each packed conversation (position ids restart), not across the row
        shape = model_shape(trainers[-1].model)
        squares = sum(n * n for row in dataset["seq_lengths"] for n in row)
        assert cost["model_flops"] == 6 * shape.params * real + 12 * shape.layers * shape.attention_width * squares
    assert cost["tokens_real"] == cost["train_tokens"]
    assert cost["tokens_per_s_real"] == pytest.approx(real / cost["train_runtime_s"], rel=1e-3)
    if method == "dpo":   # the frozen reference scored every trained sequence, without gradients
        assert trainers[-1].ref_model is not None
    # On CPU there is no peak to measure against: MFU is null, written as such.
    assert cost["mfu"] is None and cost["device_name"] == "cpu" and cost["world_size"] == 1
    assert cost["peak_memory_reserved_mb"] is None and cost["peak_memory_kind"] == "peak_rss_during_stage"
    assert "mfu" in json.loads(json.dumps(Cost.from_json(cost).to_json()))


def test_stage_mfu_uses_the_device_peak_and_counts_reference_forwards(tmp_path, trainers, monkeypatch):
    monkeypatch.setattr("posttrain.telemetry.peak_flops", lambda name, dtype: 1e9)
    ctx = one_epoch(tmp_path, "dpo", precompute_ref_log_probs=False)
    cost = run_stage(ctx).cost
    shape = model_shape(trainers[-1].model)
    attention = 12 * shape.layers * shape.attention_width
    real = cost["tokens_real"]
    # Every trained sequence was also scored by the frozen reference: 6N + 2N per token.
    assert cost["model_flops"] > 8 * shape.params * real
    assert cost["model_flops"] < (8 * shape.params + 4 / 3 * attention * 96) * real
    assert cost["mfu"] == pytest.approx(cost["model_flops"] / cost["train_runtime_s"] / 1e9, rel=1e-3, abs=1e-4)


# ----------------------------------------------------------------------------- records and report


OLD_COST = {"optimizer_steps": 4, "examples_seen": 32, "train_tokens": 1802, "forward_passes": 32,
            "backward_passes": 32, "wall_s": 2.04, "resumed_from_step": None, "peak_memory_mb": 557.3,
            "peak_memory_kind": "peak_rss_during_stage"}


def measured(real, padded, runtime, flops=None, peak=None, world=1) -> Cost:
    return Cost(train_tokens=real, tokens_real=real, tokens_padded=padded, train_runtime_s=runtime,
                tokens_per_s_real=real / runtime, tokens_per_s_padded=padded / runtime, model_flops=flops,
                peak_flops_per_device=peak, mfu=flops / runtime / peak / world if peak else None, world_size=world)


def test_an_old_cost_reads_without_throughput_and_writes_back_unchanged():
    cost = Cost.from_json(OLD_COST)
    assert cost.tokens_per_s_real is None and cost.mfu is None and cost.world_size is None
    assert cost.to_json() == OLD_COST
    record = {"stage": "sft", "seed": 0, "key": "a" * 64, "chain": ["sft"], "adapter": False, "cost": OLD_COST,
              "metrics": {}}
    assert StageRecord.from_json(record).cost.peak_memory_reserved_mb is None


def test_a_pipelines_throughput_is_over_its_stages_summed_time():
    sft, dpo = measured(300, 400, 1.0, 6e9, 1e12), measured(100, 200, 1.0, 2e9, 1e12, world=2)
    out = pipeline_throughput([sft, dpo])
    assert out["tokens_per_s_real"] == 200 and out["tokens_per_s_padded"] == 300 and out["world_size"] == 2
    assert out["mfu"] == pytest.approx(8e9 / (1e12 + 2e12))
    assert pipeline_throughput([sft, measured(100, 200, 1.0)])["mfu"] is None      # a stage on CPU
    assert pipeline_throughput([sft, Cost.from_json(OLD_COST)]) == dict.fromkeys(out)  # a stage never measured


def test_the_cost_table_shows_throughput_and_na():
    report = {"pipelines": [
        {"name": "sft", "cost": {**OLD_COST, "tokens_per_s_real": 12345.6, "tokens_per_s_padded": 15000.2,
                                 "mfu": 0.2512, "world_size": 8}},
        {"name": "old", "cost": {**OLD_COST, "tokens_per_s_real": None, "mfu": None}}]}
    table = cost_table(report)
    labels = [column.label for column in table.columns]
    assert labels[-4:] == ["tokens/s (real)", "tokens/s (padded)", "MFU", "world size"]
    sft, old = table.text_rows()
    assert sft[-4:] == ["12,346", "15,000", "25.1%", "8"]
    assert old[-4:] == ["n/a"] * 4
