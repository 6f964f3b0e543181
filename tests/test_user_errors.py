"""Errors meant for the user: one base class, and the command line turns any of them into one `error:` line."""

import ast
import importlib
import inspect
import pkgutil

import pytest
from conftest import cli_main

import bigjax
from bigjax import cli
from bigjax.commands import plan as plan_command
from bigjax.errors import UserError
from bigjax.ops import logs

# Exceptions bigjax raises and catches itself, never shown to a user: each with the reason it is not a UserError.
INTERNAL = {
    "bigjax.run.lock.Conflict": "a compare-and-swap lost a race; lock.py catches it and reads the record again",
    "bigjax.run.lock.Held": "the record's flock stayed taken past FLOCK_WAIT_SECONDS; acquire turns it into LockError",
}


def bigjax_modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(bigjax.__path__, "bigjax.")]


def exceptions_defined_in_bigjax() -> dict:
    """{"bigjax.module.Name": class} of every exception class a bigjax module defines."""
    found = {}
    for module in bigjax_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def user_error_classes() -> list[type]:
    return [cls for name, cls in exceptions_defined_in_bigjax().items() if name not in INTERNAL]


def test_every_exception_meant_for_users_derives_from_user_error():
    found = exceptions_defined_in_bigjax()
    # The walk reaches the errors of the whole package, the data package's included.
    for name in (
        "config.ConfigError",
        "data.errors.DataError",
        "run.train.TrainingError",
        "ops.xla_flags.XlaFlagsError",
    ):
        assert f"bigjax.{name}" in found
    assert set(INTERNAL) <= set(found), "an INTERNAL entry names a class that no longer exists"
    not_user_errors = [name for name, cls in found.items() if name not in INTERNAL and not issubclass(cls, UserError)]
    assert not not_user_errors, (
        f"derive them from bigjax.errors.UserError (or list them in INTERNAL): {not_user_errors}"
    )


def test_the_errors_module_imports_nothing_so_every_module_can_import_it():
    import bigjax.errors

    tree = ast.parse(inspect.getsource(bigjax.errors))
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


class ANewError(UserError):
    """An error class the command line has never heard of."""


@pytest.mark.parametrize("error_class", [ANewError, *user_error_classes()], ids=lambda cls: cls.__name__)
def test_any_user_error_reaches_the_user_as_one_line(error_class, monkeypatch, capsys):
    def run_that_fails(args, overrides):
        raise error_class("the batch does not divide; set config.batch_size to a multiple of 8")

    monkeypatch.setattr(plan_command, "run", run_that_fails)

    assert cli_main("plan", "--config", "experiments/tiny.py") == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the batch does not divide; set config.batch_size to a multiple of 8\n"
    assert captured.out == ""


def test_a_user_error_points_to_the_log_file_when_a_library_wrote_one(monkeypatch, capsys, tmp_path):
    class Handler:
        path = str(tmp_path / "logs" / "plan.log")

    def run_that_fails(args, overrides):
        raise ANewError("saving failed; free some space")

    monkeypatch.setattr(plan_command, "run", run_that_fails)
    monkeypatch.setattr(logs, "send_library_logs_to_file", lambda workdir, command: None)
    monkeypatch.setattr(logs, "_handler", Handler())

    assert cli.main(["plan", "--config", "experiments/tiny.py"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: saving failed; free some space", f"details: {Handler.path}"]


def test_a_bug_is_still_a_traceback(monkeypatch):
    def run_with_a_bug(args, overrides):
        raise KeyError("not a user error")

    monkeypatch.setattr(plan_command, "run", run_with_a_bug)
    monkeypatch.setattr(logs, "send_library_logs_to_file", lambda workdir, command: None)
    with pytest.raises(KeyError):
        cli.main(["plan", "--config", "experiments/tiny.py"])


def test_workdir_files_of_the_wrong_kind_are_one_error_each(tiny_config, tmp_path):
    """A `quarantine` that is a file, a metrics.jsonl that is a directory: one error naming it; what is there stays."""
    from bigjax.ops import metrics
    from bigjax.run import checkpoint, train

    workdir = tmp_path / "run"
    (workdir / "checkpoints" / ("4" + checkpoint.TMP_SUFFIX)).mkdir(parents=True)  # never committed: set aside
    (workdir / "quarantine").write_text("the user's file")
    with pytest.raises(
        checkpoint.CheckpointError, match=f"cannot move checkpoint 4 at .* into {workdir}/quarantine: File exists; move"
    ):
        train.train(tiny_config(), workdir)
    assert (workdir / "quarantine").read_text() == "the user's file"
    assert (workdir / "checkpoints" / ("4" + checkpoint.TMP_SUFFIX)).is_dir()

    (workdir / "metrics.jsonl").mkdir()
    with pytest.raises(metrics.MetricsError, match=f"cannot write {workdir}/metrics.jsonl: Is a directory; move"):
        metrics.MetricWriter(workdir)
    with pytest.raises(metrics.MetricsError, match=f"cannot read {workdir}/metrics.jsonl: Is a directory; move"):
        metrics.read_jsonl(workdir / "metrics.jsonl")
