"""Safe, bounded YAML for study files: ``load_yaml_mapping(path)``.

``yaml.safe_load`` never runs code, but it trusts the document in other ways: it keeps the last
of two equal keys without a word, returns ``None`` for an empty file (which would run the
default study), and builds an alias "billion laughs" bomb as a small shared graph that expands
to 10^9 values as soon as anything walks it (validation, ``yaml.safe_dump``).

So this loader composes the document with PyYAML's ``SafeLoader`` and checks the node graph
before it constructs any Python object:

* Aliases stay allowed (a shared ``train:`` block is handy), but the document is measured as if
  every alias were expanded, without expanding it: each node's expanded size is computed once
  and reused, so the check is linear in the file. More than ``MAX_VALUES`` values, or an alias
  inside its own anchor (a cycle), is refused; a billion-laughs bomb is refused after visiting
  its ~30 nodes. Capping the number of aliases instead would not be enough: 30 aliases can
  expand 3^10-fold.
* Equal keys in one mapping are refused at any depth (a merge key ``<<`` may still be
  overridden, as YAML specifies).
* The file is read within ``MAX_YAML_BYTES`` and must be UTF-8, hold one document, nest at most
  ``MAX_DEPTH`` levels and have a mapping with string keys at the top.

Every failure is a ``ConfigError`` of one line naming the file (a missing file is a
``DataNotFoundError``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from quantpatch.errors import ConfigError, DataNotFoundError

MAX_YAML_BYTES = 256 * 2**10
MAX_VALUES = 100_000
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that stops at ``MAX_DEPTH`` nested collections while parsing, before
    PyYAML's scanner (quadratic in the nesting depth) or its recursive composer get far."""

    depth = 0

    def get_event(self) -> yaml.Event:
        event = super().get_event()
        if isinstance(event, yaml.CollectionStartEvent):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ConfigError(
                    f"{self.name}: line {event.start_mark.line + 1}: nested more than "
                    f"{MAX_DEPTH} levels deep"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            self.depth -= 1
        return event


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path``, after the checks in the module doc."""
    path = Path(path)
    text = _read_text(path)
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters up front
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    loader.name = str(path)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError(f"{path}: the file is empty; write the settings as 'name: value'")
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise ConfigError(f"{path}: the top level must be a mapping of settings, not {kind}")
        _check_graph(root, loader, path)
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    finally:
        loader.dispose()
    names = [key for key in data if not isinstance(key, str)]
    if names:
        raise ConfigError(f"{path}: setting names must be text, got {names[0]!r}")
    return data


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise DataNotFoundError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES >> 10} KiB, too big for settings")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def _check_graph(root: yaml.Node, loader: yaml.SafeLoader, path: Path) -> None:
    """Refuse cycles, deep nesting, duplicate keys and documents whose aliases would expand
    beyond ``MAX_VALUES`` values, visiting each composed node once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded_size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{path}: line {_line(node)}: an alias refers to its own anchor")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, loader, path)
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1 + sum(expanded_size(child, depth + 1) for child in children)
        open_nodes.discard(id(node))
        if total > MAX_VALUES:
            raise ConfigError(
                f"{path}: line {_line(node)}: expands to more than {MAX_VALUES} values through "
                "aliases (*name); refused"
            )
        sizes[id(node)] = total
        return total

    expanded_size(root, 0)


def _check_keys(node: yaml.MappingNode, loader: yaml.SafeLoader, path: Path) -> None:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue  # non-scalar keys are refused at construction (unhashable)
        key = loader.construct_object(key_node, deep=True)
        if key in first_line:
            raise ConfigError(
                f"{path}: line {_line(key_node)}: duplicate key {key!r} (first at line "
                f"{first_line[key]}); YAML would silently keep only the last"
            )
        first_line[key] = _line(key_node)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _describe(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where, without PyYAML's snippet."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML{where}: {exc.problem}{context}"
    return "invalid YAML: " + " ".join(str(exc).split())
