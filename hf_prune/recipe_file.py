"""Reading a recipe file (YAML or JSON) strictly, so hostile or broken text fails fast and small.

A recipe is a short hand-written file. The stock parsers accept things a recipe must not contain:

- a key given twice (both parsers keep the last one silently: ``num_layers`` twice removes the wrong count);
- YAML aliases that expand to millions of nodes (the "billion laughs": a few hundred bytes of text whose
  expansion exhausts memory when anything walks it);
- JSON's ``NaN`` / ``Infinity`` constants;
- files of any size, and bytes that are not UTF-8 text.

``read_recipe_file`` refuses each with a ``RecipeError`` naming the file and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import RecipeError, clip, quoted

#: A recipe is a few hundred bytes; anything past this is not a recipe.
MAX_FILE_BYTES = 1_000_000
#: YAML nodes a recipe may hold once every alias is expanded (a large recipe has a few hundred).
MAX_YAML_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_recipe_file(path: Path) -> Any:
    """The parsed contents of a ``.json`` file (JSON) or any other file (YAML, a superset of JSON)."""
    if not path.is_file():
        raise RecipeError(f"recipe: file not found: {path}")
    with path.open("rb") as stream:
        raw = stream.read(MAX_FILE_BYTES + 1)  # never read more than the limit, whatever the file's size
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(
            f"recipe: {path} is larger than {MAX_FILE_BYTES:,} bytes; a recipe is a short text file"
        )
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is allowed and dropped
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        return parse_json(text) if kind == "JSON" else parse_yaml(text)
    except RecipeError:
        raise
    except RecursionError:
        raise RecipeError(f"recipe: {path} is nested too deeply to be a recipe") from None
    except (yaml.YAMLError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are bad YAML dates
        raise RecipeError(f"recipe: {path} is not valid {kind}: {clip(str(exc), 600)}") from None


def parse_yaml(text: str) -> Any:
    """One YAML document, with duplicate keys refused and the alias expansion bounded."""
    loader = _StrictYamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_json(text: str) -> Any:
    """A JSON document, with duplicate keys and the NaN / Infinity constants refused."""
    return json.loads(text, object_pairs_hook=_json_object, parse_constant=_refuse_json_constant)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RecipeError(
                f"recipe: duplicate key {quoted(key)} in a JSON object "
                f"(keys: {clip(', '.join(k for k, _ in pairs))}); give each key once"
            )
        result[key] = value
    return result


def _refuse_json_constant(name: str) -> Any:
    raise RecipeError(f"recipe: {name} is not allowed in a recipe (numbers must be finite)")


class _StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents too large once aliases are expanded."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._composed_nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # Counting as nodes are composed stops a huge file early, before it is all in memory.
        if not self.check_event(yaml.events.AliasEvent):
            self._composed_nodes += 1
            if self._composed_nodes > MAX_YAML_NODES:
                raise RecipeError(
                    f"recipe: too many YAML nodes (limit {MAX_YAML_NODES}); a recipe is a short file"
                )
        return super().compose_node(parent, index)

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        # Checked on the keys as written, before merge keys (<<) add theirs, which may be overridden.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a sequence or mapping as key is refused by the constructor
            key = self.construct_object(key_node)  # a scalar: cheap, and cached for the construction
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise RecipeError(
                    f"recipe: duplicate key {quoted(key)} at line {line} (first at line "
                    f"{first_line[key]}); give each key once"
                )
            first_line[key] = line
        return node

    def construct_document(self, node: Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root: Node) -> None:
    """Refuse a document whose nodes, each alias counted as a full copy of its anchor, exceed the limit.

    Sizes are memoised per node, so a billion-laughs document costs one visit per distinct node."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise RecipeError(
                "recipe: a YAML alias refers to a node that contains it (a recursive structure)"
            )
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise RecipeError(
                    f"recipe: too many YAML nodes after expanding aliases (limit {MAX_YAML_NODES}); "
                    "a recipe needs few aliases (*name), and none that nest"
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _with_location(construct: Any) -> Any:
    """A scalar constructor whose ValueError (a date like 2024-13-01, an int of 5000 digits) names the line."""

    def construct_or_refuse(loader: yaml.SafeLoader, node: ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except ValueError as exc:
            raise ConstructorError(
                None, None, f"cannot read {quoted(node.value)}: {exc}", node.start_mark
            ) from None

    return construct_or_refuse


for _tag in ("int", "float", "timestamp"):
    _name = f"tag:yaml.org,2002:{_tag}"
    _StrictYamlLoader.add_constructor(_name, _with_location(yaml.SafeLoader.yaml_constructors[_name]))
