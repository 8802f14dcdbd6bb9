"""Log-probabilities of replies under a model: held-out preference pairs.

For each pair, does the model give the chosen reply a higher log-probability than
the rejected one, and by how much? Evaluated the same way for every pipeline (the
base model included), through the one chat template.
"""

from __future__ import annotations


def reply_token_ids(tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the templated prompt and of the reply that follows it."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently with and without the reply")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt_text), encode(full_text[len(prompt_text):])


def sequence_logps(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Sum of log p(reply tokens | prompt) for each (prompt ids, reply ids)."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        reply_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (prompt_ids, reply_ids) in enumerate(batch):
            n = len(prompt_ids) + len(reply_ids)
            ids[row, :n] = torch.tensor(prompt_ids + reply_ids)
            mask[row, :n] = 1
            reply_mask[row, len(prompt_ids):n] = True
        ids, mask, reply_mask = ids.to(device), mask.to(device), reply_mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = logits.log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
        out += (token_logps * reply_mask[:, 1:]).sum(-1).tolist()
    return out


def preference_records(model, tokenizer, examples: list[dict], batch_size: int = 32) -> list[dict]:
    """One record per pair: chosen/rejected log-probs, margin, and whether chosen wins."""
    chosen = [reply_token_ids(tokenizer, e["prompt"], e["chosen"]) for e in examples]
    rejected = [reply_token_ids(tokenizer, e["prompt"], e["rejected"]) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen_logps = sequence_logps(model, chosen, pad_id, batch_size)
    rejected_logps = sequence_logps(model, rejected, pad_id, batch_size)
    return [{"doc_id": i, "chosen_logp": c, "rejected_logp": r, "margin": c - r, "pref_acc": float(c > r)}
            for i, (c, r) in enumerate(zip(chosen_logps, rejected_logps))]
