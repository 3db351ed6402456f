"""How one kind of sim meets its run directory: inputs in, results out.

Every run has its own directory, which is the sim's cwd. A :class:`SimIO`
(one per sim role, built once at start by :func:`sim_io`) puts the code's
input deck there, rendered from Jinja2 templates with the same placeholders as
``args`` (an undefined name is an error, found at ``validate``/start, not
mid-campaign), copies the listed static files beside it, and reads the result
back: simkit's ``--out`` file by default, or a declared output file, or a
user's parser. ``--out`` is passed only to simkit sims.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.config import OutputFile, SimConfig, resolve_path
from orchestrator.errors import ConfigError
from orchestrator.outputs import Parser, load_parser, read_output, run_parser

if TYPE_CHECKING:  # jinja2 is imported for sims with templates only: a simkit sim's start does not pay for it
    import jinja2
from orchestrator.results import Table, read_table

POINTS_HINT = ("; a generate run's templates get `points` and `points_file` when the coordinator chooses its "
               "points: set policy.points_per_run (points per generate run)")


def _environment(base: Path) -> jinja2.Environment:
    import jinja2

    # Input decks are not HTML: no autoescape; keep the file's last newline.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(base)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def _check_template(env: jinja2.Environment, src: Path, allowed: set[str], key: str
                    ) -> tuple[jinja2.Template, set[str]]:
    """The compiled template and the names it uses; an unknown name or bad syntax is a ConfigError."""
    import jinja2.meta

    try:
        text = src.read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read template {src}: {exc.strerror}") from exc
    try:
        ast = env.parse(text, filename=str(src))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{key}: {src}, line {exc.lineno}: template syntax error: {exc.message}") from exc
    used = jinja2.meta.find_undeclared_variables(ast)
    unknown = sorted(used - allowed)
    if unknown:
        hint = POINTS_HINT if {"points", "points_file"} & set(unknown) else ""
        raise ConfigError(f"{key}: {src} uses undefined variable(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}{hint}")
    return env.from_string(text), used


@dataclass(frozen=True)
class SimIO:
    """Inputs staged into, and the result read from, one sim's run directories."""

    templates: Mapping[str, jinja2.Template] = field(default_factory=dict)
    """{file name in the run dir: compiled template}."""
    files: tuple[Path, ...] = ()
    output: OutputFile | None = None
    parser: Parser | None = None
    parser_ref: str | None = None
    uses: frozenset[str] = frozenset()
    """The names its templates use (e.g. ``points``)."""

    @property
    def simkit(self) -> bool:
        return self.output is None and self.parser is None

    def out_args(self, out_path: Path) -> list[str]:
        """What the command line gets after the sim's own args: ``--out FILE`` for simkit sims only."""
        return ["--out", str(out_path)] if self.simkit else []

    def stage(self, run_dir: Path, fields: Mapping[str, float | int]) -> None:
        """Render the input deck and copy the static files into ``run_dir``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for src in self.files:
            shutil.copy2(src, run_dir / src.name)
        for name, template in self.templates.items():
            (run_dir / name).write_text(render_template(f"template {name}", template, fields))

    def collect(self, run_dir: Path, out_path: Path, *, ncols: int, nrows: int | None) -> Table:
        """The run's table; raises MalformedResult with one line when it is missing or wrong."""
        if self.parser is not None:
            assert self.parser_ref is not None
            return run_parser(self.parser, self.parser_ref, run_dir, ncols=ncols, nrows=nrows)
        if self.output is not None:
            return read_output(run_dir, self.output, ncols=ncols, nrows=nrows)
        return read_table(out_path, ncols=ncols, nrows=nrows)


def render_template(what: str, template: jinja2.Template, fields: Mapping[str, Any]) -> str:
    """``template`` rendered; whatever fails while rendering (an undefined name, a filter given the wrong
    type, a division by zero) is a one-line ConfigError naming ``what`` (the template) and the values."""
    import jinja2  # imported already (the template is jinja2's); the name is needed for the except below

    try:
        return template.render(**fields)
    except jinja2.UndefinedError as exc:  # a name only the runtime lacks
        raise ConfigError(f"{what}: {exc.message}") from exc
    except Exception as exc:  # the template's own code: jinja2 lets Python's errors through
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items() if k != "points")
        raise ConfigError(f"{what}: rendering failed with {shown}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


SIMKIT = SimIO()
"""A simkit sim: nothing staged, ``--out`` given, the .npy read back."""


def sim_io(sim: SimConfig, base: Path, allowed: set[str], key: str) -> SimIO:
    """Check and load what ``sim`` declares (templates, files, parser), paths relative to ``base``."""
    templates: dict[str, jinja2.Template] = {}
    uses: frozenset[str] = frozenset()
    if sim.templates:
        env = _environment(base)
        checked = {name: _check_template(env, resolve_path(base / src, f"{key}.templates.{name}"), allowed,
                                         f"{key}.templates.{name}")
                   for name, src in sim.templates.items()}
        templates = {name: template for name, (template, _) in checked.items()}
        uses = frozenset().union(*(used for _, used in checked.values()))
    files = []
    for item in sim.files:
        path = resolve_path(base / item, f"{key}.files: {item!r}")
        if not path.is_file():
            raise ConfigError(f"{key}.files: {item!r} is not a file (looked at {path})")
        if path.name in sim.templates:
            raise ConfigError(f"{key}.files: {path.name!r} is also a rendered template; keep one")
        files.append(path)
    parser = load_parser(sim.parser, base, f"{key}.parser") if sim.parser else None
    return SimIO(templates, tuple(files), sim.output, parser, sim.parser, uses)


def write_points(path: Path, points: np.ndarray) -> Path:
    """The points file a generate sim reads (simkit_points): one point per line, full precision."""
    lines = ["# points chosen by the orchestrator: one per line, one column per input"]
    lines += [" ".join(repr(float(v)) for v in row) for row in points]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
