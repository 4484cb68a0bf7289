"""YAML configuration files the way every part of Converge reads them: the
connectors' mappings, the feature sets and the prediction definitions.

One loader (YAML 1.2 booleans, dates left as text, duplicate keys refused),
one way of turning pydantic's errors into "line N, key.path: message"
problems that name the line of the file, and one way of finding a file by
path or by the name of a file shipped in a package folder. Each caller keeps
its own error class (a `ConfigFileError`) and its own pydantic model.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError

# "<key>: <problem>", how a check across keys says which key it means.
# A key in brackets is an entry of a free-form mapping: "map['Phone']".
_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w.]*(?:\[[^\]]*\][\w.]*)*): (.*)$", re.DOTALL)
_PATH_PART = re.compile(r"([^.\[\]]+)|(\[[^\]]*\])")
# How pydantic names the members of a union in an error's location, and how
# a person would say each one.
_MEMBER_WORDS = {"str": "text", "int": "a number", "float": "a number", "bool": "true/false"}
_PLAIN_MEMBERS = frozenset({*_MEMBER_WORDS, "date", "datetime"})

Model = TypeVar("Model", bound=BaseModel)


class ConfigFileError(Exception):
    """A configuration file that cannot be used; each problem names its line and key."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        self.origin = origin
        self.problems = problems
        super().__init__(f"{origin}: " + "; ".join(problems))


Error = TypeVar("Error", bound=ConfigFileError)


class ConfigLoader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML 1.2 booleans (only true/false: PyYAML's YAML 1.1 would turn the
    values Yes, No, On, Off into booleans), dates left as text (pydantic
    parses them where a date is meant, and "2024-01-01" stays text where
    text is), and duplicate keys refused (the later one would silently win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return dict(super().construct_mapping(node, deep=deep))


ConfigLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(
    text: str, origin: str, error: type[Error], expected: str, empty: Any = None
) -> tuple[dict[str, Any], Any]:
    """The file's top-level mapping and its node tree (for lines), or `error`.
    `expected` says what the top level should hold; `empty` stands for an
    empty file (None: an empty file is an error)."""
    try:
        loader = ConfigLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise error(origin, [f"{where}not valid YAML: {e}"]) from None
    if data is None and empty is not None:
        data = empty
    if not isinstance(data, dict):
        raise error(origin, [f"line 1: must be a YAML mapping of keys ({expected})"])
    return data, root


def validate(
    model: type[Model],
    data: dict[str, Any],
    root: Any,
    origin: str,
    error: type[Error],
    aliases: dict[str, str] | None = None,
) -> Model:
    """`data` as `model`, or `error` listing every problem with its line and
    key. `aliases` maps a field's Python name to its key in the file."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        aliases = aliases or {}
        errors = e.errors()
        # A union reports one error per member, each naming its member last:
        # gather them by key so the key is said once with every member.
        unions: dict[tuple[int | str, ...], list[str]] = {}
        for raw in errors:
            if raw["loc"] and _is_member(raw["loc"][-1]):
                unions.setdefault(_strip(tuple(raw["loc"])), []).append(str(raw["loc"][-1]))
        problems = [describe(root, raw, aliases, unions) for raw in errors]
        raise error(origin, list(dict.fromkeys(problems))) from None


def _is_member(part: int | str) -> bool:
    return isinstance(part, str) and (part in _PLAIN_MEMBERS or "[" in part)


def _member_words(part: str) -> str:
    if part in _MEMBER_WORDS:
        return _MEMBER_WORDS[part]
    if part.startswith("list["):
        return "a list of them"
    if part.startswith("literal["):
        return part.removeprefix("literal[").removesuffix("]").replace(",", " or")
    return "a date" if part.startswith("date") else part


def _strip(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return tuple(part for part in loc if not _is_member(part))


def describe(
    root: Any,
    raw: Any,
    aliases: dict[str, str],
    unions: dict[tuple[int | str, ...], list[str]],
) -> str:
    """One pydantic error as "line N, key.path: message"; `unions` holds the
    members of each union that failed, by key."""
    loc: tuple[int | str, ...] = tuple(raw["loc"])
    kind = raw["type"]
    shown = f" (got {raw['input']!r})" if not isinstance(raw.get("input"), dict | list) else ""
    if loc and _is_member(loc[-1]):
        loc = _strip(loc)
        words = list(dict.fromkeys(_member_words(member) for member in unions[loc]))
        said = ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
        message = f"must be {said}{shown}"
    else:
        loc = _strip(loc)
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key missing"
        else:
            message = str(raw["msg"]).removeprefix("Value error, ")
            key = _KEY_PREFIX.match(message)
            if kind == "value_error" and key:
                loc = loc + tuple(
                    name or (int(entry[1:-1]) if entry[1:-1].isdigit() else entry)
                    for name, entry in _PATH_PART.findall(key.group(1))
                )
                message = key.group(2)
            elif kind != "value_error":
                message += shown
    where = _key(loc, aliases)
    return f"line {_line_of(root, loc, aliases)}, {where or 'top level'}: {message}"


def _key(loc: tuple[int | str, ...], aliases: dict[str, str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("["):
            path += part
        else:
            name = aliases.get(part, part)
            path += f".{name}" if path else name
    return path


def _line_of(root: Any, loc: tuple[int | str, ...], aliases: dict[str, str]) -> int:
    """The line (1-based) of the deepest YAML node `loc` reaches: the key's
    own line when it names one, else its nearest parent's."""
    node: Any = root
    line: int = int(root.start_mark.line) + 1 if root is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            name = part[1:-1].strip("'\"") if part.startswith("[") else aliases.get(part, part)
            for key_node, value_node in node.value:
                if key_node.value == name:
                    node, line = value_node, int(key_node.start_mark.line) + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = int(node.start_mark.line) + 1
        else:
            return line
    return line


def shipped(package: str, folder: str) -> dict[str, Traversable]:
    """The YAML files shipped in a package's folder, by name (file name without .yaml)."""
    directory = resources.files(package) / folder
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in sorted(directory.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def read(
    ref: str | Path, package: str, folder: str, what: str, error: type[Error]
) -> tuple[str, str]:
    """The text of a file named by path, else by the name of a file shipped
    in `package`/`folder`, with its origin for messages; `error` when neither
    exists (listing the shipped ones) or the file cannot be read. `what` names
    the kind of file ("mapping")."""
    path = Path(ref)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise error(str(path), [f"cannot read it: {e}"]) from None
    files = shipped(package, folder)
    name = str(ref).removesuffix(".yaml")
    if name in files:
        return files[name].read_text(encoding="utf-8"), f"{name} (shipped)"
    raise error(
        str(ref),
        [f"no such file, and no shipped {what} of that name (shipped: {', '.join(files)})"],
    )
