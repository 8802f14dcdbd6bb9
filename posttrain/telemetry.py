"""Throughput telemetry of a training stage: tokens/s (real and padded) and model FLOPs
utilisation (MFU).

Tokens are counted where they are certain to have been trained: a forward pre-hook on
the policy model (and on a separate frozen reference) sees every batch exactly as the
trainer hands it to the model, whatever the method's collator did (DPO/ORPO/CPO/SimPO
concatenate chosen and rejected into one batch; KTO adds its KL batch; SFT may be
padding-free). A forward with gradients is a trained one; a forward without (a frozen
reference, KTO's KL sequences) costs FLOPs but trains no token. Only forwards while the
trainer trains count (between `on_train_begin` and `on_train_end`, policy in train mode):
evaluation and reference log-probs precomputed before training do not. Under several
processes each counts its own batches; the counts are summed over the job at the end.

The MFU formula (PaLM, Chowdhery et al. 2022, appendix B):

    model FLOPs = sum over trained tokens of (6 N + 12 L A t)
                + sum over forward-only tokens of (2 N + 4 L A t)
    MFU         = model FLOPs / train_runtime / (peak FLOP/s per device x world size)

- N: the parameters every token multiplies: all of the model's parameters except the
  input embedding table (a lookup, no FLOPs), plus the LM head's matrix even when tied
  to the embeddings (it is a matmul per token). With LoRA, N is the base model's plus
  the adapter's: 6N is the standard "model FLOPs" convention even though the frozen
  weights need no weight gradient (the achieved count is then ~4N; MFU would read ~2/3).
- The attention term is included: L layers, A = attention heads x head size, t the
  length of the token's own sequence (non-padding tokens only; causal masking is not
  discounted, as in PaLM). Forward-only tokens count one third of both terms.
- Tokens: real (non-padding) tokens only; padding is wasted work, not model FLOPs.
- train_runtime: the trainer's own training-loop time (`train_runtime`): it excludes
  loading the model, tokenising, and reference log-probs precomputed up front.
- Peak: the device's dense bf16/fp16 tensor-core FLOP/s from the vendor's datasheet
  (`PEAK_TFLOPS`). MFU is given only for bf16/fp16 training on a device in the table;
  float32 (whose peak depends on TF32 settings), CPU and unknown devices give None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense (no sparsity) bf16 = fp16 tensor-core peak per device, TFLOP/s, from NVIDIA's
# datasheets; matched against torch.cuda.get_device_name() in this order (first wins).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),              # H200 SXM: the H100 SXM's tensor cores
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),              # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"B200", 2250.0),
    (r"A100", 312.0),              # SXM and PCIe, 40 and 80 GB
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bA10\b", 125.0),           # A10; the A10G (AWS) has no public datasheet: not listed
    (r"\bL4\b", 121.0),
    (r"\bA30\b", 165.0),
    (r"\bA40\b", 150.0),
)
MFU_PRECISIONS = ("bfloat16", "float16")


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """The device's peak FLOP/s for training in `dtype` (None: CPU, float32, unknown)."""
    if not device_name or dtype not in MFU_PRECISIONS:
        return None
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class ModelShape:
    params: int           # N: parameters a token multiplies (see the module's docstring)
    layers: int           # L
    attention_width: int  # A: attention heads x head size

    def flops(self, counts: "TokenCounts") -> float:
        """Model FLOPs of the counted forwards (the formula in the module's docstring)."""
        attention = 12 * self.layers * self.attention_width
        trained = 6 * self.params * counts.real + attention * counts.real_squared
        forward_only = 2 * self.params * counts.forward_only + attention / 3 * counts.forward_only_squared
        return float(trained + forward_only)


def model_shape(model) -> ModelShape:
    """N, L and A of a (possibly peft-wrapped) causal LM."""
    config = model.config
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    table = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    params = sum(size(p) for p in model.parameters() if id(p) not in table)
    if head is not None:
        weight = getattr(head, "weight", None)
        if weight is not None and id(weight) in table:   # tied: the head's matmul still counts
            params += size(weight)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(int(params), int(config.num_hidden_layers), int(heads * head_dim))


def size(parameter) -> int:
    """A parameter's full size: DeepSpeed ZeRO-3 leaves an empty local tensor and keeps
    the size in `ds_numel`; an FSDP2 DTensor's numel() is already the full one."""
    return int(getattr(parameter, "ds_numel", 0) or parameter.numel())


@dataclass(frozen=True)
class TokenCounts:
    real: int = 0                  # non-padding tokens of forwards with gradients (trained)
    padded: int = 0                # tokens of those batches, padding included
    real_squared: int = 0          # sum over their sequences of length^2 (attention term)
    forward_only: int = 0          # non-padding tokens of forwards without gradients
    forward_only_squared: int = 0


def batch_tokens(input_ids, attention_mask=None, position_ids=None):
    """(tokens in the batch, padding included; tensor [real tokens, sum over sequences of
    length^2]), computed on the batch's device without waiting for it (no host sync).

    A padded batch: a row's attention mask sums to its length. A padding-free batch
    (sequences packed into one row, no mask): position ids restart at 0 per sequence,
    and a sequence of length t has sum(2p + 1 for p < t) = t^2."""
    import torch

    padded = input_ids.numel()
    if attention_mask is not None and attention_mask.dim() == 2:
        lengths = attention_mask.sum(dim=1, dtype=torch.int64)
    elif position_ids is not None and position_ids.numel() == padded:
        positions = position_ids.to(torch.int64)
        return padded, torch.stack([torch.ones_like(positions).sum(), (2 * positions + 1).sum()])
    else:   # no mask, no positions: every row is one whole sequence
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[-1], dtype=torch.int64, device=input_ids.device)
    return padded, torch.stack([lengths.sum(), (lengths * lengths).sum()])


class TokenCounter:
    """Counts the tokens of the forwards of `policy` (and of `reference`, a separate frozen
    model) while training runs; `callback()` switches it on for the training loop.

    The sums stay on the model's device until read (`counts`): a read per step would make
    the host wait for the GPU at every forward."""

    def __init__(self, policy, reference=None):
        self.active = False
        self._policy = policy
        self._padded = 0
        self._trained = None       # tensor [real, real_squared]
        self._forward_only = None  # tensor [tokens, squared]
        self._counts = None        # TokenCounts once summed over the processes
        self._handles = [policy.register_forward_pre_hook(self._seen, with_kwargs=True)]
        if reference is not None and reference is not policy:
            self._handles.append(reference.register_forward_pre_hook(self._seen, with_kwargs=True))

    def _seen(self, module, args, kwargs):
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.active or not self._policy.training or input_ids is None:
            return None
        with torch.no_grad():
            padded, sums = batch_tokens(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        if torch.is_grad_enabled() and module is self._policy:
            self._padded += padded
            self._trained = sums if self._trained is None else self._trained + sums
        else:
            self._forward_only = sums if self._forward_only is None else self._forward_only + sums
        return None

    @property
    def counts(self) -> "TokenCounts":
        if self._counts is not None:
            return self._counts
        return TokenCounts(*[int(value) for value in self._local()])

    def _local(self):
        """[real, padded, real_squared, forward_only, forward_only_squared] as one tensor."""
        import torch

        device = next((t.device for t in (self._trained, self._forward_only) if t is not None), "cpu")
        zero = torch.zeros(2, dtype=torch.int64, device=device)
        trained = self._trained if self._trained is not None else zero
        forward_only = self._forward_only if self._forward_only is not None else zero
        return torch.stack([trained[0], torch.tensor(self._padded, device=device), trained[1],
                            forward_only[0], forward_only[1]]).to(torch.int64)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def callback(self, accelerator=None):
        """A TrainerCallback: counting on for the training loop; at its end (on every
        process) the counts are summed over the job's processes."""
        from transformers import TrainerCallback

        counter = self

        class CountTrainedTokens(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                counter.active = True

            def on_train_end(self, args, state, control, **kwargs):
                counter.active = False
                counter.sum_over_processes(accelerator)

        return CountTrainedTokens()

    def sum_over_processes(self, accelerator) -> None:
        """Every process calls this (a collective): the job's counts, from then on."""
        if accelerator is None or accelerator.num_processes <= 1:
            return
        local = self._local().to(accelerator.device)
        total = accelerator.reduce(local, reduction="sum")
        self._counts = TokenCounts(*[int(value) for value in total.tolist()])


def throughput(counts: TokenCounts, shape: ModelShape | None, runtime_s: float | None, world_size: int,
               peak_per_device: float | None) -> dict:
    """The Cost fields of throughput: tokens/s over the training loop's time, model FLOPs
    and MFU (None where unmeasured or without a known peak: never a guessed number)."""
    timed = bool(runtime_s) and runtime_s > 0
    flops = shape.flops(counts) if shape is not None else None
    mfu = None
    if timed and flops is not None and peak_per_device:
        mfu = flops / runtime_s / (peak_per_device * world_size)
    return dict(
        tokens_real=counts.real, tokens_padded=counts.padded,
        train_runtime_s=runtime_s if timed else None,   # as the trainer logs it (to 0.1 ms)
        tokens_per_s_real=round(counts.real / runtime_s, 1) if timed else None,
        tokens_per_s_padded=round(counts.padded / runtime_s, 1) if timed else None,
        model_flops=flops, peak_flops_per_device=peak_per_device,
        mfu=round(mfu, 4) if mfu is not None else None, world_size=world_size,
    )
