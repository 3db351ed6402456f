"""``new-sim NAME``: scaffold a simulation a newcomer can build and plug into loop.yml.

It writes ``sims/NAME.c`` from the commented template
``orchestrator/templates/new-sim.c.in`` (a working simkit sim of y = x*x that
serves as both check and generate sim), appends ``add_simulation(NAME
sims/NAME.c)`` to ``CMakeLists.txt`` (once: a second run does not add it
again), and prints the loop.yml entry to paste and the rebuild command. It never
overwrites a file: an existing ``sims/NAME.c`` is an error.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

TEMPLATE = Path(__file__).resolve().parent / "templates" / "new-sim.c.in"
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RESERVED = frozenset({"all", "clean", "help", "install", "test", "package", "simkit", "edit_cache",
                      "rebuild_cache", "list_install_components", "mpiexec", "mpirun", "python", "python3"})
MPICC_RECORD = ".mpicc"
"""Written by scripts/bootstrap.sh into the venv: the mpicc the sims were built with."""


def build_mpicc() -> Path | None:
    """The MPI compiler this environment's sims were built with: bootstrap's record, else the wheel's."""
    record = Path(sys.prefix) / MPICC_RECORD
    try:
        recorded = record.read_text().strip()
    except OSError:
        recorded = ""
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    wheel = Path(sys.executable).parent / "mpicc"
    return wheel if wheel.is_file() else None


def rebuild_command(root: Path) -> list[str]:
    """What rebuilds the sims into this environment, whatever PATH says: this Python's pip, and the
    MPI compiler named explicitly (CMake would otherwise take the first mpicc on PATH).

    ``-v``: pip shows the build's output only when asked, and a newcomer's compiler warnings
    (an unused variable, a missing prototype) are what they most need to see.
    """
    argv = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", str(root.resolve())]
    constraints = root / "constraints.txt"
    if constraints.is_file():
        argv += ["-c", str(constraints.resolve())]
    mpicc = build_mpicc()
    if mpicc is not None:
        argv.append(f"--config-settings=cmake.define.MPI_C_COMPILER={mpicc}")
    return argv
_ADD_SIM = re.compile(r"^\s*add_simulation\(\s*([^\s)]+)\s+([^\s)]+)\s*\)", re.MULTILINE)


@dataclass(frozen=True)
class Scaffolded:
    """What ``new-sim`` did."""

    source: Path
    cmake: Path
    cmake_line_added: bool


def validate_name(name: str) -> str:
    """A sim name: a CMake target and a file name, safe in a shell and in C strings."""
    if not NAME.match(name):
        raise UsageError(
            f"new-sim: {name!r} is not a valid simulation name: use a letter, then letters, digits, "
            "'-' or '_' (at most 64), e.g. sim-heat"
        )
    if name.lower() in RESERVED:
        raise UsageError(f"new-sim: {name!r} is reserved (a CMake target or a tool name); choose another")
    return name


def cmake_declarations(text: str) -> dict[str, str]:
    """``add_simulation(name source)`` lines of a CMakeLists.txt: {name: source}."""
    return {m.group(1): m.group(2) for m in _ADD_SIM.finditer(text)}


def scaffold(name: str, root: Path) -> Scaffolded:
    """Write sims/NAME.c and declare it in CMakeLists.txt under ``root``."""
    validate_name(name)
    cmake = root / "CMakeLists.txt"
    source = root / "sims" / f"{name}.c"
    rel = f"sims/{name}.c"
    try:
        cmake_text = cmake.read_text()
    except OSError as exc:
        raise UsageError(f"new-sim: cannot read {cmake} ({exc.strerror}); run it in the project root or "
                         "give --root") from exc
    if "function(add_simulation" not in cmake_text:
        raise UsageError(f"new-sim: {cmake} defines no add_simulation(); is {root} the orchestrator project?")
    declared = cmake_declarations(cmake_text).get(name)
    if declared is not None and declared != rel:
        raise UsageError(f"new-sim: {cmake} already declares {name!r} with source {declared}; "
                         "choose another name")
    if source.exists():
        raise UsageError(f"new-sim: {source} already exists; not overwriting it "
                         "(delete it or choose another name)")
    from orchestrator.templating import render  # jinja2: not on every command's start

    text = render(TEMPLATE.read_text(), {"name": name}, name=TEMPLATE.name)
    source.parent.mkdir(parents=True, exist_ok=True)
    with source.open("x") as f:  # "x": never overwrite, even if it appeared just now
        f.write(text)
    added = declared is None
    if added:
        sep = "" if cmake_text.endswith("\n") or not cmake_text else "\n"
        with cmake.open("a") as f:
            f.write(f"{sep}add_simulation({name} {rel})\n")
    return Scaffolded(source, cmake, added)


def loop_entry(name: str) -> str:
    """The loop.yml sections that use the new sim (one input x, one output y)."""
    return f"""\
inputs:
  - {{name: x, lo: -1.0, hi: 1.0}}
outputs: [y]
sims:
  check:                      # the true value at one query point
    binary: {name}
    args: ["--x", "{{x}}"]
    ranks: 1
  generate:                   # training data: every rank draws points in the window
    binary: {name}
    args: ["--lo", "{{lo}}", "--hi", "{{hi}}", "--points-per-rank", "32", "--seed", "{{seed}}"]
    ranks: 4
"""


def add_parser(sub: Any) -> None:
    """The ``new-sim`` subcommand's flags."""
    p = sub.add_parser("new-sim", help="scaffold sims/NAME.c (simkit) and declare it in CMakeLists.txt")
    p.add_argument("name", help="simulation name, e.g. sim-heat (the binary's name)")
    p.add_argument("--root", type=Path, default=Path("."),
                   help="project root (default: the current directory)")


def main(args: argparse.Namespace) -> int:
    """``python -m orchestrator new-sim NAME``."""
    done = scaffold(args.name, args.root)
    print(f"wrote {done.source}")
    if done.cmake_line_added:
        print(f"added add_simulation({args.name} sims/{args.name}.c) to {done.cmake}")
    else:
        print(f"{done.cmake} already declares {args.name}; left it as it is")
    print("\nnext:")
    print(f"  1. edit {done.source}: replace f() with your physics (the comments walk you through it)")
    print(f"  2. rebuild (installs {args.name} next to python and shows the compiler's warnings; "
          "`make setup` rebuilds quietly):\n"
          f"     {shlex.join(rebuild_command(args.root))}")
    print(f"  3. try it:  mpiexec -n 2 {args.name} --lo 0 --hi 1 --points-per-rank 4 "
          f"--out /tmp/{args.name}.npy")
    print("  4. use it in a loop.yml (see docs/adding-a-simulation.md):\n")
    print("\n".join("     " + line for line in loop_entry(args.name).splitlines()))
    return 0
