"""Tiny recipes shared by the tests that run posttrain end to end (micro model, few steps)."""

import textwrap

TINY = """
name: tiny
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 64}
  prefs: {source: builtin:skills-preferences, limit: 64}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 96}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-3, max_steps: 2, batch_size: 8, max_length: 96}
  orpo: {method: orpo, data: prefs, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 96}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
  orpo: [orpo]
eval:
  tasks: [{repo}/evals/skills_mc.yaml, {repo}/evals/skills_exact.yaml]
  limit: 8
  preferences: {source: builtin:skills-preferences, split: test, limit: 16}
  samples: 3
report: {resamples: 200}
"""


def write_recipe(tmp_path, repo, text=TINY):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(text).replace("{repo}", str(repo)))
    return path
