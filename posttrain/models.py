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
from pathlib import Path
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
    # "chatml" (set by posttrain), "model" (keep its own), or a Jinja template's text
    # (recipe.schema.ModelSpec.template_choice reads a template file).
    chat_template: str = "chatml"
    adapter_dirs: tuple[str, ...] = ()  # LoRA adapters merged in order on top of `name`
    quantization: tuple[tuple[str, Any], ...] = ()   # QLoRA: a QuantizationSpec's items (4-bit weights)
    attn_implementation: str | None = None          # None: transformers' default (sdpa where supported)

    @classmethod
    def of(cls, spec, name: str | None = None) -> "ModelSource":
        """A recipe's `model:` spec as a source; `name` another model with the same settings
        (an `external` entry: named, so no revision)."""
        return cls(name=name or spec.name, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                   revision=None if name else spec.revision, chat_template=spec.template_choice(),
                   quantization=tuple(spec.quantization.model_dump().items()) if spec.quantization else (),
                   attn_implementation=spec.attn_implementation)


@dataclass
class Loaded:
    """A loaded model and its chat tokenizer, with the ids of the tokens the chat template
    added to the tokenizer (their embedding rows are new: a LoRA stage trains them)."""

    model: Any
    tokenizer: Any
    added_token_ids: tuple[int, ...] = ()


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


def builtin_problem(name: str) -> str | None:
    """Why ``name`` (``builtin:<size>``) is not a builtin model, or None."""
    if name.removeprefix("builtin:") in BUILTIN_SIZES:
        return None
    return f"unknown builtin model {name!r}; choose one of: " + ", ".join(f"builtin:{s}" for s in BUILTIN_SIZES)


def builtin_config(name: str, tokenizer):
    """The LlamaConfig of a builtin model (its vocabulary is the tokenizer's)."""
    from transformers import LlamaConfig

    problem = builtin_problem(name)
    if problem:
        raise ModelError(problem)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=BUILTIN_MAX_POSITIONS,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **BUILTIN_SIZES[name.removeprefix("builtin:")],
    )


def build_builtin_model(name: str, tokenizer, dtype: str = "float32"):
    """Random-init Llama from a config; the same name always gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = builtin_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(torch_dtype(dtype))


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        resolve_precision(name).dtype]


@dataclass(frozen=True)
class Precision:
    """What a recipe's `model.dtype` means on a device."""

    dtype: str    # the weights' dtype: float32, bfloat16 or float16
    bf16: bool    # the trainer's bf16 mixed precision (TrainingArguments.bf16)


def resolve_precision(name: str, device: str | None = None, bf16_supported: bool | None = None) -> Precision:
    """`model.dtype` on `device` ("cuda" or "cpu"; None: this machine's). The one place
    `auto` is decided, for the weights, the trainer's bf16 and the stage key (a CPU
    float32 stage and a GPU bf16 stage are different stages): `auto` is bfloat16 on a
    GPU that supports it (one named from elsewhere, `plan --device cuda`, is taken to),
    else float32; an explicit dtype is itself. bf16 mixed precision runs on a GPU with
    bfloat16 weights, never on CPU (5-16x slower there). `bf16_supported`: the GPU's
    answer when known (defaults.Machine), instead of asking torch."""
    import torch

    on_gpu = torch.cuda.is_available() if device is None else device == "cuda"
    dtype = name
    if name == "auto":
        if bf16_supported is None:
            bf16_supported = device == "cuda" or (on_gpu and torch.cuda.is_bf16_supported())
        bf16_ok = on_gpu and bf16_supported
        dtype = "bfloat16" if bf16_ok else "float32"
    return Precision(dtype=dtype, bf16=on_gpu and dtype == "bfloat16")


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


def chat_tokenizer(source: ModelSource):
    """The tokenizer every stage trains with: the source's, with its chat template choice installed."""
    tokenizer = load_tokenizer(source)
    apply_chat_template_choice(tokenizer, None, source.chat_template)
    return tokenizer


def apply_chat_template_choice(tokenizer, model, choice: str) -> tuple[int, ...]:
    """Install the recipe's chat template and make EOS agree with it; the ids of the tokens
    added to the tokenizer (none unless `chatml` on a tokenizer without ChatML tokens).

    ``chatml``: ChatML is installed; `<|im_start|>`/`<|im_end|>` are added if the
    tokenizer lacks them (embeddings resized, new rows set to the mean row: the same
    weights at every load) and EOS becomes `<|im_end|>` for the tokenizer and
    generation config. ``model``: the tokenizer's own template is kept. A Jinja
    template's text is installed as it is; EOS becomes the token that ends its
    assistant turns when that is one token of the vocabulary (Llama-3's `<|eot_id|>`).
    Either way `check_template_eos` runs afterwards.
    """
    added: tuple[int, ...] = ()
    if choice == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
            added = tuple(tokenizer.convert_tokens_to_ids(missing))
            if model is not None:
                grow_embeddings(model, len(tokenizer))
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = CHATML_END_OF_TURN
    elif choice == "model":
        if not tokenizer.chat_template:
            raise ModelError("model.chat_template is 'model' but the tokenizer has no chat template; "
                             "use chat_template: chatml, or give a Jinja template (a string or a .jinja file)")
    elif is_jinja(choice):
        tokenizer.chat_template = choice
        end = template_end_of_turn(tokenizer).strip()
        token = next((t for t in tokenizer.all_special_tokens if end.startswith(t)), None)
        if token is not None and token != tokenizer.eos_token:
            tokenizer.eos_token = token
    else:
        raise ModelError(f"unknown chat_template {choice[:40]!r} (use chatml, model, or a Jinja template)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    check_template_eos(tokenizer)
    return added


def is_jinja(choice: str) -> bool:
    """A chat_template value that is a template's text, not a name."""
    return "{{" in choice or "{%" in choice


def grow_embeddings(model, size: int) -> None:
    """Give the model `size` token rows (when it has fewer), each new input and output row
    set to the mean of the old ones: deterministic, so every load of a model whose
    tokenizer gained tokens has the same weights (transformers' default samples them)."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if size <= rows:
        return    # the vocabulary is padded (Qwen): the rows exist already
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            weight = layer.weight
            weight[rows:] = weight[:rows].mean(dim=0, keepdim=True)


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


def load_model(source: ModelSource, device: str | None = None) -> Loaded:
    """Load weights (builtin, hub id, local dir) and the chat tokenizer; install the chat
    template (adding its tokens and rows); then merge the adapters. This order is the
    training order: an adapter trained on a model with added tokens holds their rows."""
    tokenizer = load_tokenizer(source)
    if is_builtin(source.name):
        model = build_builtin_model(source.name, tokenizer, source.dtype)
        if source.attn_implementation:
            model.set_attn_implementation(source.attn_implementation)
    else:
        model = _load_pretrained(source)
    added = apply_chat_template_choice(tokenizer, model, source.chat_template)
    if source.adapter_dirs:
        model = merge_adapters(model, source.adapter_dirs)
    if device and not source.quantization:   # a 4-bit model is placed on its GPU when loaded
        model = model.to(device)
    return Loaded(model, tokenizer, added)


def load_model_and_tokenizer(source: ModelSource, device: str | None = None):
    loaded = load_model(source, device)
    return loaded.model, loaded.tokenizer


def _load_pretrained(source: ModelSource):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source.name, revision=source.revision, dtype=torch_dtype(source.dtype),
            trust_remote_code=source.trust_remote_code, **quantized_loading(source),
            **({"attn_implementation": source.attn_implementation} if source.attn_implementation else {}))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {source.name!r}: {exc}") from None


def quantized_loading(source: ModelSource) -> dict:
    """from_pretrained's settings for a QLoRA base: bitsandbytes 4-bit, on the current GPU
    (checks.quantization_problems refused the recipe before training without one)."""
    if not source.quantization:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    spec = dict(source.quantization)
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec["quant_type"], bnb_4bit_use_double_quant=spec["double_quant"],
        bnb_4bit_compute_dtype=torch_dtype(spec["compute_dtype"]), bnb_4bit_quant_storage=torch.uint8),
        "device_map": {"": torch.cuda.current_device()}}


def merge_adapters(model, adapter_dirs: tuple[str, ...]):
    """Merge LoRA adapters in order: a stage after a LoRA stage starts from the merged model."""
    from peft import PeftModel

    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model


def lora_config(lora: Any, model=None, trainable_token_ids: tuple[int, ...] = ()):
    """peft LoraConfig from the recipe's LoRA settings (every field explicit).

    `trainable_token_ids` (tokens the chat template added): their input and output
    embedding rows train beside the adapter (peft's trainable tokens; the output rows
    follow the input rows when the two are tied), and are saved in it. Without this a
    frozen mean-initialised `<|im_end|>` row means the model never learns to stop.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=token_rows(model, trainable_token_ids) if trainable_token_ids else None,
    )


def token_rows(model, ids: tuple[int, ...]) -> dict[str, list[int]]:
    """{embedding module name: ids} for the input embeddings and, when not tied to them,
    the output embeddings (the LM head)."""
    layers = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != layers[0].weight.data_ptr():
        layers.append(head)
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(layer)]: list(ids) for layer in layers}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checks before training
# Module types peft's LoRA can adapt (peft raises "Target module ... is not supported" for others).
LORA_MODULE_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "Conv1D")
SAMPLE_CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


def local_model_problem(name: str) -> str | None:
    """A model name written as a path (``/``, ``./``, ``../``, ``~``) must be a model folder.

    Checked without imports; relative paths are taken from the cwd, as transformers does.
    """
    if not name.startswith(("/", "./", "../", "~")):
        return None
    path = Path(name).expanduser().absolute()
    if not path.exists():
        return f"local model folder not found: {path}" + ("" if Path(name).expanduser().is_absolute()
                                                          else " (a relative path is taken from the cwd)")
    if not path.is_dir():
        return f"not a folder: {path} (a model is a folder with config.json and weights)"
    if not (path / "config.json").is_file():
        return f"not a model folder (no config.json): {path}"
    return None


def model_config(source: ModelSource, tokenizer=None):
    """The model's config without its weights (builtin, local folder or hub id, cache only offline)."""
    if is_builtin(source.name):
        return builtin_config(source.name, tokenizer if tokenizer is not None else build_char_tokenizer())
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.name, revision=source.revision,
                                          trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:   # the model's files
        if hub_offline() and not Path(source.name).expanduser().exists():
            raise ModelError(
                f"{source.name!r} is not in the local Hugging Face cache and the Hub is off (HF_HUB_OFFLINE), "
                f"nor a local model folder; run once online `huggingface-cli download {source.name}`, "
                "or name a local model folder") from None
        raise ModelError(f"cannot load model {source.name!r}: {exc}") from None


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are told to stay offline."""
    import os

    return any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def meta_model(config, trust_remote_code: bool = False):
    """The model's module tree on the meta device: names and types, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_target_problems(model, target_modules) -> list[tuple[int | None, str]]:
    """Which LoRA ``target_modules`` entries peft would refuse on ``model``: [(entry index, message)].

    Names match as peft matches a list (the module's full name, or its last dotted
    parts); a matched module must be a type LoRA can adapt. ``all-linear`` always fits.
    """
    if target_modules == "all-linear":
        return []
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = dict(model.named_modules())
    problems: list[tuple[int | None, str]] = []
    for i, target in enumerate(target_modules):
        matched = [name for name in modules if name and check_target_module_exists(
            LoraConfig(target_modules=[target]), name)]
        if not matched:
            problems.append((i, f"{target!r} matches no module of the model; {_module_names_hint(target, modules)}"))
            continue
        kinds = {type(modules[name]).__name__ for name in matched}
        if not kinds & set(LORA_MODULE_TYPES):
            problems.append((i, f"{target!r} matches only {', '.join(sorted(kinds))} modules, which LoRA cannot "
                                "adapt (it adapts Linear, Embedding and Conv layers)"))
    return problems


def _module_names_hint(target: str, modules: dict) -> str:
    import difflib

    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                     if name and type(module).__name__ in LORA_MODULE_TYPES and not name.rsplit(".", 1)[-1].isdigit()})
    close = difflib.get_close_matches(target, leaves, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"LoRA-able modules: {', '.join(leaves)} (or all-linear)"


def chat_template_problem(tokenizer, choice: str) -> str | None:
    """Install the recipe's template choice and render a sample conversation; why it fails, or None."""
    try:
        apply_chat_template_choice(tokenizer, None, choice)   # also checks that EOS ends a turn
        tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=True)
        tokenizer.apply_chat_template(SAMPLE_CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    except ModelError as exc:
        return str(exc)
    except Exception as exc:  # jinja2 errors, templates that raise on a role: the user's template
        return f"the chat template does not render a sample conversation: {type(exc).__name__}: {exc}"
    return None


def model_size(source: ModelSource, lora=None):
    """The model's size (distributed.ModelSize) from its config on the meta device: no
    weights are read. With `lora` (a LoraSpec), the trainable parameters are the adapter's:
    r x (in + out) for every adapted Linear (all-linear: every Linear but the LM head)."""
    from posttrain.distributed import ModelSize

    config = model_config(source)
    model = meta_model(config, source.trust_remote_code)
    params = count_parameters(model)
    hidden = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    if lora is None:
        return ModelSize(params, params, hidden, layers)
    return ModelSize(params, lora_parameters(model, lora), hidden, layers)


def lora_parameters(model, lora) -> int:
    """The parameters LoRA adds to `model` (a meta model): r x (in + out) per adapted Linear."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    head = model.get_output_embeddings()
    config = None if lora.target_modules == "all-linear" else LoraConfig(target_modules=list(lora.target_modules))
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if config is None or check_target_module_exists(config, name):
            total += lora.r * (module.in_features + module.out_features)
    return total
