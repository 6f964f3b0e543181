"""`bigjax plot`: the curves of synthetic runs (metrics.jsonl files written here, no training) as a PNG."""

import json
import struct
import sys

import pytest
from conftest import cli_main

from bigjax import cli
from bigjax.ops import plot


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def two_runs(tmp_path):
    """Run a: a language model with the eval job's file; run b: a classifier with inline evaluations only."""
    a, b = tmp_path / "a", tmp_path / "b"
    train_a = [{"step": s, "loss": 6.0 - s / 4, "accuracy": s / 100, "learning_rate": 1e-3} for s in (2, 4, 6, 8)]
    # Step 6 again, redone after a restore: its last row counts.
    write_jsonl(a / "metrics.jsonl", train_a + [{"step": 6, "loss": 4.25, "accuracy": 0.07}])
    write_jsonl(
        a / "eval" / "metrics.jsonl", [{"step": s, "loss": 5.8 - s / 4, "bits_per_char": 8.3 - s / 8} for s in (4, 8)]
    )
    rows_b = [{"step": s, "loss": 2.0 - s / 10} for s in (2, 4, 6, 8)] + [
        {"step": 8, "eval/loss": 1.5, "eval/accuracy": 0.6}
    ]
    write_jsonl(b / "metrics.jsonl", rows_b)
    return str(a), str(b)


def test_every_run_is_drawn_in_every_panel_it_logged(two_runs):
    a, b = two_runs
    figure = plot.make_figure([plot.read_run(a), plot.read_run(b)])
    loss, accuracy, bits = figure.axes
    assert [axes.get_title() for axes in figure.axes] == ["loss", "accuracy", "bits per char"]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss.get_lines()}
    assert drawn == {
        f"{a} train": ([2, 4, 6, 8], [5.5, 5.0, 4.25, 4.0]),  # step 6's last row
        f"{a} eval": ([4, 8], [4.8, 3.8]),
        f"{b} train": ([2, 4, 6, 8], [1.8, 1.6, 1.4, 1.2]),
        f"{b} eval": ([8], [1.5]),  # the trainer's inline evaluation
    }
    assert [text.get_text() for text in loss.get_legend().get_texts()] == list(drawn)
    assert [line.get_label() for line in accuracy.get_lines()] == [f"{a} train", f"{b} eval"]
    assert [line.get_label() for line in bits.get_lines()] == [f"{a} eval"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_command_writes_a_png_of_several_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "plots" / "both.png"
    assert cli_main("plot", "--workdir", *two_runs, "--out", str(out)) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert png_size(out) == (3 * 500, 400)  # three panels of 5 x 4 inches at 100 dpi


def test_one_run_is_plotted_into_its_workdir(two_runs, capsys):
    b = two_runs[1]
    assert cli_main("plot", "--workdir", b) == 0
    assert capsys.readouterr().out == f"wrote {b}/plot.png\n"
    assert png_size(plot.paths.workdir(b) / "plot.png") == (2 * 500, 400)  # loss and accuracy: no bits logged


def test_several_runs_go_to_runs_png_by_default():
    assert plot.default_out(["runs/a", "runs/b"]) == "runs.png"
    assert plot.default_out(["gs://bucket/run/"]) == "gs://bucket/run/plot.png"


@pytest.mark.parametrize("made", [True, False], ids=["empty workdir", "no workdir"])
def test_a_workdir_without_metrics_is_one_error_line(two_runs, tmp_path, capsys, made):
    empty = tmp_path / "empty"
    if made:
        empty.mkdir()
    assert cli_main("plot", "--workdir", two_runs[0], empty) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    expected = f"error: {empty} has no metrics to plot" if made else f"error: {empty}: no such workdir"
    assert captured.err.startswith(expected)
    assert not (tmp_path / "runs.png").exists()


def test_without_matplotlib_the_error_says_what_to_install(two_runs, capsys, monkeypatch):
    # As if it were not installed: `import` of a module that sys.modules maps to None raises ImportError.
    for name in ["matplotlib", *[name for name in sys.modules if name.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli_main("plot", "--workdir", two_runs[0]) == 2
    assert capsys.readouterr().err == "error: bigjax plot needs matplotlib; pip install 'bigjax[plot]'\n"


def test_plot_takes_no_config_overrides(two_runs, capsys):
    with pytest.raises(SystemExit):
        cli.main(["plot", "--workdir", two_runs[0], "--config.seed=1"])
    assert "plot takes no --config.* overrides" in capsys.readouterr().err


def test_damaged_lines_are_skipped_each_named_by_its_line_number(two_runs, capsys):
    a = plot.paths.workdir(two_runs[0])
    # A JSON scalar, a row without a step, then a row cut short by a kill.
    (a / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 5.5}\n5\n{"loss": 5}\n{"step": 4, "loss": 5.0}\n{"step": 6, "lo'
    )
    assert cli_main("plot", "--workdir", str(a)) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith("warning: ")]
    assert [line.split(" is not a metrics row")[0] for line in warnings] == [
        f"warning: {a}/metrics.jsonl:{number}" for number in (2, 3, 5)
    ]
    assert captured.err == "" and (a / "plot.png").exists()
    assert plot.series(plot.read_run(str(a)).train, "loss") == ([2, 4], [5.5, 5.0])


def test_a_metrics_file_that_is_a_directory_is_one_error_line(two_runs, capsys):
    a = plot.paths.workdir(two_runs[0])
    (a / "metrics.jsonl").unlink()
    (a / "metrics.jsonl").mkdir()
    assert cli_main("plot", "--workdir", str(a)) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: cannot read {a}/metrics.jsonl: Is a directory; move the") and len(err.splitlines()) == 1
    )
