"""Each TRL stage on a micro model: masking, reference, parameters change, outputs."""

import json

import pytest
import torch

from posttrain.recipe.fields import LoraSpec
from posttrain.stages.dpo import DPO_LOSS_TYPES, DPOStage
from posttrain.stages.sft import SFTStage
from posttrain.data.builtin import instruction_rows, preference_rows
from posttrain.models import ModelSource, load_model_and_tokenizer
from posttrain.data.formats import to_kind
from posttrain.stages import METHODS, run_stage
from posttrain.stages.common import StageContext

MICRO = ModelSource(name="builtin:micro-llama")


def method_rows(method: str, n: int = 32) -> list[dict]:
    """n source rows in the kind the method trains on (pairs unpaired for KTO: 2n rows)."""
    kind = METHODS[method].data
    return instruction_rows("train", n) if kind == "instruction" else to_kind(preference_rows("train", n),
                                                                             "preference", kind)


def context(tmp_path, spec, start=MICRO, examples=None, lora=None, name="stage"):
    if examples is None:
        examples = method_rows(spec.method)
    out = tmp_path / name
    out.mkdir()
    return StageContext(name=name, spec=spec, seed=0, start=start, examples=examples, out_dir=out, lora=lora)


def sft_spec(**kw):
    return SFTStage(method="sft", data="d", learning_rate=1e-2, max_steps=3, batch_size=8, max_length=96, **kw)


def stage_spec(method, steps=3, lr=1e-2):
    """A tiny spec of each method: a few steps, short sequences."""
    return METHODS[method].settings(method=method, data="d", learning_rate=lr, max_steps=steps, batch_size=8,
                                    max_length=96)


def weights(source):
    model, _ = load_model_and_tokenizer(source)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, after):
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_sft_masks_prompt_tokens(tmp_path):
    from posttrain.stages.sft import build_trainer

    trainer, tokenizer = build_trainer(context(tmp_path, sft_spec()))
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        ids, labels = ids.tolist(), labels.tolist()
        text = tokenizer.decode(ids)
        trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
        # Only the reply and its end-of-turn token are trained; the prompt is masked.
        reply = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
        assert trained == reply + "<|im_end|>"
        assert "user" not in trained


@pytest.mark.parametrize("method", list(METHODS))
def test_cpu_unfriendly_trl_defaults_never_leak(tmp_path, method):
    import importlib

    spec = stage_spec(method, steps=1)
    trainer, _ = importlib.import_module(f"posttrain.stages.{method}").build_trainer(context(tmp_path, spec))
    assert trainer.args.bf16 is False and trainer.args.fp16 is False
    assert trainer.args.gradient_checkpointing is False
    assert trainer.args.report_to == [] and trainer.args.save_strategy == "no"


@pytest.mark.parametrize("method", list(METHODS))
def test_parameters_change_and_outputs_written(tmp_path, method):
    ctx = context(tmp_path, stage_spec(method))
    result = run_stage(ctx)
    after = weights(ModelSource(name=str(ctx.out_dir / "model")))
    assert changed(weights(MICRO), after), f"{method}: no parameter changed"
    assert result.cost["optimizer_steps"] == 3
    assert result.cost["train_tokens"] > 0
    assert result.metrics["loss"] > 0
    log = [json.loads(line) for line in (ctx.out_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in log)
    if method != "sft":
        assert "rewards/margins" in result.metrics


def sequence_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1:].sum().item()


def test_dpo_reference_is_the_sft_output(tmp_path):
    from posttrain.stages.dpo import build_trainer

    run_stage(context(tmp_path, sft_spec(), name="sft"))
    sft_source = ModelSource(name=str(tmp_path / "sft" / "model"))
    spec = DPOStage(method="dpo", data="d", learning_rate=1e-3, max_steps=2, batch_size=4, max_length=96,
                    precompute_ref_log_probs=True)
    trainer, _ = build_trainer(context(tmp_path, spec, start=sft_source, name="dpo"))
    row = trainer.train_dataset[0]
    sft_model, _ = load_model_and_tokenizer(sft_source)
    base_model, _ = load_model_and_tokenizer(MICRO)
    expected = sequence_logp(sft_model, row["prompt_ids"], row["chosen_ids"])
    assert row["ref_chosen_logps"] == pytest.approx(expected, abs=1e-3)
    assert sequence_logp(base_model, row["prompt_ids"], row["chosen_ids"]) != pytest.approx(expected, abs=1e-2)


def test_lora_sft_saves_adapter_and_dpo_reference_disables_it(tmp_path):
    from posttrain.stages.dpo import build_trainer

    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    result = run_stage(context(tmp_path, sft_spec(), lora=lora, name="sft"))
    assert result.adapter and (tmp_path / "sft" / "model" / "adapter_config.json").is_file()
    merged = ModelSource(name="builtin:micro-llama", adapter_dirs=(str(tmp_path / "sft" / "model"),))
    assert changed(weights(MICRO), weights(merged)), "the merged adapter changed nothing"
    spec = DPOStage(method="dpo", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=96,
                    precompute_ref_log_probs=False)
    trainer, _ = build_trainer(context(tmp_path, spec, start=merged, lora=lora, name="dpo"))
    assert trainer.ref_model is None  # TRL disables the adapter: no second copy of the model
    assert hasattr(trainer.model, "disable_adapter")


def test_train_tokens_count_the_prompt_once_per_sequence():
    from datasets import Dataset

    from posttrain.stages.common import dataset_tokens

    pairs = Dataset.from_list([{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}])
    # DPO feeds prompt+chosen and prompt+rejected: 3+1 + 3+2 tokens, each cut at max_length.
    sequences = (("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids"))
    assert dataset_tokens(pairs, sequences, None).tokens == 9
    cut = dataset_tokens(pairs, sequences, 4)
    assert (cut.tokens, cut.over.tolist(), cut.at_limit.tolist()) == (4 + 4, [True], [True])


def cached_context(tmp_path, spec, name, seed=0, start_key="base-key"):
    from posttrain.cache import save_dataset

    ctx = context(tmp_path, spec, name=name)
    data_dir = save_dataset(ctx.examples, tmp_path / "datasets" / spec.method)
    return StageContext(name=name, spec=spec, seed=seed, start=MICRO, examples=ctx.examples, out_dir=ctx.out_dir,
                        dataset_dir=data_dir, start_key=start_key, reflogps_dir=tmp_path / "reflogps")


def test_tokenized_dataset_is_cached_across_seeds_and_settings(tmp_path):
    """The rows live on disk once; TRL's tokenization map is then served from `datasets`' cache."""
    import pyarrow as pa

    from posttrain.stages.sft import build_trainer

    folder = tmp_path / "datasets" / "sft"
    build_trainer(cached_context(tmp_path, sft_spec(), "a", seed=0))
    before = set(folder.glob("cache-*.arrow"))
    assert before  # the first build tokenized and cached its output beside the rows
    second, _ = build_trainer(cached_context(tmp_path, stage_spec("sft", steps=5, lr=1e-3), "b", seed=1))
    new = set(folder.glob("cache-*.arrow")) - before
    # Another seed and learning rate tokenize nothing again: at most a shuffle index is new.
    for path in new:
        with pa.memory_map(str(path)) as source:
            assert pa.ipc.open_stream(source).schema.names == ["indices"]
    assert len(second.train_dataset["input_ids"]) == 32


def test_reference_logps_are_computed_once_per_reference_and_pairs(tmp_path, monkeypatch):
    from trl import DPOTrainer

    from posttrain.stages.dpo import build_trainer

    calls = []
    original = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    spec = stage_spec("dpo")
    first, _ = build_trainer(cached_context(tmp_path, spec, "a"))
    computed = len(calls)
    assert computed > 0 and not first.reference_cached
    other_beta = DPOStage(**{**spec.model_dump(), "beta": 0.5, "learning_rate": 1e-3})
    second, _ = build_trainer(cached_context(tmp_path, other_beta, "b", seed=1))
    assert len(calls) == computed and second.reference_cached
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert second.train_dataset[column] == first.train_dataset[column]
        assert second.train_dataset.features[column] == first.train_dataset.features[column]
    # Another reference model: computed again.
    build_trainer(cached_context(tmp_path, spec, "c", start_key="other-reference"))
    assert len(calls) == 2 * computed


def test_stop_request_checkpoints_and_resume_matches_uninterrupted_with_lora(tmp_path):
    """The engine's hooks at stage level: stop at a step boundary, resume from that checkpoint.

    With LoRA (adapter weights, optimizer and scheduler restored by transformers);
    the resumed adapter equals the uninterrupted one within 1e-6.
    """
    from safetensors.torch import load_file

    from posttrain.cache import latest_checkpoint
    from posttrain.stages.common import CheckpointPolicy, StageInterrupted

    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    spec = stage_spec("sft", steps=6)

    def ctx(name, **hooks):
        base = context(tmp_path, spec, lora=lora, name=name)
        return StageContext(name=name, spec=spec, seed=0, start=MICRO, examples=base.examples, out_dir=base.out_dir,
                            lora=lora, checkpoint=CheckpointPolicy(every_steps=2), **hooks)

    straight = run_stage(ctx("straight"))
    steps_seen = []

    def stop_after_three():
        steps_seen.append(1)
        return len(steps_seen) >= 3

    with pytest.raises(StageInterrupted) as stopped:
        run_stage(ctx("stopped", stop_requested=stop_after_three))
    assert stopped.value.step == 3 and stopped.value.max_steps == 6
    checkpoint = latest_checkpoint(tmp_path / "stopped" / "trainer")
    assert checkpoint.name == "checkpoint-3"
    resumed_ctx = ctx("resumed", resume_from=checkpoint)
    resumed = run_stage(resumed_ctx)
    assert resumed.cost["resumed_from_step"] == 3 and resumed.cost["optimizer_steps"] == 6
    a = load_file(str(tmp_path / "straight" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-6)
    # The stage's mean loss covers all 6 steps, as uninterrupted (transformers' own
    # train_loss covers only the 3 after the resume).
    assert resumed.metrics["train_loss_mean"] == pytest.approx(straight.metrics["train_loss_mean"], rel=1e-6)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_accepted_dpo_loss_builds_a_trainer_and_a_finite_loss(tmp_path, loss_type):
    """Each loss_type the schema lists either works or is refused at validate, never later
    (exo_pair once passed validate and died when the trainer was built, after SFT)."""
    from pydantic import ValidationError

    from posttrain.stages.dpo import SMOOTHED_LOSSES, build_trainer

    fields = dict(method="dpo", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=96,
                  loss_type=loss_type, precompute_ref_log_probs=False)
    if loss_type == "exo_pair":   # TRL refuses it at label_smoothing 0 when the trainer is built
        with pytest.raises(ValidationError, match="exo_pair needs label smoothing: set label_smoothing > 0"):
            DPOStage(**fields)
        fields["label_smoothing"] = 1e-3
    elif loss_type in SMOOTHED_LOSSES:
        fields["label_smoothing"] = 0.1
    elif loss_type == "discopop":
        fields["discopop_tau"] = 0.1
    trainer, _ = build_trainer(context(tmp_path, DPOStage(**fields), examples=preference_rows("train", 8)))
    assert trainer.loss_types == [loss_type]
    assert trainer.label_smoothing == fields.get("label_smoothing", 0.0)
    assert trainer.args.discopop_tau == fields.get("discopop_tau", 0.05)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss), loss
