"""The project's template files, rendered with jinja2, every value through an escape filter.

* ``{{ name|FILTER }}`` inserts a value through an escape filter, which is required:
  ``sh`` (one shell word, :func:`shlex.quote`), ``sbatch`` (the value of an
  ``#SBATCH --opt=VALUE`` directive), ``raw`` (a line validated by the caller,
  inserted as is, still refused if it holds a line break);
* ``{% if name %}...{% endif %}`` for an optional section, ``{% for line in extra %}``
  for a list; a block tag alone on its line takes the whole line with it
  (``trim_blocks``/``lstrip_blocks``).

An output without one of the filters as its last step, a ``{% filter %}`` block, a
name the caller does not provide (checked before rendering, and ``StrictUndefined``
while rendering) or a value that is None is a one-line :class:`TemplateError`,
so no value reaches a script unescaped by accident. Used for the sbatch job script
(:mod:`orchestrator.submit`) and the C file of a new simulation
(:mod:`orchestrator.scaffold`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes

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


# -- jinja2 with the escape filters enforced ------------------------------------------

def _escaping(escape: Callable[[object], str]) -> Callable[[object, str], str]:
    def apply(value: object, what: str = "") -> str:
        if value is None:
            where = f"; put it inside {{% if {what} %}}" if what else ""
            raise TemplateError(f"inserts {what or 'a value'!r}, but it is not set{where}")
        return escape(value)
    return apply


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True, autoescape=False)
_ENV.filters.update({name: _escaping(escape) for name, escape in FILTERS.items()})


def _check(tree: nodes.Template, context: Mapping[str, Any]) -> None:
    """Refuse, before rendering, an output without an escape filter and a name not in ``context``."""
    block = next(tree.find_all(nodes.FilterBlock), None)
    if block is not None:
        raise TemplateError(f"line {block.lineno}: a {{% filter %}} block would rewrite escaped values; "
                            "escape each value instead")
    for output in tree.find_all(nodes.Output):
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                continue
            if not (isinstance(node, nodes.Filter) and node.name in FILTERS):
                raise TemplateError(f"line {node.lineno}: an output needs an escape filter as its last step, one "
                                    f"of {', '.join(FILTERS)} (e.g. {{{{ value|sh }}}})")
            if isinstance(node.node, nodes.Name) and not node.args:
                node.args.append(nodes.Const(node.node.name))  # names the value in a "not set" error
    missing = sorted(meta.find_undeclared_variables(tree) - set(context))
    if missing:
        raise TemplateError(f"names {missing[0]!r}, which the caller does not provide")


def _one_line(message: str) -> str:
    return " ".join(message.split())


def render(template: str, context: Mapping[str, Any], name: str = "template") -> str:
    """Render the jinja2 source ``template`` with ``context``; see the module docstring.

    Every mistake is a one-line :class:`TemplateError` naming ``name`` (the file).
    """
    try:
        tree = _ENV.parse(template)
        _check(tree, context)
        return _ENV.from_string(tree).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {name}: line {exc.lineno}: {_one_line(exc.message or 'syntax error')}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {name}: {_one_line(str(exc))}") from exc
    except TemplateError as exc:
        raise TemplateError(f"template {name}: {exc}") from exc
