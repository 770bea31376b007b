"""What people write (YAML, JSON, TOML) read with every key given once, or refused in one line.

YAML says the keys of a mapping are unique, and JSON says they should be, but PyYAML and
`json` both keep the last of two equal keys without a word: `hold: {duration_s: 600,
duration_s: 6}` would run a 6 s hold, and a second `steps:` would silently drop the first
list. Here a key given twice is refused instead, naming the key and its line:

- YAML (and JSON read as YAML, as protocol files are): `load_yaml`, PyYAML's safe loader whose
  mappings check their keys first (the key node's mark gives the line);
- JSON (control API requests): `json.loads(..., object_pairs_hook=refuse_duplicate_pairs)`;
  the hook sees the pairs but not where they were, so it names the key only;
- TOML refuses duplicates itself, but says where, not what: `toml_error` adds the line's text.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml
from yaml.constructor import ConstructorError

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: merged keys may be overridden on purpose


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a mapping that gives a key twice (ConstructorError)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first_line: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses an unhashable key itself
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = line


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, but a key given twice in a mapping raises yaml.YAMLError."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def refuse_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for `json.loads`: the object as a dict; DuplicateKeyError if a
    key comes twice."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_SNIPPET_CHARS = 60


def toml_error(exc: ValueError, text: str) -> str:
    """tomllib's one-line message with the text of the line it points at (which names the key
    of a duplicate: tomllib says "Cannot overwrite a value (at line 3, column 6)")."""
    message = " ".join(str(exc).split())
    match = _TOML_POSITION.search(message)
    lines = text.splitlines()
    if match is None or not 1 <= int(match[1]) <= len(lines):
        return message
    snippet = lines[int(match[1]) - 1].strip()
    if len(snippet) > _SNIPPET_CHARS:
        snippet = snippet[: _SNIPPET_CHARS - 3] + "..."
    return f"{message}: {snippet}" if snippet else message
