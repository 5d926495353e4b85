"""YAML with positions: PyYAML's composer gives every node its line and column; this reader
builds plain Python values from the nodes and remembers where each mapping key and value came
from, so a spec error can name the file, line and column. It also reports duplicate keys and
non-plain tags (which PyYAML would otherwise accept or silently merge), and bounds the number of
values an alias can expand to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from spotrun.spec.units import describe

KeyPath = tuple[str | int, ...]
MAX_NODES = 20_000  # guards against alias bombs ("billion laughs")


@dataclass(frozen=True)
class Where:
    key: tuple[int, int] | None  # (line, column) of the key; None for the root and list items
    value: tuple[int, int]  # (line, column) where the value starts
    node: Node


def node_mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class PlainConstructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe scalar constructors, except that timestamps stay text (a `name: 2024-01-01`
    or an image tag should not become a datetime)."""


PlainConstructor.add_constructor("tag:yaml.org,2002:timestamp", yaml.constructor.SafeConstructor.construct_yaml_str)

_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + t for t in ("str", "int", "float", "bool", "null", "timestamp")}


class TooBig(Exception):
    pass


class Reader:
    """Turns a composed YAML node tree into plain values plus a key path -> position map.

    Problems that YAML itself allows but a spec must not contain (duplicate keys, unsupported tags,
    non-text keys, recursive aliases) are collected, not raised, so they are reported with the rest.
    """

    def __init__(self) -> None:
        self.where: dict[KeyPath, Where] = {}
        # (path, position, message, suppress): suppress hides pydantic's errors for that subtree,
        # which would only repeat the same problem in other words.
        self.problems: list[tuple[KeyPath, tuple[int, int], str, bool]] = []
        self._constructor = PlainConstructor()
        self._budget = MAX_NODES
        self._active: set[int] = set()

    def read(self, node: Node, path: KeyPath = (), key: tuple[int, int] | None = None) -> Any:
        self._budget -= 1
        if self._budget < 0:
            raise TooBig
        self.where[path] = Where(key, node_mark(node), node)
        if id(node) in self._active:
            self.problems.append((path, node_mark(node), "a YAML alias refers to itself", True))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _bad_tag(self, node: Node, path: KeyPath) -> None:
        tag = node.tag.replace(_STD, "!!")
        self.problems.append((path, node_mark(node), f"unsupported YAML tag {tag!r}; remove it", True))

    def _scalar(self, node: Node, path: KeyPath) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self._bad_tag(node, path)
            return None
        try:
            return self._constructor.construct_object(node, deep=True)
        except Exception as exc:  # a bad explicit tag such as `!!int abc`, or a 5000-digit number
            reason = "the number is too large" if "limit" in str(exc) else str(exc)
            self.problems.append((path, node_mark(node), f"invalid value {describe(node.value)}: {reason}", True))
            return None

    def _sequence(self, node: SequenceNode, path: KeyPath) -> list[Any] | None:
        if node.tag != _STD + "seq":
            self._bad_tag(node, path)
            return None
        return [self.read(item, (*path, i)) for i, item in enumerate(node.value)]

    def _pairs(self, node: MappingNode, path: KeyPath) -> list[tuple[Node, Node, bool]]:
        """The mapping's (key, value, explicit) pairs with YAML merge keys (`<<: *base`) expanded:
        merged pairs first (earlier sources win), then the explicit ones, which win over all."""
        merged: list[tuple[Node, Node, bool]] = []
        explicit: list[tuple[Node, Node, bool]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _STD + "merge":
                explicit.append((key_node, value_node, True))
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            if not all(isinstance(s, MappingNode) for s in sources):
                self.problems.append(
                    (path, node_mark(key_node), "'<<' must merge a mapping or a list of mappings", False)
                )
                continue
            for source in reversed(sources):
                if id(source) in self._active:
                    self.problems.append((path, node_mark(source), "a YAML alias refers to itself", True))
                    continue
                self._active.add(id(source))
                try:
                    merged.extend((k, v, False) for k, v, _ in self._pairs(source, path))
                finally:
                    self._active.discard(id(source))
        return merged + explicit

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any] | None:
        if node.tag != _STD + "map":
            self._bad_tag(node, path)
            return None
        result: dict[str, Any] = {}
        first_seen: dict[str, int] = {}
        for key_node, value_node, explicit in self._pairs(node, path):
            if not isinstance(key_node, ScalarNode):
                what = "a mapping" if isinstance(key_node, MappingNode) else "a list"
                self.problems.append((path, node_mark(key_node), f"a key must be plain text, got {what}", False))
                continue
            key = key_node.value  # the source text: `on:` stays 'on', not True
            child = (*path, key)
            if explicit and key in first_seen:
                self.problems.append(
                    (child, node_mark(key_node), f"duplicate key {key!r} (first given on line {first_seen[key]})",
                     False)
                )  # fmt: skip
            elif explicit:
                first_seen[key] = node_mark(key_node)[0]
            result[key] = self.read(value_node, child, node_mark(key_node))
        return result


def yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[tuple[int, int], str]:
    """Position and message for a YAML syntax error."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return (line, column), f"not a YAML text file: unacceptable character {char} ({exc.reason})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    position = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if "'\\t'" in problem:
        return position, "invalid YAML: a tab character; YAML does not allow tabs for indentation, use spaces"
    if context == "expected a single document in the stream":
        return position, "invalid YAML: a second document ('---'); a job spec is a single YAML document"
    message = f"invalid YAML: {problem}"
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark and context_mark is not mark:
        message += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        message += f" ({context})"
    return position, message
