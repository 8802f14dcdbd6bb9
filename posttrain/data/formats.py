"""Dataset layouts people download -> posttrain's two canonical forms.

Canonical forms (plain, JSON-serialisable dicts; TRL's conversational formats):

* instruction: ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- an optional
  leading system message, then user/assistant turns alternating, starting with a
  user turn and ending with an assistant turn.
* preference: ``{"prompt": [... ending with a user turn],
  "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``.
* unpaired: ``{"prompt": [... ending with a user turn], "completion": [{"role":
  "assistant", ...}], "label": true | false}`` -- one completion judged desirable or
  not (KTO's data; TRL's unpaired preference type).

Every converter either returns a canonical example or raises :class:`RowError` with a
short reason a user can act on; the loader (``posttrain.data.io``) adds file and line.
This module is pure Python on purpose: the recipe validator imports it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

Message = dict[str, str]
Example = dict[str, Any]


class RowError(ValueError):
    """One row cannot be converted; the message is the reason, without the place."""


class ToolCallRow(RowError):
    """The row calls tools or defines them. Not a bad row but a dataset posttrain cannot
    train on yet: the loader refuses the whole dataset (``TOOLS_UNSUPPORTED``), never
    only this row. The message says where in the row the tools are."""


INSTRUCTION = "instruction"
PREFERENCE = "preference"
UNPAIRED = "unpaired"

# format name -> kind. The order is the detection priority (see detect_format).
FORMATS: dict[str, str] = {
    "sharegpt_preference": PREFERENCE,
    "messages_preference": PREFERENCE,
    "hh": PREFERENCE,
    "preference": PREFERENCE,
    "unpaired": UNPAIRED,
    "messages": INSTRUCTION,
    "sharegpt": INSTRUCTION,
    "alpaca": INSTRUCTION,
    "prompt_completion": INSTRUCTION,
}

# Role names seen in the wild -> canonical role (OpenAI names, ShareGPT names).
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def kind_of(format_name: str) -> str:
    """``"instruction"``, ``"preference"`` or ``"unpaired"``: which stages a format can feed."""
    try:
        return FORMATS[format_name]
    except KeyError:
        raise ValueError(
            f'unknown data format "{format_name}" (known: {", ".join(sorted(FORMATS))})'
        ) from None


# --------------------------------------------------------------------------- fields


def _required_str(row: dict, key: str) -> str:
    """A non-empty string field; missing, wrong type and blank are distinct reasons."""
    value = row.get(key)
    if value is None:
        raise RowError(f'"{key}" is missing')
    if not isinstance(value, str):
        raise RowError(f'"{key}" must be a string, not {_type_name(value)}')
    if not value.strip():
        raise RowError(f'"{key}" is empty')
    return value


def _optional_str(row: dict, key: str) -> str:
    """An optional string field; absent, null and blank all mean "not given"."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f'"{key}" must be a string, not {_type_name(value)}')
    return value if value.strip() else ""


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- turns


def _message(turn: Any, field: str, index: int) -> Message:
    """One turn, written either ``{role, content}`` (OpenAI) or ``{from, value}`` (ShareGPT)."""
    where = f'"{field}" turn {index}'
    if not isinstance(turn, dict):
        raise RowError(f"{where} must be an object, not {_type_name(turn)}")
    role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
    raw_role = turn.get(role_key)
    if raw_role is None:
        raise RowError(f'{where} has no "role" (or "from")')
    role = ROLE_ALIASES.get(str(raw_role).strip().lower())
    if role is None:
        raise RowError(f'{where}: unknown role "{raw_role}"')
    content = turn.get(content_key)
    if isinstance(content, list):
        content = _text_parts(content, f"{where} ({role})")
    if not isinstance(content, str):
        got = "missing" if content is None else _type_name(content)
        raise RowError(f'{where} ({role}): "{content_key}" must be a string or a list of parts, got {got}')
    if not content.strip() and role != "system":
        raise RowError(f"{where} ({role}) is empty")
    _check_loss_weight(turn.get("loss_weight"), role, where)
    return {"role": role, "content": content}


def _text_parts(parts: list, where: str) -> str:
    """Content as typed parts: OpenAI ``{"type": "text", "text": ...}`` or LLaMA-Factory v1
    ``{"type": "text", "value": ...}``. Text parts are concatenated with no separator, as
    LLaMA-Factory and Hugging Face chat templates render them; any other part (an image,
    audio, a tool call, reasoning) is refused: posttrain trains text models, and dropping
    the part would train on a turn that no longer says what the data meant."""
    texts = []
    for j, part in enumerate(parts, 1):
        if not isinstance(part, dict):
            raise RowError(f"{where}: content part {j} must be an object, not {_type_name(part)}")
        kind = part.get("type")
        if kind != "text":
            what = f'of type "{kind}"' if kind is not None else 'without a "type"'
            raise RowError(f'{where}: content part {j} is {what}; posttrain trains text models '
                           'and reads only "text" parts')
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            got = "missing" if text is None else _type_name(text)
            raise RowError(f'{where}: content part {j} ("text") must hold a string in "text" or "value", got {got}')
        texts.append(text)
    return "".join(texts)


def _check_loss_weight(weight: Any, role: str, where: str) -> None:
    """LLaMA-Factory v1 gives each turn a ``loss_weight``: 1 on replies, 0 on the rest by
    default. posttrain trains assistant replies and never the prompt, so any other weight
    would be ignored, silently changing what is learned: refused instead."""
    if weight is None:
        return
    expected = 1.0 if role == "assistant" else 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != expected:
        raise RowError(f'{where} ({role}): "loss_weight" {weight!r} is not supported; posttrain does '
                       "not weight turns (it reads 1 on assistant turns and 0 on others, the defaults)")


def _messages(value: Any, field: str) -> list[Message]:
    """A list of turns -> canonical messages; blank system messages are dropped."""
    if value is None:
        raise RowError(f'"{field}" is missing')
    if not isinstance(value, list):
        raise RowError(f'"{field}" must be a list, not {_type_name(value)}')
    messages = [_message(turn, field, i) for i, turn in enumerate(value, 1)]
    return [m for m in messages if m["role"] != "system" or m["content"].strip()]


def _with_system(system: str, messages: list[Message]) -> list[Message]:
    """Prepend a top-level ``system`` field (LLaMA-Factory layouts) when one is given."""
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        raise RowError('both a "system" field and a system message are given')
    return [{"role": "system", "content": system}] + messages


def _check_order(messages: list[Message], ends_with: str, field: str) -> None:
    """Optional system first, then user/assistant alternating from a user turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RowError(f'"{field}" has no user turn')
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + 1 + (len(messages) - len(body))
            if message["role"] == "system":
                raise RowError(f'"{field}": a system message must come first (turn {position})')
            raise RowError(
                f'"{field}" turn {position}: expected {expected}, got {message["role"]} '
                "(turns must alternate user/assistant)"
            )
    if body[-1]["role"] != ends_with:
        if ends_with == "assistant":
            raise RowError(f'"{field}": conversation ends on a user turn (no reply to learn)')
        raise RowError(f'"{field}" must end with a user turn (it is the prompt)')


def _conversation(messages: list[Message], field: str) -> Example:
    _check_order(messages, "assistant", field)
    return {"messages": messages}


# --------------------------------------------------------------------------- instruction


def _from_alpaca(row: dict) -> Example:
    """LLaMA-Factory alpaca: instruction (+ input joined by a newline), output, system, history."""
    instruction = _required_str(row, "instruction")
    extra_input = _optional_str(row, "input")
    output = _required_str(row, "output")
    messages = _with_system(_optional_str(row, "system"), _alpaca_history(row.get("history")))
    user = f"{instruction}\n{extra_input}" if extra_input else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _conversation(messages, "instruction")


def _alpaca_history(history: Any) -> list[Message]:
    """``history`` is a list of ``[instruction, response]`` pairs that come before the row."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError(f'"history" must be a list, not {_type_name(history)}')
    messages: list[Message] = []
    for i, pair in enumerate(history, 1):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(text, str) and text.strip() for text in pair)):
            raise RowError(f'"history" item {i} must be a pair of non-empty strings')
        messages += [{"role": "user", "content": pair[0]},
                     {"role": "assistant", "content": pair[1]}]
    return messages


def _from_messages(row: dict) -> Example:
    turns = _messages(row.get("messages"), "messages")
    return _conversation(_with_system(_optional_str(row, "system"), turns), "messages")


def _from_sharegpt(row: dict) -> Example:
    turns = _messages(row.get("conversations"), "conversations")
    return _conversation(_with_system(_optional_str(row, "system"), turns), "conversations")


def _text_or_messages(value: Any, field: str, role: str) -> list[Message]:
    """A plain string means one turn of ``role``; a list is a list of turns."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f'"{field}" is empty')
        return [{"role": role, "content": value}]
    if value is None:
        raise RowError(f'"{field}" is missing')
    if not isinstance(value, list):
        raise RowError(f'"{field}" must be a string or a list of messages, not {_type_name(value)}')
    return _messages(value, field)


def _from_prompt_completion(row: dict) -> Example:
    prompt = _text_or_messages(row.get("prompt"), "prompt", "user")
    completion = _text_or_messages(row.get("completion"), "completion", "assistant")
    return _conversation(_with_system(_optional_str(row, "system"), prompt + completion), "prompt + completion")


# --------------------------------------------------------------------------- unpaired


def _from_unpaired(row: dict) -> Example:
    """A labelled completion: TRL's ``prompt``/``completion``/``label`` (strings or message
    lists), or a whole conversation in ``messages`` whose last reply is judged by ``label``."""
    label = row.get("label")
    if not isinstance(label, bool):
        got = "missing" if label is None else _type_name(label)
        raise RowError(f'"label" must be true (desirable) or false (undesirable), got {got}')
    if "messages" in row and "completion" not in row:
        messages = _from_messages(row)["messages"]
    else:
        messages = _from_prompt_completion(row)["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": label}


# --------------------------------------------------------------------------- preference


def _split_preference(chosen: list[Message], rejected: list[Message],
                      fields: tuple[str, str] = ("chosen", "rejected")) -> Example:
    """Two full conversations -> shared prompt + the two final assistant replies.

    Both must be valid conversations ending on an assistant turn, and everything
    before their final replies must be identical (that is the prompt both answer).
    """
    _check_order(chosen, "assistant", fields[0])
    _check_order(rejected, "assistant", fields[1])
    if chosen[:-1] != rejected[:-1]:
        raise RowError(f"{fields[0]} and {fields[1]} have different prompts")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _strip_prompt(reply: list[Message], prompt: list[Message]) -> list[Message]:
    """Chosen/rejected may repeat the whole conversation; keep only what follows the prompt."""
    if prompt and reply[: len(prompt)] == prompt:
        return reply[len(prompt):]
    return reply


def _from_preference(row: dict) -> Example:
    """TRL preference: prompt (optional: implicit in full conversations), chosen, rejected."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError(f'"{key}" is missing')
    prompt: list[Message] = []
    if row.get("prompt") is not None:
        prompt = _text_or_messages(row["prompt"], "prompt", "user")
    elif isinstance(row["chosen"], str):
        raise RowError('"prompt" is missing (chosen/rejected are plain replies)')
    chosen = _strip_prompt(_text_or_messages(row["chosen"], "chosen", "assistant"), prompt)
    rejected = _strip_prompt(_text_or_messages(row["rejected"], "rejected", "assistant"), prompt)
    system = _optional_str(row, "system")
    return _split_preference(_with_system(system, prompt + chosen),
                             _with_system(system, prompt + rejected)) | _scores(row)


def _scores(row: dict) -> dict[str, float]:
    """Optional ``score_chosen``/``score_rejected`` (UltraFeedback-binarized), kept for curation.

    Curation's ``min_score_margin`` needs them; absent or null means "no score".
    """
    scores = {}
    for key in ("score_chosen", "score_rejected"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RowError(f'"{key}" must be a number, not {_type_name(value)}')
        scores[key] = float(value)
    return scores


def _from_sharegpt_preference(row: dict) -> Example:
    """LLaMA-Factory dpo layout: ``conversations`` is the prompt, chosen/rejected one turn each."""
    prompt = _with_system(_optional_str(row, "system"),
                          _messages(row.get("conversations"), "conversations"))
    _check_order(prompt, "user", "conversations")
    replies = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        turns = _text_or_messages([value] if isinstance(value, dict) else value, key, "assistant")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError(f'"{key}" must be a single assistant turn')
        replies[key] = turns
    return {"prompt": prompt, "chosen": replies["chosen"], "rejected": replies["rejected"]} | _scores(row)


def _from_messages_preference(row: dict) -> Example:
    """LLaMA-Factory v1 DPO layout: ``chosen_messages`` / ``rejected_messages``, each a full
    conversation (prompt and reply), or only the replies after a prompt given in ``prompt``
    or ``messages`` (the prompt is stripped when the conversations repeat it)."""
    given = [key for key in ("prompt", "messages") if row.get(key) is not None]
    if len(given) == 2:
        raise RowError('both "prompt" and "messages" are given; which one is the prompt?')
    prompt: list[Message] = []
    if given:
        prompt = _text_or_messages(row[given[0]], given[0], "user")
        _check_order(prompt, "user", given[0])
    system = _optional_str(row, "system")
    sides = []
    for key in ("chosen_messages", "rejected_messages"):
        sides.append(_with_system(system, prompt + _strip_prompt(_messages(row.get(key), key), prompt)))
    return _split_preference(*sides, fields=("chosen_messages", "rejected_messages")) | _scores(row)


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(transcript: Any, field: str) -> list[Message]:
    """Split an Anthropic HH transcript on its ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers."""
    if transcript is None:
        raise RowError(f'"{field}" is missing')
    if not isinstance(transcript, str):
        raise RowError(f'"{field}" must be a string transcript, not {_type_name(transcript)}')
    # Some releases drop the leading blank line; restore it so the first marker splits.
    if transcript.startswith(("Human:", "Assistant:")):
        transcript = "\n\n" + transcript
    parts = _HH_MARKER.split(transcript)
    if parts[0].strip() or len(parts) == 1:
        raise RowError(f'"{field}" does not start with "Human:"')
    messages = []
    for i, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        if not text.strip():
            raise RowError(f'"{field}" turn {i} ({speaker}) is empty')
        messages.append({"role": _HH_ROLES[speaker], "content": text.strip()})
    return messages


def _from_hh(row: dict) -> Example:
    return _split_preference(_hh_turns(row.get("chosen"), "chosen"),
                             _hh_turns(row.get("rejected"), "rejected"))


# --------------------------------------------------------------------------- public


_CONVERTERS: dict[str, Callable[[dict], Example]] = {
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "preference": _from_preference,
    "sharegpt_preference": _from_sharegpt_preference,
    "messages_preference": _from_messages_preference,
    "hh": _from_hh,
    "unpaired": _from_unpaired,
}


def convert_row(row: dict, fmt: str) -> Example:
    """One raw row in layout ``fmt`` -> its canonical example, or :class:`RowError`
    (:class:`ToolCallRow` for a row with tool calls or tools)."""
    kind_of(fmt)  # unknown format: ValueError naming the known ones
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, not {_type_name(row)}")
    _refuse_media(row)
    tools = tool_use(row)
    if tools is not None:
        raise ToolCallRow(tools)
    return _CONVERTERS[fmt](row)


MEDIA_COLUMNS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns


def _refuse_media(row: dict) -> None:
    """A row with images (videos, audios) refers to them from its text (``<image>``):
    training a text model on it without them would learn replies to a question it never
    saw, so such a row is refused rather than read without its media."""
    for key in MEDIA_COLUMNS:
        value = row.get(key)
        if value not in (None, "", []):
            count = f"{len(value)} given" if isinstance(value, list) else "given"
            raise RowError(f'"{key}" {count}; posttrain trains text models (a row with media is refused)')


# --------------------------------------------------------------------------- tools


# Where published data puts tools: LLaMA-Factory's sharegpt `tools` column (a JSON string)
# and OpenAI's `tools` (`functions` before 2023-11); turns with LLaMA-Factory's
# function_call/observation roles (v0 `function`), OpenAI's `tool` (`function` before) and
# Llama 3's `ipython`; assistant turns carrying OpenAI `tool_calls` (`function_call`); typed
# content parts of a tool call or result (LLaMA-Factory v1).
TOOL_COLUMNS = ("tools", "functions")
TOOL_ROLES = {"function_call", "observation", "function", "tool", "ipython"}
TOOL_TURN_KEYS = ("tool_calls", "function_call")
TOOL_PART_TYPES = {"tool_call", "tool_calls", "function_call", "tool_result", "tool_response"}

TOOLS_UNSUPPORTED = (
    "tool-call conversations (function_call/observation/tool turns, tool_calls, a tools column) "
    "are not supported yet: posttrain's chat templates have no tool-call format, and reading "
    "these rows without their calls and tools (or skipping only them) would train on "
    "conversations that no longer say what happened; remove those rows or use a dataset "
    "without tools")


def _given(value: Any) -> bool:
    """Whether a tools value holds anything (published data writes "[]" for none)."""
    if isinstance(value, str):
        return value.strip() not in ("", "[]", "{}", "null")
    return value is not None and value != [] and value != {}


def _tool_turn(turn: Any) -> str | None:
    """How one turn uses tools, or None."""
    if not isinstance(turn, dict):
        return None
    role = turn.get("role", turn.get("from"))
    if isinstance(role, str) and role.strip().lower() in TOOL_ROLES:
        return f'has the role "{role}"'
    for key in TOOL_TURN_KEYS:
        if _given(turn.get(key)):
            return f'has "{key}"'
    content = turn.get("content", turn.get("value"))
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") in TOOL_PART_TYPES:
            return f'has a "{part["type"]}" content part'
    return None


def tool_use(row: dict) -> str | None:
    """Where ``row`` defines or calls tools (a tools column, a tool turn), or None.

    Every layout is checked the same way: the top-level tools columns, then every turn
    of every list of turns (and single-turn objects such as sharegpt_preference's chosen).
    """
    for key in TOOL_COLUMNS:
        if _given(row.get(key)):
            return f'a "{key}" column'
    for field, value in row.items():
        turns = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        for i, turn in enumerate(turns, 1):
            found = _tool_turn(turn)
            if found:
                return f'"{field}" turn {i} {found}'
    return None


# --------------------------------------------------------------------------- columns


SCORE_COLUMNS = ("score_chosen", "score_rejected")
# The top-level columns each converter reads (media and tools columns are read by all:
# a row with them is refused).
COLUMNS_READ: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
    "prompt_completion": ("prompt", "completion", "system"),
    "preference": ("prompt", "chosen", "rejected", "system", *SCORE_COLUMNS),
    "sharegpt_preference": ("conversations", "chosen", "rejected", "system", *SCORE_COLUMNS),
    "messages_preference": ("prompt", "messages", "chosen_messages", "rejected_messages", "system",
                            *SCORE_COLUMNS),
    "hh": ("chosen", "rejected"),
    "unpaired": ("label", "prompt", "completion", "messages", "system"),
}


def ignored_columns(row: dict, fmt: str) -> list[str]:
    """The columns of ``row`` (with a value) that layout ``fmt`` does not read, sorted.

    Exact per row where the layout is: an unpaired row read as ``messages`` + ``label``
    ignores ``prompt``, one read as ``prompt`` + ``completion`` ignores ``messages``.
    """
    read = set(COLUMNS_READ[fmt]) | set(MEDIA_COLUMNS) | set(TOOL_COLUMNS)
    if fmt == "unpaired":
        read -= {"prompt", "completion"} if "messages" in row and "completion" not in row else {"messages"}
    return sorted(key for key, value in row.items() if key not in read and value is not None)


def preference_to_instruction(example: Example) -> Example:
    """Project a preference example onto SFT: the prompt followed by the chosen reply."""
    return {"messages": [dict(m) for m in example["prompt"] + example["chosen"]]}


# What a stage that trains on each kind needs, for messages.
KIND_NEEDS = {
    INSTRUCTION: "instruction data (conversations) or preference pairs (trained on the chosen reply)",
    PREFERENCE: "preference data (prompt, chosen, rejected)",
    UNPAIRED: "unpaired data (prompt, completion, boolean label) or preference pairs",
}


def can_feed(kind: str, wanted: str) -> bool:
    """Whether data of `kind` converts to what a stage training on `wanted` reads
    (`to_kind`): every kind feeds SFT, and pairs feed unpaired methods as TRL unpairs them."""
    return kind == wanted or wanted == INSTRUCTION or (wanted == UNPAIRED and kind == PREFERENCE)


def to_kind(examples: list[Example], kind: str, wanted: str) -> list[Example]:
    """Canonical examples of `kind` as a stage training on `wanted` reads them.

    - preference -> instruction: the prompt and the chosen reply;
    - unpaired -> instruction: the desirable completions only (an undesirable reply is
      not a demonstration);
    - preference -> unpaired: each pair becomes its chosen reply labelled desirable and
      its rejected reply labelled undesirable, as TRL's `unpair_preference_dataset`
      does (here in pair order: chosen, rejected, next pair; the KTO stage shuffles).
    Raises ValueError when `can_feed(kind, wanted)` is false.
    """
    if kind == wanted:
        return examples
    if not can_feed(kind, wanted):
        raise ValueError(f"needs {KIND_NEEDS[wanted]}, not {kind} data")
    return [out for example in examples for out in _converted(example, kind, wanted)]


def _converted(example: Example, kind: str, wanted: str) -> list[Example]:
    """One example of `kind` as `wanted` (zero, one or two examples; see `to_kind`)."""
    if wanted == INSTRUCTION and kind == PREFERENCE:
        return [preference_to_instruction(example)]
    if wanted == INSTRUCTION:
        messages = [dict(m) for m in example["prompt"] + example["completion"]]
        return [{"messages": messages}] if example["label"] else []
    return [{"prompt": [dict(m) for m in example["prompt"]], "completion": [dict(m) for m in example[side]],
             "label": side == "chosen"} for side in ("chosen", "rejected")]


def example_kind(example: Example) -> str:
    """The kind of one canonical example, from its keys."""
    if "chosen" in example:
        return PREFERENCE
    return UNPAIRED if "label" in example else INSTRUCTION


def as_kind(examples: list[Example], wanted: str) -> list[Example]:
    """Canonical examples of any kinds (a mix's parts may differ) as `wanted`, in order:
    `to_kind` applied to each. Raises ValueError naming the first kind that cannot feed it."""
    out: list[Example] = []
    for example in examples:
        kind = example_kind(example)
        out += [example] if kind == wanted else to_kind([example], kind, wanted)
    return out


def _looks_like_hh(row: dict) -> bool:
    chosen = row.get("chosen")
    return isinstance(chosen, str) and (
        "\n\nHuman:" in chosen or "\n\nAssistant:" in chosen or chosen.startswith("Human:")
    )


def _candidates(row: dict) -> list[str]:
    """Formats whose telltale keys this row has, most specific first.

    One key is enough (``instruction`` -> alpaca), so that a row missing ``output``
    is reported as such rather than as "unknown format".  Preference layouts come
    first because preference datasets often carry extra columns (UltraFeedback has
    ``messages`` next to ``prompt``/``chosen``/``rejected``).
    """
    keys = row.keys()
    found = []
    has_pair = not keys.isdisjoint(("chosen", "rejected", "chosen_messages", "rejected_messages"))
    if row.get("label") is not None and ("completion" in keys or "messages" in keys) and not has_pair:
        # A label judges the reply: never plain instruction data (a label that is not a
        # boolean is then refused with its reason, rather than dropped).
        return ["unpaired"]
    if "chosen_messages" in keys or "rejected_messages" in keys:
        found.append("messages_preference")
    elif "conversations" in keys and has_pair:
        found.append("sharegpt_preference")
    elif has_pair:
        found.append("hh" if "prompt" not in keys and _looks_like_hh(row) else "preference")
    if "messages" in keys:
        found.append("messages")
    if "conversations" in keys:
        found.append("sharegpt")
    if "instruction" in keys:
        found.append("alpaca")
    if "prompt" in keys and "completion" in keys:
        found.append("prompt_completion")
    return found


def detect_format(rows: list[dict]) -> str:
    """Guess the layout from the keys of the first rows (a majority vote over up to 20).

    A function of the rows only: each row votes for the most specific layout whose
    telltale keys it has, whichever stage reads the data (``to_kind`` then converts
    the examples to what that stage trains on).  Letting the stage break ties read
    LLaMA-Factory preference data (``conversations`` + ``chosen``/``rejected``) as
    plain ShareGPT in an SFT stage and rejected every row.
    """
    votes: Counter[str] = Counter()
    sample = [row for row in rows if isinstance(row, dict)][:20]
    for row in sample:
        found = _candidates(row)
        if found:
            votes[found[0]] += 1
    if not votes:
        keys = sorted({key for row in sample for key in row})
        raise ValueError(
            f"cannot tell the data format from its columns {keys or '(no rows)'}; "
            f'set format: to one of {", ".join(sorted(FORMATS))}'
        )
    return votes.most_common(1)[0][0]
