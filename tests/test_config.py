"""loop.yml validation: a corpus of malformed files, overrides, placeholders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_config, render_args
from orchestrator.errors import ConfigError
from tests.conftest import REPO, fast_loop, write_loop

BAD = sorted((Path(__file__).parent / "configs" / "bad").glob("*.yml"))


def expectation(path: Path) -> str:
    text = path.read_bytes().decode("utf-8", errors="replace")  # one file in the corpus is not UTF-8
    first = text.splitlines()[0] if text else ""
    assert first.startswith("# expect: "), f"{path} lacks its '# expect:' line"
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_config_gives_one_line_and_exit_2(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ")
    assert expectation(path) in lines[0]
    assert "Traceback" not in err


def test_run_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(BAD[5]), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expectation(BAD[5]) in proc.stderr
    assert not any(tmp_path.iterdir()), "a bad config must not create a run directory"


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/nonexistent/loop.yml"]) == 2
    assert "/nonexistent/loop.yml: no such file" in capsys.readouterr().err


def test_bad_flag_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--frobnicate"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_example_is_valid() -> None:
    cfg = load_config(REPO / "examples/sine/loop.yml")
    assert cfg.target.tolerance == 0.05 and cfg.target.successes == 5
    assert cfg.sims.check.ranks == 4 and cfg.sims.generate.ranks == 8


def test_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    path = write_loop(tmp_path, fast_loop())
    cfg = load_config(path, ["seed=7", "target.tolerance=0.01", "policy.pipeline=false", "training.hparams.lr=3e-3"])
    assert cfg.seed == 7
    assert cfg.target.tolerance == 0.01
    assert cfg.policy.pipeline is False
    assert cfg.training.hparams.model_dump(exclude_unset=True) == {"lr": 0.003}


def test_override_of_unknown_key_is_caught(tmp_path: Path) -> None:
    path = write_loop(tmp_path, fast_loop())
    with pytest.raises(ConfigError, match=r"target\.tolerence: unknown key \(did you mean 'tolerance'\?\)"):
        load_config(path, ["target.tolerence=0.1"])


@pytest.mark.parametrize("item", ["novalue", "=3", "seed"])
def test_malformed_override(tmp_path: Path, item: str) -> None:
    path = write_loop(tmp_path, fast_loop())
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(path, [item])


def test_override_through_a_scalar(tmp_path: Path) -> None:
    path = write_loop(tmp_path, fast_loop())
    with pytest.raises(ConfigError, match="seed is not a mapping"):
        load_config(path, ["seed.x=1"])


def test_render_args_full_precision_and_specs() -> None:
    args = ["--x", "{x}", "--x2={x:.3f}", "--seed", "{seed}", "literal"]
    out = render_args(args, {"x": 0.1 + 0.2, "seed": 12})
    assert out == ["--x", "0.30000000000000004", "--x2=0.300", "--seed", "12", "literal"]


def test_render_args_values_are_never_split_or_shell_expanded() -> None:
    out = render_args(["{x}"], {"x": 1.5})
    assert out == ["1.5"]
    out = render_args(["$(rm -rf /) {seed}"], {"seed": 3})
    assert out == ["$(rm -rf /) 3"]


def test_multi_input_placeholders(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["inputs"] = [{"name": "t", "lo": 0, "hi": 10}, {"name": "zeta", "lo": 0.1, "hi": 1}]
    cfg["sims"]["check"]["args"] = ["--t", "{t}", "--zeta", "{zeta}"]
    cfg["sims"]["generate"]["args"] = ["--t-lo", "{t_lo}", "--zeta-hi", "{zeta_hi}"]
    assert load_config(write_loop(tmp_path, cfg)).input_names == ["t", "zeta"]
    cfg["sims"]["generate"]["args"] = ["--lo", "{lo}"]  # {lo} exists for one input only
    with pytest.raises(ConfigError, match=r"unknown placeholder \{lo\}"):
        load_config(write_loop(tmp_path, cfg))


def test_auto_backend_follows_the_allocation(tmp_path: Path) -> None:
    from orchestrator.allocation import Allocation, Node
    from orchestrator.runner import resolve_auto

    cfg = load_config(write_loop(tmp_path, fast_loop()))
    assert cfg.training.backend == "auto"
    local = Allocation(nodes=(Node("box", 2),), in_slurm=False, job_id=None)
    slurm = Allocation(nodes=(Node("n1", 8), Node("n2", 8)), in_slurm=True, job_id="7")
    assert resolve_auto(cfg, local).training.backend == "local"
    assert resolve_auto(cfg, slurm).training.backend == "allocation"
    pinned = load_config(write_loop(tmp_path, fast_loop(**{"training.backend": "jobqueue"})))
    assert resolve_auto(pinned, slurm).training.backend == "jobqueue"


# ---------------------------------------------------------------- issue 24: bad input, one line each


def _validate(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code = main(["validate", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["43-alias-bomb-model-kwargs", "44-alias-bomb-typed-key", "45-recursive-alias"])
def test_an_alias_bomb_is_refused_at_load_in_bounded_time_and_memory(name: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import time
    import tracemalloc

    path = Path(__file__).parent / "configs" / "bad" / f"{name}.yml"
    tracemalloc.start()
    start = time.monotonic()
    try:
        err = _validate(path, capsys)
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expectation(path) in err
    assert took < 1.0, f"{took:.2f} s"
    assert peak < 20e6, f"{peak / 1e6:.0f} MB"


def test_aliases_within_the_bound_still_load(tmp_path: Path) -> None:
    path = write_loop(tmp_path, fast_loop(**{"training.model_kwargs": {"hidden": 0}}))
    path.write_text("x-sizes: &sizes [64, 64]\n" + path.read_text().replace("hidden: 0", "hidden: *sizes"))
    with pytest.raises(ConfigError, match="x-sizes: unknown key"):  # the alias loaded; the extra key is refused
        load_config(path)
    path.write_text(path.read_text().replace("x-sizes: &sizes [64, 64]\n", "").replace("*sizes", "&s [64, 64]"))
    assert load_config(path).training.model_kwargs == {"hidden": [64, 64]}


def test_an_alias_bomb_in_a_set_value_is_refused(tmp_path: Path) -> None:
    path = write_loop(tmp_path, fast_loop())
    bomb = "[" + ",".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + ["*a"] * 9) + "]"
    nested = "&b [" + ",".join(["*a"] * 10) + "]"
    value = bomb[:-1] + "," + nested + "," + ",".join(["*b"] * 2000) + "]"
    with pytest.raises(ConfigError, match=r"aliases expand this value past 100000 values"):
        load_config(path, [f"training.model_kwargs.k={value}"])


def test_a_malformed_set_value_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _validate(write_loop(tmp_path, fast_loop()), capsys, "--set", "target.tolerance=[0.1")
    assert "--set 'target.tolerance=[0.1': value '[0.1' is not valid YAML at column 5: expected ',' or ']'" in err


@pytest.mark.parametrize("arg", ["--jobid=12", "--jobid", "--jobi=12", "--overlap", "--overcommit", "-O", "-n4",
                                 "--ntasks=2", "-w", "--nodelist=n1", "-N2", "--cpus-per-task=4", "-c2",
                                 "--cpu-bind=cores\n--jobid=1", "--x\x1b[2J"])
def test_srun_args_that_leave_the_placement_are_refused(tmp_path: Path, arg: str) -> None:
    path = write_loop(tmp_path, fast_loop(**{"sims.generate.srun_args": ["--cpu-bind=cores", arg]}))
    with pytest.raises(ConfigError, match=r"sims\.generate\.srun_args: .*(is not allowed|control character)") as err:
        load_config(path)
    assert repr(arg) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_srun_args_that_keep_the_placement_are_taken(tmp_path: Path) -> None:
    ok = ["--cpu-bind=cores", "--mem-per-cpu=500M", "-l", "--label", "--kill-on-bad-exit=1", "--export=ALL"]
    path = write_loop(tmp_path, fast_loop(**{"sims.generate.srun_args": ok}))
    assert load_config(path).sims.generate.srun_args == ok


def test_a_sim_binary_that_is_a_symlink_loop_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sim").symlink_to(tmp_path / "sim")
    path = write_loop(tmp_path, fast_loop(**{"sims.check.binary": "./sim"}))
    err = _validate(path, capsys)
    assert f"sims.check.binary: './sim': {tmp_path}/sim is a symbolic link that never ends (a loop)" in err


def test_a_template_that_fails_at_run_time_is_one_line(tmp_path: Path) -> None:
    """A template that renders with the trial values but not with a run's (here: a division by x)."""
    import jinja2

    from orchestrator.rundeck import SimIO, render_template

    template = jinja2.Template("{{ 1 / x }}")
    assert render_template("t", template, {"x": 2.0}) == "0.5"
    with pytest.raises(ConfigError, match=r"^template deck: rendering failed with x=0\.0: ZeroDivisionError"):
        SimIO(templates={"deck": template}).stage(tmp_path / "run", {"x": 0.0})


def test_tensorboard_dir_naming_a_file_is_refused(tmp_path: Path) -> None:
    from orchestrator.config import tensorboard_dir

    (tmp_path / "loop.yml").write_text("a file")
    with pytest.raises(ConfigError, match=rf"^tracking\.tensorboard_dir: 'loop.yml': {tmp_path}/loop.yml is not a"):
        tensorboard_dir("loop.yml", tmp_path)
    with pytest.raises(ConfigError, match=r"'loop.yml/tb': .*loop.yml is not a directory"):
        tensorboard_dir("loop.yml/tb", tmp_path)
    assert tensorboard_dir("tb/deeper", tmp_path) == tmp_path / "tb" / "deeper"
