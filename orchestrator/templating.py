"""A tiny mustache-like renderer for the project's template files, escaping every value.

Syntax:

* ``{{name|filter}}`` inserts a value through an escape filter, which is required:
  ``sh`` (one shell word, :func:`shlex.quote`), ``sbatch`` (the value of an
  ``#SBATCH --opt=VALUE`` directive), ``raw`` (a line validated by the caller,
  inserted as is, still refused if it holds a line break);
* ``{{#name}}...{{/name}}`` is emitted only when ``name`` is set (not None, False
  or empty), once per item when it is a list, where ``{{.|filter}}`` is the item.
  A section tag alone on its line takes the whole line with it.

A tag without a filter, an unknown filter or a name the caller did not provide
is a :class:`TemplateError`, so no value reaches a script unescaped by accident.
Used for the sbatch job script (:mod:`orchestrator.submit`) and the C file of a
new simulation (:mod:`orchestrator.scaffold`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import TemplateError

__all__ = ["FILTERS", "TemplateError", "escape_raw", "escape_sbatch", "escape_sh", "one_line", "render"]




_PLAIN_SBATCH = re.compile(r"^[A-Za-z0-9_.,:=@%+/\[\]-]+$")
_LINE_BREAKS = ("\n", "\r", "\0")


def one_line(value: str, what: str) -> str:
    for ch in _LINE_BREAKS:
        if ch in value:
            raise ValueError(f"{what}: {value!r} contains {ch!r}; it must be a single line")
    return value


def escape_sbatch(value: object) -> str:
    """An ``#SBATCH`` argument: plain words as they are, anything else double-quoted.

    sbatch reads directive arguments like a shell word (quotes group, a backslash
    escapes the next character, an unquoted ``#`` starts a comment), so inside
    double quotes only ``\\`` and ``"`` need a backslash. Line breaks cannot be
    expressed and are refused.
    """
    text = one_line(str(value), "#SBATCH value")
    if _PLAIN_SBATCH.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def escape_sh(value: object) -> str:
    """One shell word."""
    text = str(value)
    if "\0" in text:
        raise ValueError(f"shell value {text!r} contains a NUL byte")
    return shlex.quote(text)


def escape_raw(value: object) -> str:
    """A line the user wrote (validated by :class:`JobSpec`), inserted as is."""
    return one_line(str(value), "line")


FILTERS: dict[str, Callable[[object], str]] = {"sh": escape_sh, "sbatch": escape_sbatch, "raw": escape_raw}


# -- the renderer ---------------------------------------------------------------------

_TAG = re.compile(r"\{\{\s*([#/]?)\s*([A-Za-z_][A-Za-z0-9_]*|\.)\s*(?:\|\s*([A-Za-z_]+)\s*)?\}\}")


@dataclass
class _Section:
    name: str
    body: list[_Node] = field(default_factory=list)


@dataclass(frozen=True)
class _Var:
    name: str
    filter: str


_Node = str | _Var | _Section


def _standalone(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of the whole line if the tag at [start, end) is alone on it."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end + 1
    if text[line_start:start].strip() or text[end:line_end].strip():
        return None
    return line_start, line_end


def parse_template(text: str) -> list[_Node]:
    """Parse a template into literal text, variables and sections."""
    root = _Section("")
    stack = [root]
    pos = 0
    for m in _TAG.finditer(text):
        kind, name, filt = m.group(1), m.group(2), m.group(3)
        lit_end, pos_next = m.start(), m.end()
        if kind:
            span = _standalone(text, m.start(), m.end())
            if span is not None:
                lit_end, pos_next = span
        stack[-1].body.append(text[pos:lit_end])
        pos = pos_next
        line = text.count("\n", 0, m.start()) + 1
        if kind == "#":
            section = _Section(name)
            stack[-1].body.append(section)
            stack.append(section)
        elif kind == "/":
            if len(stack) == 1 or stack[-1].name != name:
                raise TemplateError(f"template line {line}: {{{{/{name}}}}} closes no open section")
            stack.pop()
        else:
            if filt is None or filt not in FILTERS:
                raise TemplateError(
                    f"template line {line}: {{{{{name}}}}} needs an escape filter, one of "
                    f"{', '.join(FILTERS)} (e.g. {{{{{name}|sh}}}})"
                )
            stack[-1].body.append(_Var(name, filt))
    if len(stack) > 1:
        raise TemplateError(f"template: section {{{{#{stack[-1].name}}}}} is never closed")
    stack[-1].body.append(text[pos:])
    return root.body


def _lookup(name: str, context: Mapping[str, Any], item: Any) -> Any:
    if name == ".":
        return item
    if name not in context:
        raise TemplateError(f"template names {name!r}, which submit does not provide")
    return context[name]


def _render(nodes: Sequence[_Node], context: Mapping[str, Any], item: Any, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Var):
            value = _lookup(node.name, context, item)
            if value is None:
                raise TemplateError(f"template inserts {node.name!r} outside a section, but it is not set")
            out.append(FILTERS[node.filter](value))
        else:
            value = _lookup(node.name, context, item)
            for it in _section_items(value):
                _render(node.body, context, it, out)


def _section_items(value: Any) -> Sequence[Any]:
    """What a section repeats over: a list's items, a set value once, nothing when unset."""
    if isinstance(value, (list, tuple)):
        return value
    return [] if value is None or value is False or value == "" else [value]


def render(template: str, context: Mapping[str, Any]) -> str:
    """Render ``template`` with ``context``; see the module docstring for the syntax."""
    out: list[str] = []
    _render(parse_template(template), context, None, out)
    return "".join(out)
