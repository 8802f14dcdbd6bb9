"""Builtin model and tokenizer, chat template and the EOS agreement check."""

import subprocess
import sys

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models import (ModelSource, build_char_tokenizer, check_template_eos, load_model_and_tokenizer,
                              template_has_generation_markers)


def test_char_tokenizer_round_trips_and_keeps_chatml_specials_whole():
    tok = build_char_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": 'Count "abc".\nOk?'},
                                    {"role": "assistant", "content": "3"}], tokenize=False)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert tok.eos_token == "<|im_end|>" and template_has_generation_markers(tok)


def test_builtin_model_is_deterministic():
    first, _ = load_model_and_tokenizer(ModelSource(name="builtin:micro-llama"))
    second, _ = load_model_and_tokenizer(ModelSource(name="builtin:micro-llama"))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_template_eos_mismatch_is_a_clear_error():
    tok = build_char_tokenizer()
    tok.eos_token = "<|endoftext|>"  # template ends turns with <|im_end|>: they disagree
    with pytest.raises(ModelError, match="EOS is '<\\|endoftext\\|>'"):
        check_template_eos(tok)


def test_unknown_builtin_model():
    with pytest.raises(ModelError, match="unknown builtin model"):
        load_model_and_tokenizer(ModelSource(name="builtin:huge-llama"))


def test_python_dash_m_and_help_are_fast_and_light(repo):
    out = subprocess.run([sys.executable, "-m", "posttrain", "--help"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and "posttrain run" in out.stdout
