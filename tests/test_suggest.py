"""Unknown recipe keys say where they probably belong: close spellings, and the names
TRL / transformers / alignment-handbook configs use (a pasted handbook config)."""

from click.testing import CliRunner

from posttrain.cli import main

HANDBOOK_KEYS = """
name: hb
model: {name: builtin:micro-llama, torch_dtype: bfloat16, lora: {r: 8, lora_alpha: 16}}
data:
  d: {source: builtin:skills-preferences, splt: train}
stages:
  sft: {method: sft, data: d, learning_rate: 1.0e-4, num_train_epochs: 1, per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2, max_seq_length: 512, lerning_rate: 1, lr_scheduler_type: cosine}
  dpo: {method: dpo, data: d, learning_rate: 1.0e-4, bta: 0.1}
pipelines: {a: [sft, dpo]}
eval: {tasks: [arc_easy], limt: 3}
output_dir: x
"""


def test_handbook_and_misspelt_keys_get_did_you_mean(tmp_path):
    recipe = tmp_path / "hb.yaml"
    recipe.write_text(HANDBOOK_KEYS)
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    for expected in [
        "hb.yaml:3: model.lora.lora_alpha: unknown key; did you mean 'alpha'?",
        "hb.yaml:3: model.torch_dtype: unknown key; did you mean 'dtype'?",
        "hb.yaml:5: data.d.splt: unknown key; did you mean 'split'?",
        "hb.yaml:7: stages.sft.num_train_epochs: unknown key; did you mean 'epochs'?",
        "hb.yaml:7: stages.sft.per_device_train_batch_size: unknown key; did you mean 'batch_size'?",
        "hb.yaml:8: stages.sft.gradient_accumulation_steps: unknown key; did you mean 'gradient_accumulation'?",
        "hb.yaml:8: stages.sft.max_seq_length: unknown key; did you mean 'max_length'?",
        "hb.yaml:8: stages.sft.lerning_rate: unknown key; did you mean 'learning_rate'?",
        "hb.yaml:8: stages.sft.lr_scheduler_type: unknown key; did you mean 'scheduler'?",
        "hb.yaml:9: stages.dpo.bta: unknown key; did you mean 'beta'?",
        "hb.yaml:11: eval.limt: unknown key; did you mean 'limit'?",
        "hb.yaml:12: output_dir: unknown key; did you mean 'output.dir' or 'output'?",
    ]:
        assert expected in lines, (expected, result.output)


def test_a_key_with_no_likely_meaning_says_unknown_key_only(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HANDBOOK_KEYS.replace("output_dir: x", "zzqx: 1"))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert "hb.yaml:12: zzqx: unknown key\n" in result.output.replace("r.yaml", "hb.yaml").replace("  ", "")
