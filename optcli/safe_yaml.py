"""YAML read safely and within bounds: the loader every config, --set value and spec keyword goes through.
Imports neither torch nor pydantic."""

from __future__ import annotations

import re
from typing import Any

import yaml

from optcli.limits import MAX_YAML_DEPTH, MAX_YAML_NODES


class YamlSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 1e-3 as a float: PyYAML follows YAML 1.1, which wants 1.0e-3,
    and a learning rate silently read as the string '1e-3' is a trap. Constructs no Python objects.

    Bounded: nesting deeper than MAX_YAML_DEPTH stops composition before Python's recursion limit, and a document
    of more than MAX_YAML_NODES nodes once every alias is expanded (an alias bomb) is refused before anything is
    built from it; both errors carry the position and name the limit."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels (the limit)", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            size, depth = expanded_size(node)
            if size > MAX_YAML_NODES:
                problem = f"more than {MAX_YAML_NODES} nodes once aliases are expanded (the limit; an alias bomb?)"
                raise yaml.composer.ComposerError(None, None, problem, node.start_mark)
            if depth > MAX_YAML_DEPTH:
                problem = f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded (the limit)"
                raise yaml.composer.ComposerError(None, None, problem, node.start_mark)
            check_unique_keys(node)
        return node


def check_unique_keys(root: yaml.Node) -> None:
    """A key given twice in one mapping is an error naming its path and both lines: PyYAML keeps the last value
    silently, so `lr` written twice in a section would train with whichever came last. Keys a merge (`<<: *base`)
    brings in may be overridden, as YAML means them to be; each node is checked once, at the first path found."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((kid, f"{path}.{i}" if path else str(i)) for i, kid in enumerate(node.value))
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            where = f"{path}.{key.value}" if path else str(key.value)
            earlier = first.setdefault((key.tag, key.value), key)
            if earlier is not key:
                a, b = earlier.start_mark, key.start_mark
                at = (
                    f"lines {a.line + 1} and {b.line + 1}"
                    if a.line != b.line
                    else f"columns {a.column + 1} and {b.column + 1}"
                )
                raise yaml.constructor.ConstructorError(None, None, f"{where}: given twice ({at})", b)
            stack.append((value, where))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes, depth) of a composed YAML graph with every alias expanded, computed without expanding it: each
    node is visited once (aliases share nodes), sizes saturate past the limit, and a cycle counts as too large."""
    too_many = MAX_YAML_NODES + 1
    memo: dict[int, tuple[int, int] | None] = {}  # None: under way (an ancestor on the current path)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = _children(node)
        if done:
            sizes = [memo[id(k)] or (too_many, too_many) for k in kids]
            memo[id(node)] = (min(too_many, 1 + sum(s for s, _ in sizes)), 1 + max((d for _, d in sizes), default=0))
            continue
        if id(node) in memo:
            continue
        memo[id(node)] = None
        stack.append((node, True))
        for kid in kids:
            if id(kid) in memo and memo[id(kid)] is None:
                return too_many, too_many  # a recursive alias: infinite once expanded
            stack.append((kid, False))
    return memo[id(root)] or (too_many, too_many)


YamlSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlSafeLoader)
