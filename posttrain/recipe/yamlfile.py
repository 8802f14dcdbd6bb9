"""Strict YAML loading with line lookup: recipes, and lm-eval task files (with tags).

One pass over PyYAML's parser events (libyaml's C parser when installed), no
recursion: duplicate keys are errors naming both lines, aliases and merge keys are
expanded into bounded copies (a "billion laughs" is refused in milliseconds), and
size, depth, encoding and document count are checked. Every key path gets its line,
so errors read `recipe.yaml:12: stages.dpo.beta: ...`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import yaml

from posttrain.errors import PosttrainError, RecipeError


def dotted(loc: tuple) -> str:
    """A key path as people write it: `stages.dpo.beta`, `eval.tasks[1]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Limits that keep loading (and so `validate`) fast and small on any input. Recipes are
# a few KB, nest < 10 levels and share a block or two by alias; the limits are far above.
YAML_MAX_BYTES = 1_000_000       # a larger file is refused unread (validate stays < 1 s)
YAML_MAX_DEPTH = 100             # nesting levels, aliases included (libyaml's own limit: 1000)
YAML_MAX_ALIAS_NODES = 100_000   # nodes all aliases together may add: an alias bomb is refused
# Python refuses to convert a decimal string of more than 4,300 digits (a ValueError, the
# traceback a reviewer saw); no setting takes a number of more than 10 digits (config.INT_MAX).
YAML_MAX_INT_DIGITS = 100
_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_CORE + name for name in ("null", "bool", "int", "float", "str", "binary", "timestamp")}
YamlTags = dict[str, Callable[[Any], Any]]


class _YamlRefusal(Exception):
    """A document strict_yaml_load stops at: (1-based line or None, message)."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def strict_yaml_load(text: str | bytes, where: str, tags: YamlTags | None = None,
                     error: type[PosttrainError] = RecipeError) -> tuple[Any, dict[tuple, int]]:
    """Safe-load one YAML document strictly: (data, lines).

    `lines` maps each key path (and list item) to its 1-based line, as error messages
    want them (`recipe.yaml:12: stages.dpo.beta: ...`). Refused, with `error` naming
    `where` and the line: text that is not UTF-8 or over YAML_MAX_BYTES, invalid YAML,
    several documents, nesting deeper than YAML_MAX_DEPTH, aliases adding more than
    YAML_MAX_ALIAS_NODES nodes (a "billion laughs"), an alias inside its own anchor,
    and, all reported at once, duplicate keys (YAML would silently keep the last one).

    Aliases and merge keys (`<<: *defaults`) are expanded into copies, so changing one
    place never changes another. `tags` maps a local tag (lm-eval's `!function`) to a
    function of the tagged value (a string, list or dict); any other tag is refused.
    """
    text = _yaml_text(text, where, error)
    try:
        loaded = _load_events(text, tags or {})
    except _YamlRefusal as refusal:
        place = f"{where}:{refusal.line}" if refusal.line else where
        raise error(f"{place}: {refusal.message}{_jinja_hint(text, refusal.line)}") from None
    if loaded.problems:
        raise problems_error(where, [f"{where}:{line}: {message}{_jinja_hint(text, line)}"
                                     for line, message in loaded.problems], error=error)
    return loaded.root, dict(loaded.log)


def _jinja_hint(text: str, line: int | None) -> str:
    """How to write Jinja in YAML, when the offending line holds some: unquoted, `{{ x }}` is
    a YAML mapping and `{% ... %}` no YAML at all (a chat template pasted as is)."""
    lines = text.splitlines()
    if line is None or not 0 < line <= len(lines) or not re.search(r"\{\{|\{%", lines[line - 1]):
        return ""
    return ("; a Jinja template in YAML needs quotes ('{{ ... }}', with ' doubled inside) or a block "
            "scalar (key: | and the template on the next lines, indented)")


def _yaml_text(text: str | bytes, where: str, error: type[PosttrainError]) -> str:
    # A str of more than YAML_MAX_BYTES characters has more bytes still: not encoded to count.
    size = len(text) if isinstance(text, bytes) or len(text) > YAML_MAX_BYTES else len(text.encode("utf-8", "replace"))
    if size > YAML_MAX_BYTES:
        raise error(f"{where}: over {YAML_MAX_BYTES:,} bytes; a YAML file here is at most that")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text.count(b"\n", 0, exc.start) + 1
            raise error(f"{where}:{line}: not UTF-8 text (byte 0x{text[exc.start]:02x} at offset "
                        f"{exc.start}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _load_events(text: str, tags: YamlTags) -> "_EventLoader":
    """Run _EventLoader over libyaml's events; refusals raise _YamlRefusal."""
    loader = _EventLoader(tags)
    parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        handlers = loader.handlers
        while not isinstance(event := parser.get_event(), yaml.StreamEndEvent):
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = min(mark.line + 1, text.count("\n") + 1) if mark else None
        raise _YamlRefusal(line, "not valid YAML: " + " ".join(filter(None, (exc.context, exc.problem)))) from None
    except yaml.YAMLError as exc:  # a reader error: a character YAML does not allow
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        raise _YamlRefusal(line, "not valid YAML: " + str(exc).splitlines()[0]) from None
    finally:
        parser.dispose()
    return loader


# PyYAML's implicit scalar types (int, float, bool, null, timestamp, merge) by first
# character, as yaml.resolver.Resolver.resolve finds them (it is slow per call).
_IMPLICIT = {first: [*resolvers, *yaml.resolver.Resolver.yaml_implicit_resolvers.get(None, [])]
             for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}
_PENDING, _NO_KEY, _MERGE = object(), object(), object()  # key states of an open mapping
# Numbers that mean the same to Python as to YAML 1.1 (no octal 0755, no 1_000, no 1:30).
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\.[0-9]*(?:[eE][-+][0-9]+)?")


class _Open:
    """A list or mapping being read: its value so far and what the budgets need."""

    __slots__ = ("value", "tag", "path", "line", "anchor", "log_start", "key", "key_line", "key_lines", "merges",
                 "size", "height", "is_key")

    def __init__(self, value, tag: str, path: tuple, line: int, anchor: str | None, log_start: int, is_key: bool):
        self.value, self.tag, self.path, self.line, self.anchor = value, tag, path, line, anchor
        self.log_start, self.is_key = log_start, is_key
        self.key, self.key_line, self.key_lines, self.merges, self.size, self.height = _PENDING, 0, {}, [], 1, 0


def _copied(value: Any) -> Any:
    """A copy of loaded YAML data (lists, dicts and immutable scalars; depth is bounded)."""
    if type(value) is dict:
        return {key: _copied(item) for key, item in value.items()}
    if type(value) is list:
        return [_copied(item) for item in value]
    return value


class _EventLoader:
    """Python data, its line index and its problems, in one pass over parser events.

    No recursion: libyaml's parser (CSafeLoader) is fast and bounds its own nesting,
    while PyYAML's composer recurses once per level (RecursionError near 1,000) and
    its pure-Python parser takes minutes on 100,000 `[`. Each anchored value keeps its
    size (values, aliases expanded) and height, so an alias is budgeted (and copied)
    the moment it appears. Scalars and merge keys follow PyYAML's SafeLoader.
    """

    def __init__(self, tags: YamlTags):
        self.tags = tags
        self.constructor = yaml.constructor.SafeConstructor()
        self.stack: list[_Open] = []
        self.anchors: dict[str, tuple] = {}  # name -> (value, size, height, path, log slice); redefinable
        self.log: list[tuple[tuple, int]] = []  # (key path, line), in document order
        self.problems: list[tuple[int, str]] = []
        self.root, self.documents, self.alias_nodes = None, 0, 0
        self.handlers = {yaml.ScalarEvent: self.scalar, yaml.AliasEvent: self.alias,
                         yaml.SequenceStartEvent: self.start, yaml.MappingStartEvent: self.start,
                         yaml.SequenceEndEvent: self.end, yaml.MappingEndEvent: self.end,
                         yaml.DocumentStartEvent: self.document}

    def document(self, event) -> None:
        self.documents += 1
        if self.documents > 1:
            raise _YamlRefusal(event.start_mark.line + 1, "several YAML documents (---); one is expected")

    def child_path(self) -> tuple[tuple, bool]:
        """(path of the value that starts now, whether it is a mapping key)."""
        if not self.stack:
            return (), False
        parent = self.stack[-1]
        if type(parent.value) is list:
            return (*parent.path, len(parent.value)), False
        if parent.key is _PENDING:
            return parent.path, True
        key = "<<" if parent.key is _MERGE else "?" if parent.key is _NO_KEY else parent.key
        return (*parent.path, key), False

    def scalar(self, event) -> None:
        tag, text, line = event.tag, event.value, event.start_mark.line + 1
        if tag is None or tag == "!":  # untagged: resolved as PyYAML's Resolver does
            tag = _CORE + "str"
            if event.implicit[0]:
                for implicit_tag, regexp in _IMPLICIT.get(text[:1], ()):
                    if regexp.match(text):
                        tag = implicit_tag
                        break
        if tag == _CORE + "str":
            value = text
        elif tag == _CORE + "merge" and self.child_path()[1]:  # `<<` as a key
            value = _MERGE
        else:
            value = self.construct(tag, text, line)
        if event.anchor is not None:
            self.anchors[event.anchor] = (value, 1, 0, self.child_path()[0], len(self.log), len(self.log))
        self.attach(value, line, 1, 0)

    def construct(self, tag: str, text: str, line: int) -> Any:
        if tag == _CORE + "int" and len(text) > YAML_MAX_INT_DIGITS:
            self.problem(line, self.child_path()[0], f"a whole number of {len(text):,} characters: "
                                                     f"at most {YAML_MAX_INT_DIGITS} digits here")
            return None
        if tag == _CORE + "int" and _PLAIN_INT.fullmatch(text):
            return int(text)  # the common forms, fast
        if tag == _CORE + "float" and _PLAIN_FLOAT.fullmatch(text):
            return float(text)
        try:
            if tag in self.tags:
                return self.tags[tag](text)
            if tag in _SCALAR_TAGS:
                return self.constructor.yaml_constructors[tag](self.constructor, yaml.ScalarNode(tag, text))
        except Exception as exc:  # noqa: BLE001 (a bad value or a tag function's error: the file's problem)
            shown = repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text):,} characters)"
            self.problem(line, self.child_path()[0], f"not a valid {tag.removeprefix(_CORE)}: {shown} ({exc})")
            return None
        self.problem(line, self.child_path()[0], f"unsupported tag {tag!r}")
        return text

    def start(self, event) -> None:
        line = event.start_mark.line + 1
        if len(self.stack) >= YAML_MAX_DEPTH:
            raise _YamlRefusal(line, f"nested more than {YAML_MAX_DEPTH} levels deep")
        kind = "seq" if type(event) is yaml.SequenceStartEvent else "map"
        tag = _CORE + kind if event.tag is None or event.tag == "!" else event.tag
        path, is_key = self.child_path()
        self.stack.append(_Open([] if kind == "seq" else {}, tag, path, line, event.anchor, len(self.log), is_key))

    def end(self, event) -> None:
        node = self.stack.pop()
        value = self.merged(node) if node.merges else node.value
        if node.tag in self.tags:
            try:
                value = self.tags[node.tag](value)
            except Exception as exc:  # noqa: BLE001 (a tag function's error is the file's problem)
                self.problem(node.line, node.path, f"{node.tag}: {exc}")
        elif node.tag not in (_CORE + "seq", _CORE + "map"):
            self.problem(node.line, node.path, f"unsupported tag {node.tag!r}")
        if node.anchor is not None:
            self.anchors[node.anchor] = (value, node.size, node.height + 1, node.path, node.log_start, len(self.log))
        if node.is_key:
            self.problem(node.line, node.path, "a key must be a plain value, not a list or a mapping")
            value = _NO_KEY
        self.attach(value, node.line, node.size, node.height + 1)

    def merged(self, node: _Open) -> dict:
        """A mapping with `<<` merges: explicit keys win, then the first source with the
        key; merged keys come first, as in PyYAML. A merged key's line is the `<<`'s."""
        merged: dict = {}
        for value, line in node.merges:
            sources = value if type(value) is list else [value]
            if not all(type(source) is dict for source in sources):
                self.problem(line, node.path, "a merge (<<) takes a mapping or a list of mappings")
                continue
            for source in sources:
                for key, item in source.items():
                    if key not in merged and key not in node.value:
                        self.log.append(((*node.path, key), line))
                    merged.setdefault(key, item)
        merged.update(node.value)
        return merged

    def alias(self, event) -> None:
        line, name = event.start_mark.line + 1, event.anchor
        if name not in self.anchors:
            if any(node.anchor == name for node in self.stack):
                raise _YamlRefusal(line, f"alias *{name} is inside its own anchor &{name} (a recursive alias)")
            raise _YamlRefusal(line, f"alias *{name} has no anchor &{name} before it")
        value, size, height, anchor_path, log_start, log_end = self.anchors[name]
        if len(self.stack) + height > YAML_MAX_DEPTH:
            raise _YamlRefusal(line, f"alias *{name} nests the document more than {YAML_MAX_DEPTH} levels deep")
        self.alias_nodes += size
        if self.alias_nodes > YAML_MAX_ALIAS_NODES:
            raise _YamlRefusal(line, f"aliases expand the document by more than {YAML_MAX_ALIAS_NODES:,} values "
                                     "(an alias bomb?)")
        path, is_key = self.child_path()
        if is_key and type(value) in (list, dict):
            self.problem(line, path, "a key must be a plain value, not a list or a mapping")
            value = _NO_KEY
        elif type(value) in (list, dict):
            value = _copied(value)  # changing one place never changes another
            if not path[-1:] == ("<<",):  # merged keys take the `<<` line (see merged)
                depth = len(anchor_path)
                self.log += [((*path, *inner[depth:]), inner_line) for inner, inner_line in self.log[log_start:log_end]]
        self.attach(value, line, size, height)

    def attach(self, value: Any, line: int, size: int, height: int) -> None:
        """Put a finished value into the open list or mapping (or make it the root)."""
        if not self.stack:
            self.root = value
            return
        parent = self.stack[-1]
        parent.size += size
        if height > parent.height:
            parent.height = height
        if type(parent.value) is list:
            self.log.append(((*parent.path, len(parent.value)), line))
            parent.value.append(value)
        elif parent.key is _PENDING:
            parent.key, parent.key_line = self.checked_key(value, line, parent.path), line
        else:
            key, parent.key = parent.key, _PENDING
            if key is _MERGE:
                parent.merges.append((value, parent.key_line))
            elif key is not _NO_KEY:
                self.set_key(parent, key, value)

    def checked_key(self, key: Any, line: int, path: tuple) -> Any:
        try:
            hash(key)
        except TypeError:
            self.problem(line, path, f"a key must be a plain value, not {type(key).__name__}")
            return _NO_KEY
        return key

    def set_key(self, parent: _Open, key: Any, value: Any) -> None:
        if key in parent.key_lines:
            self.problem(parent.key_line, (*parent.path, key), f"duplicate key (first at line "
                                                                f"{parent.key_lines[key]}); a key may appear once")
            return
        parent.key_lines[key] = parent.key_line
        self.log.append(((*parent.path, key), parent.key_line))
        parent.value[key] = value

    def problem(self, line: int, path: tuple, message: str) -> None:
        self.problems.append((line, f"{dotted(path) or '(top)'}: {message}"))


def line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line; {} when it does not load."""
    try:
        return strict_yaml_load(text, "recipe")[1]
    except PosttrainError:
        return {}


def _nearest_line(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


PROBLEMS_SHOWN = 100   # a recipe with 50,000 bad entries is reported in a screenful or two


def problems_error(where: str, problems: list, lines: dict[tuple, int] | None = None,
                   error: type[PosttrainError] = RecipeError) -> PosttrainError:
    """One error listing `problems`, each once and at most PROBLEMS_SHOWN of them: lines
    of text, or (key path, message) pairs placed as `where:LINE: key.path: message`."""
    unique = list(dict.fromkeys(problems))
    shown = [problem if isinstance(problem, str) else _place(problem[0], where, lines or {}, problem[1])
             for problem in unique[:PROBLEMS_SHOWN]]
    if len(unique) > PROBLEMS_SHOWN:
        shown.append(f"... and {len(unique) - PROBLEMS_SHOWN} more")
    return error(f"{where}: {len(unique)} problem(s)", shown)


def _place(loc: tuple, where: str, lines: dict[tuple, int], message: str, dotted_path: str | None = None) -> str:
    line = _nearest_line(loc, lines)
    place = f"{where}:{line}" if line else where
    return f"{place}: {dotted_path or dotted(loc)}: {message}"
