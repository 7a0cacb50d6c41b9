"""YAML from untrusted files, read safely and with bounded work.

``yaml.safe_load`` already refuses ``!!python/...`` tags, but a small file can still make it
work without end or exhaust the stack: aliases that expand exponentially (a "billion laughs"
document), thousands of nested brackets, integers of thousands of digits. These readers cap
nesting and alias expansion and report every problem as one MergeError with its line.
"""

from __future__ import annotations

from typing import Any

import yaml

from distmerge.errors import MergeError

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings (mergekit's recipes need about 10)."""
MAX_VALUES = 100_000
"""Most values a recipe may expand to through YAML aliases (``&name`` ... ``*name``)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), refusing nesting deeper than MAX_DEPTH while it
    composes (before its recursive composer could exhaust the stack), integers beyond 64 bits,
    and values Python cannot build, each with its line."""

    source = "recipe"
    depth = 0

    def construct_object(self, node, deep=False):
        # Constructors raise ValueError for values YAML matches but Python cannot build
        # (2001-13-01 as a date, integers of over 4300 digits): report them with their line.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value ({e})", node.start_mark) from None

    def construct_yaml_int(self, node):
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # more than 4300 decimal digits
            value = 2**63
        if abs(value) >= 2**63:
            raise yaml.constructor.ConstructorError(None, None, "integer too large (a recipe's integers fit in 64 bits)", node.start_mark)
        return value

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise MergeError(_too_deep(self.source, self.peek_event().start_mark))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _too_deep(source: str, mark) -> str:
    return (
        f"{source}: values nested more than {MAX_DEPTH} levels deep (at line {mark.line + 1}); "
        "a recipe needs about 10: check the brackets and indentation there"
    )


def load_yaml(text: str, source: str = "recipe") -> Any:
    """The YAML document in ``text`` (None when it is empty), read as ``load_yaml_documents``
    reads each; MergeError if ``text`` holds more than one."""
    docs = load_yaml_documents(text, source)
    if len(docs) > 1:
        raise MergeError(f"{source}: holds {len(docs)} YAML documents (separated by ---); expected one")
    return docs[0] if docs else None


def load_yaml_documents(text: str, source: str = "recipe") -> list[Any]:
    """Every YAML document in ``text`` (documents are separated by ``---``), each read safely
    and with bounded work.

    Beyond ``yaml.safe_load_all`` (which already refuses ``!!python/...`` tags), refuses with a
    MergeError naming ``source``: nesting deeper than MAX_DEPTH (also through aliases);
    an alias inside the value it names (a cycle); and aliases that expand a document to
    more than MAX_VALUES values, counting an aliased value once per use (a "billion laughs"
    document: each level re-uses the one before several times). A few aliases, as mergekit
    users write them to share a parameter block, stay far below the cap. Each document is
    checked before it is built (aliases do not cross documents), and the file itself is at
    most MAX_RECIPE_BYTES, so the work stays proportional to the text.
    """
    loader = None
    docs: list[Any] = []
    try:
        loader = _Loader(text)
        loader.source = source
        while loader.check_node():
            node = loader.get_node()
            _check_expansion(node, source)
            docs.append(loader.construct_document(node))
        return docs
    except yaml.YAMLError as e:
        raise MergeError(f"{source}: invalid YAML{_yaml_problem(e)}") from None
    except RecursionError:  # a backstop: _Loader and _check_expansion bound the depth
        raise MergeError(f"{source}: values nested too deeply; a recipe needs about 10 levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f": character #x{e.character:04x} at position {e.position} is not allowed in YAML; remove it"
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ... but found another document"
        problem = f"{context} {problem}"
    return f"{where}: {' '.join(problem.split())}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse cycles, and documents that aliases make deeper than MAX_DEPTH or larger than
    MAX_VALUES. One walk over the node graph: each node is visited once (an alias is the very
    node it names), its expanded size and depth computed from its children's."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = min(1 + sum(size[id(k)] for k in kids), 2**62)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_DEPTH:
                raise MergeError(_too_deep(source, node.start_mark))
            continue
        if key in size:
            continue
        if key in on_path:
            raise MergeError(
                f"{source}: a YAML alias at line {node.start_mark.line + 1} is used inside the value it names "
                "(a value that contains itself); write the values out"
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))
    if size[id(root)] > MAX_VALUES and size[id(root)] > len(size):
        where = ""
        if isinstance(root, yaml.MappingNode) and root.value:
            k, v = max(root.value, key=lambda kv: size[id(kv[1])])
            where = f" (under {k.value!r})" if isinstance(k, yaml.ScalarNode) else ""
        raise MergeError(
            f"{source}: the recipe uses YAML aliases (*name) that expand to more than {MAX_VALUES:,} values{where}; "
            "write the values out instead of nesting aliases"
        )
