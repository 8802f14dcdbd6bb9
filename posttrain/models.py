"""Base model, tokenizer, chat template and LoRA: the one owner of model loading.

Every stage and the evaluation load models through this module so that one chat
template and one EOS token are used everywhere (template/EOS drift between SFT,
DPO and evaluation is a common silent bug). ``builtin:`` models are tiny Llamas
built from a config with a character-level tokenizer built in code, so everything
runs offline and deterministically.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ModelError

# ChatML with `{% generation %}` markers so TRL's `assistant_only_loss` can mask
# everything but assistant replies. `<|im_end|>` ends a turn and is the EOS token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END_OF_TURN = "<|im_end|>"
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

# Sizes of builtin models (Llama architecture). `tiny-llama` is the quickstart model:
# ~1M parameters, learns the quickstart skills in about a minute on 2 CPU cores.
BUILTIN_SIZES: dict[str, dict[str, int]] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4),
    "micro-llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2),
}
BUILTIN_MAX_POSITIONS = 512


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a recipe's model spec, or a trained stage's output."""

    name: str                      # builtin:<size>, a hub id, or a local directory
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    chat_template: str = "chatml"  # "chatml" (set by posttrain) or "model" (keep its own)
    adapter_dirs: tuple[str, ...] = ()  # LoRA adapters merged in order on top of `name`


def is_builtin(name: str) -> bool:
    return name.startswith("builtin:")


def build_char_tokenizer():
    """A deterministic character-level tokenizer: printable ASCII + ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(CHATML_SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own token; Fuse joins them back without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token=CHATML_END_OF_TURN,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=BUILTIN_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_builtin_model(name: str, tokenizer, dtype: str = "float32"):
    """Random-init Llama from a config; the same name always gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = name.removeprefix("builtin:")
    if size not in BUILTIN_SIZES:
        raise ModelError(f"unknown builtin model {name!r}; choose one of: "
                         + ", ".join(f"builtin:{s}" for s in BUILTIN_SIZES))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=BUILTIN_MAX_POSITIONS,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **BUILTIN_SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(torch_dtype(dtype))


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: ModelSource):
    if is_builtin(source.name):
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name, revision=source.revision, trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer for {source.name!r}: {exc}") from None
    return tokenizer


def apply_chat_template_choice(tokenizer, model, choice: str) -> None:
    """Install the recipe's chat template and make EOS agree with it.

    ``chatml``: ChatML is installed; `<|im_start|>`/`<|im_end|>` are added if the
    tokenizer lacks them (embeddings resized) and EOS becomes `<|im_end|>` for the
    tokenizer and generation config. ``model``: the tokenizer's own template is kept.
    Either way `check_template_eos` runs afterwards.
    """
    if choice == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = CHATML_END_OF_TURN
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    elif choice == "model":
        if not tokenizer.chat_template:
            raise ModelError("model.chat_template is 'model' but the tokenizer has no chat template; "
                             "use chat_template: chatml")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ModelError(f"unknown chat_template {choice!r} (use 'chatml' or 'model')")
    if model is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    check_template_eos(tokenizer)


def template_end_of_turn(tokenizer) -> str:
    """The text the chat template writes right after an assistant reply."""
    marker = "Zq7marker"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    return rendered.split(marker, 1)[1]


def check_template_eos(tokenizer) -> None:
    """Fail when the template ends assistant turns with something other than EOS.

    If they disagree, SFT teaches the model to end replies with a token that
    generation does not stop on (or the reverse), and replies run on at eval time.
    """
    after = template_end_of_turn(tokenizer).strip()
    eos = tokenizer.eos_token
    if eos is None or not after.startswith(eos):
        raise ModelError(
            f"chat template ends assistant turns with {after[:20]!r} but the tokenizer's EOS is {eos!r}; "
            "training and generation would disagree on where a reply ends. "
            "Use model.chat_template: chatml, or fix the tokenizer's eos_token.")


def template_has_generation_markers(tokenizer) -> bool:
    return "{% generation %}" in (tokenizer.chat_template or "") or "{%- generation %}" in (
        tokenizer.chat_template or "")


def load_model_and_tokenizer(source: ModelSource, device: str | None = None):
    """Load weights (builtin, hub id, local dir), merge adapters, set the chat template."""
    tokenizer = load_tokenizer(source)
    if is_builtin(source.name):
        model = build_builtin_model(source.name, tokenizer, source.dtype)
    else:
        model = _load_pretrained(source)
    if source.adapter_dirs:
        model = merge_adapters(model, source.adapter_dirs)
    apply_chat_template_choice(tokenizer, model, source.chat_template)
    if device:
        model = model.to(device)
    return model, tokenizer


def _load_pretrained(source: ModelSource):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source.name, revision=source.revision, dtype=torch_dtype(source.dtype),
            trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {source.name!r}: {exc}") from None


def merge_adapters(model, adapter_dirs: tuple[str, ...]):
    """Merge LoRA adapters in order: a stage after a LoRA stage starts from the merged model."""
    from peft import PeftModel

    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model


def lora_config(lora: Any):
    """peft LoraConfig from the recipe's LoRA settings (every field explicit)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
