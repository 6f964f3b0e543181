"""Workdir files are data: nothing in a checkpoint, dataset or config in a workdir is unpickled or executed.

Checkpoints are read back only through Orbax's array (tensorstore) and JSON handlers, config.json with json;
experiment files are code, but the user chose to run them and they do not live in a workdir.
"""

import pathlib
import pickle
import re
import shutil

from conftest import REPO, TINY, copy_run

from bigjax.run import checkpoint

# Ways Python code runs what a file says; none may read a workdir.
CODE_LOADERS = re.compile(
    r"\bimport (pickle|cloudpickle|dill|joblib|marshal|shelve)\b|\bfrom (pickle|cloudpickle|dill|joblib) import"
    r"|allow_pickle\s*=\s*True|\btorch\.load\(|\byaml\.(unsafe_)?load\(|\beval\(|\bexec\("
)


class Trap:
    """Unpickling this creates the file `path`: evidence that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def plant(directory, evidence):
    """Pickles and Python files that would leave a file in `evidence` if anything loaded or imported them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("evil.pkl", "state.pickle", "params.npy"):
        (directory / name).write_bytes(pickle.dumps(Trap(evidence / f"unpickled-{directory.name}-{name}")))
    for name in ("__init__.py", "sitecustomize.py", "evil.py"):
        marker = evidence / f"ran-{directory.name}-{name}"
        (directory / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")


def test_bigjax_has_no_code_that_unpickles_or_evaluates_files():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "bigjax").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if CODE_LOADERS.search(line)
    ]
    assert not offenders, offenders


def test_unexpected_files_in_a_workdir_and_its_checkpoints_run_nothing(cli_in_process, tiny_run, tmp_path):
    """`bigjax eval` and `bigjax train` by their command lines, in this process: what is tested is what they read (a
    process of their own would start from the repository, where no planted file is on its path, all the same)."""
    workdir, evidence = copy_run(tiny_run, tmp_path), tmp_path / "evidence"  # checkpoints 4 and 8
    evidence.mkdir()
    cli = cli_in_process
    train = ("train", "--config", TINY, "--workdir", workdir)
    checkpoints, step_4 = workdir / "checkpoints", workdir / "checkpoints" / "4"
    for directory in (workdir, checkpoints, step_4, step_4 / "params", step_4 / "params" / "d", step_4 / "data"):
        plant(directory, evidence)
    # A pickle where Orbax's legacy format keeps a msgpack file: it is read as msgpack, which runs nothing, and
    # fails; so checkpoint 8 cannot be read, while checkpoint 4, with its stray files, reads back fine.
    shutil.copyfile(step_4 / "params" / "evil.pkl", checkpoints / "8" / "params" / "checkpoint")

    out = cli("eval", "--config", TINY, "--workdir", workdir, "--once").stdout
    assert "checkpoint 8 at" in out and "cannot be read" in out and "validation at step 4" in out
    assert checkpoint.committed_steps(workdir) == [4, 8]  # the eval job reads; it never moves anything

    out = cli(*train).stdout
    assert "checkpoint 8 at" in out and "resumed from step 4" in out and "finished at step 8" in out
    assert list(evidence.iterdir()) == []  # nothing was unpickled or imported, by eval or by the trainer
