"""`bigjax plot`: the curves of one or more runs as one PNG, read from what the runs logged.

    bigjax plot --workdir runs/shakespeare_char                      # -> runs/shakespeare_char/plot.png
    bigjax plot --workdir runs/a runs/b --out compare.png            # two runs overlaid

A panel per metric, steps across: the loss always, then the accuracy and the bits per character (or per byte) where
a run logged them. Each run has its colour; training is a solid line (DIR/metrics.jsonl), evaluation a dashed one
with dots (the eval job's DIR/eval/metrics.jsonl, and the trainer's inline `eval/` rows). A step logged more than
once (redone after a restore) counts with its last row, as everywhere in bigjax; a damaged line (cut short by a kill,
edited by hand) is skipped with a warning naming it. Workdirs may be in a bucket.

matplotlib is imported only here, and drawn with its Agg backend without pyplot, so plotting changes no global
matplotlib state (a notebook's backend stays as it was). It comes with `pip install 'bigjax[plot]'`.
"""

from __future__ import annotations

import dataclasses
import io

from bigjax import paths
from bigjax.errors import UserError
from bigjax.ops import metrics
from bigjax.run.workdir import Run as Workdir  # its files; `Run` here is its rows

INSTALL_PLOT = "pip install 'bigjax[plot]'"
PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
DPI = 100
# The panels after the loss, each drawn when some run logged its metric: the first of each tuple that one did.
OPTIONAL_PANELS = (("accuracy",), ("bits_per_char", "bits_per_byte"))


class PlotError(UserError):
    """Nothing to plot, or no way to plot it: a message for the user."""


@dataclasses.dataclass
class Run:
    """What one workdir logged: its training rows and its evaluation rows."""

    name: str  # the workdir as given: the legend's label
    train: list[dict]
    eval: list[dict]


def read_run(workdir: str) -> Run:
    """The rows of DIR/metrics.jsonl and DIR/eval/metrics.jsonl; an error when the workdir logged nothing."""
    saved = Workdir(workdir)
    if not saved.path.exists():
        raise PlotError(f"{workdir}: no such workdir; pass the --workdir of a run that trained")
    logged = metrics.read_jsonl(saved.metrics_file)
    # The trainer's inline evaluations sit in its own file as eval/NAME; the eval job writes plain names.
    train = [row for row in logged if not _is_inline_eval(row)]
    inline = [{k.removeprefix("eval/"): value for k, value in row.items()} for row in logged if _is_inline_eval(row)]
    evals = inline + metrics.read_jsonl(saved.eval_metrics_file)
    if not train and not evals:
        raise PlotError(
            f"{workdir} has no metrics to plot: {workdir}/metrics.jsonl and {workdir}/eval/metrics.jsonl are missing "
            "or empty; train there first (bigjax train --config ... --workdir DIR)"
        )
    return Run(workdir, train, evals)


def _is_inline_eval(row: dict) -> bool:
    return any(key.startswith("eval/") for key in row)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order; a step logged more than once counts with its last row."""
    by_step = {row["step"]: row[key] for row in rows if key in row and "step" in row}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def panels(runs: list[Run]) -> list[str]:
    """The metric of each panel to draw: the loss, then each optional panel's that some run logged."""
    chosen = ["loss"]
    for candidates in OPTIONAL_PANELS:
        logged = [key for key in candidates if any(series(run.train + run.eval, key)[0] for run in runs)]
        chosen += logged[:1]
    return chosen


def make_figure(runs: list[Run]):
    """A matplotlib Figure (Agg canvas) with a panel per metric and every run drawn in each."""
    figure_class, canvas_class = import_matplotlib()
    chosen = panels(runs)
    figure = figure_class(figsize=(PANEL_INCHES[0] * len(chosen), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    canvas_class(figure)
    for axes, key in zip(figure.subplots(1, len(chosen), squeeze=False)[0], chosen, strict=True):
        for colour, run in enumerate(runs):
            draw_run(axes, run, key, f"C{colour % 10}")
        axes.set(title=key.replace("_", " "), xlabel="step")
        axes.xaxis.get_major_locator().set_params(integer=True)  # steps, never 2.5
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def draw_run(axes, run: Run, key: str, colour: str) -> None:
    steps, values = series(run.train, key)
    if steps:
        axes.plot(steps, values, "-", color=colour, label=f"{run.name} train")
    steps, values = series(run.eval, key)
    if steps:
        axes.plot(steps, values, "--o", color=colour, markersize=3, label=f"{run.name} eval")


def import_matplotlib():
    """(Figure, FigureCanvasAgg), or an error saying what to install."""
    try:
        import matplotlib  # noqa: F401  (first: a missing matplotlib is found here, whatever was imported before)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"bigjax plot needs matplotlib; {INSTALL_PLOT}") from None
    return Figure, FigureCanvasAgg


def default_out(workdirs: list[str]) -> str:
    """DIR/plot.png for one run, ./runs.png for several."""
    return f"{workdirs[0].rstrip('/')}/plot.png" if len(workdirs) == 1 else "runs.png"


def plot(workdirs: list[str], out: str | None = None) -> str:
    """Write the PNG of these runs' curves; returns where."""
    runs = [read_run(workdir) for workdir in workdirs]
    figure = make_figure(runs)
    out = out or default_out(workdirs)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    path = paths.workdir(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png.getvalue())
    except OSError as error:
        reason = error.strerror or error
        raise PlotError(f"cannot write {out}: {reason}; pass --out PATH.png where you can write") from None
    return out
