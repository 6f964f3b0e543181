"""Recovery time: JAX's persistent compilation cache for train, eval and generate (bigjax.run.compilation_cache),
and the
account of where a run's wall time went (bigjax.run.goodput)."""

import os
import re

import jax
import pytest
from conftest import TINY, run_cli
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from bigjax.config import ConfigError
from bigjax.ops import metrics, plot
from bigjax.run import compilation_cache, goodput


def test_the_cache_is_the_configs_then_the_environments_then_beside_the_workdir(tmp_path):
    where = compilation_cache.directory
    env = {"JAX_COMPILATION_CACHE_DIR": "/shared/jax"}
    assert where("", tmp_path, env={}) == str(tmp_path / "compilation_cache")
    assert where("", "gs://bucket/run", env={}) == "gs://bucket/run/compilation_cache"
    assert where("", tmp_path, reads_only=True, env={}) == os.path.expanduser("~/.cache/bigjax/jax")  # generate
    assert where("", tmp_path, env=env) == where("", tmp_path, reads_only=True, env=env) == "/shared/jax"
    assert where("", tmp_path, env={**env, "JAX_ENABLE_COMPILATION_CACHE": "false"}) is None
    # An explicit setting wins over the environment.
    assert where(str(tmp_path / "mine"), tmp_path, env=env) == str(tmp_path / "mine")
    assert where("relative", tmp_path, env=env) == os.path.abspath("relative")  # the same for every process
    assert where("gs://bucket/jax", tmp_path, env=env) == "gs://bucket/jax"
    assert where("off", tmp_path, env=env) is None and where("OFF", tmp_path, env={}) is None


def test_a_switch_word_is_not_taken_for_a_directory(tiny_config):
    with pytest.raises(ConfigError, match="config.compilation_cache='false' would be a directory.*use 'off'"):
        tiny_config("", "config.compilation_cache=false")
    assert tiny_config("", "config.compilation_cache=off").compilation_cache == "off"


@pytest.fixture
def suite_cache_settings():
    """JAX's cache settings (the suite's shared cache), put back after the test."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_each_run_in_a_process_compiles_into_its_own_cache(tiny_config, tmp_path, suite_cache_settings):
    """A process that runs several commands (a notebook, these tests): JAX settles on a cache at its first compile,
    so `use` must make it let go of the last one."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    first, second = tmp_path / "first", tmp_path / "second"
    assert compilation_cache.use(tiny_config("", f"config.compilation_cache={first}"), tmp_path).where == str(first)
    jax.jit(lambda x: x * 3 + 1)(1.0)
    written_first = sorted(first.iterdir())
    assert written_first
    assert compilation_cache.use(tiny_config("", f"config.compilation_cache={second}"), tmp_path).where == str(second)
    jax.jit(lambda x: x * 5 - 2)(1.0)
    written_second = sorted(second.iterdir())
    assert sorted(first.iterdir()) == written_first and written_second
    assert compilation_cache.use(tiny_config("", "config.compilation_cache=off"), tmp_path).where is None
    jax.jit(lambda x: x * 7 - 3)(1.0)
    assert sorted(first.iterdir()) == written_first and sorted(second.iterdir()) == written_second


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """One run in two `bigjax train` processes, stopped at step 4 and resumed to 8, with the cache in its default
    place: (workdir, the first's output, the cache's files after it, the second's output)."""
    workdir = tmp_path_factory.mktemp("recovery") / "run"
    env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, however fast it compiles here
    first = run_cli("train", "--config", TINY, "--workdir", workdir, "--stop-at-step", 4, env=env).stdout
    written = sorted(path.name for path in (workdir / "compilation_cache").iterdir())
    second = run_cli("train", "--config", TINY, "--workdir", workdir, env=env).stdout
    return workdir, first, written, second


def cache_counts(stdout: str) -> tuple[int, int]:
    """(programs loaded, written) by the compilation cache, as the goodput line says."""
    loaded, written = re.search(r"^goodput: .*: (\d+) programs? loaded, (\d+) written\)$", stdout, re.M).groups()
    return int(loaded), int(written)


def test_a_resumed_process_loads_what_the_first_compiled(resumed_run):
    workdir, first, written, second = resumed_run
    assert any(name.startswith("jit_train_step-") for name in written), written
    assert cache_counts(first) == (0, len(written))
    assert "resumed from step 4" in second and "finished at step 8" in second
    loaded, written_again = cache_counts(second)
    assert loaded >= 1 and written_again == 0  # nothing compiled that was not in the cache
    assert sorted(path.name for path in (workdir / "compilation_cache").iterdir()) == written


def test_every_exit_accounts_for_the_wall_time_in_a_line_and_a_row(resumed_run, tmp_path):
    workdir, first, _, second = resumed_run
    for stdout in (first, second):
        assert len(re.findall(r"^goodput: \d+% of [\d.]+s in steps; startup ", stdout, re.M)) == 1, stdout
    rows = [row for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "goodput/wall" in row]
    assert [row["step"] for row in rows] == [4, 8]
    for row in rows:
        phases = [row[f"goodput/{phase}"] for phase in goodput.PHASES]
        assert all(seconds >= 0 for seconds in phases)
        assert 0 < sum(phases) <= row["goodput/wall"] * (1 + 1e-5)  # the rows are rounded to 6 digits
        assert all(row[f"goodput/{phase}"] > 0 for phase in ("restore", "compile", "data", "steps", "checkpoint"))
    assert plot.plot([str(workdir)], str(tmp_path / "plot.png"))  # the rows do not disturb `bigjax plot`


def test_each_second_is_charged_to_one_phase():
    now = [100.0]
    clock = goodput.Clock(started=98.0, now=lambda: now[0])  # the command started 2 s before the clock was made
    with clock("restore"):
        now[0] += 3
        with clock("compile"):  # a block inside another is charged to the inner one alone
            now[0] += 1
    clock.switch_to("steps")
    now[0] += 4
    with clock("data"):
        now[0] += 0.5
    totals = clock.totals()
    assert totals == dict(wall=10.5, startup=2, restore=3, compile=1, data=0.5, steps=4, eval=0, checkpoint=0)
    assert goodput.line(totals).startswith("goodput: 38% of 10.5s in steps; startup 2.0s, restore 3.0s, compile 1.0s")
