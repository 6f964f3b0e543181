"""The imports between bigjax's modules form no circle, read from the source with ast (nothing is imported).

Imports inside functions count too: a lazy import hides a circle from Python's loader, not from a reader, and
becomes a load-time circle the day someone moves it to the top of the file."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "bigjax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, path: pathlib.Path, modules: set) -> set:
    """The bigjax modules `name` imports anywhere in its file: `from bigjax.data import sources` names the module
    bigjax.data.sources, `from bigjax.data import DataError` the package bigjax.data."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..data import y
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found |= {full} if full in modules else {base} & modules
    return found - {name}


def import_graph() -> dict[str, set]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(name, path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set]) -> list[str] | None:
    """One circle of imports, as [a, b, ..., a], or None (a depth-first search)."""
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            return on_path[on_path.index(module) :] + [module]
        if module in done:
            return None
        on_path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        on_path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert {"bigjax.config", "bigjax.data.sources", "bigjax.data.tfds_source"} <= set(graph)
    assert "bigjax.data.sources" in graph["bigjax.data.pipeline"]  # from bigjax.data import sources
    assert "bigjax.data.tfds_source" in graph["bigjax.data.sources"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_bigjax_modules_import_each_other_in_no_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_optimizer_and_fine_tuning_share_the_parameter_paths_without_importing_each_other():
    graph = import_graph()
    assert (
        "bigjax.run.finetune" not in graph["bigjax.run.optim"]
        and "bigjax.run.optim" not in graph["bigjax.run.finetune"]
    )
    assert "bigjax.params" in graph["bigjax.run.optim"] and "bigjax.params" in graph["bigjax.run.finetune"]


def test_writing_metrics_does_not_import_torch_or_cloud_storage_and_leaves_them_importable(tmp_path):
    """tensorboardX imports torch, boto3 and google-cloud-storage when they are installed (torch: 1.2-1.5 s of CPU at
    every start of bigjax); bigjax's writer imports it with them hidden, and then they import as ever, and the
    writers of events in a bucket see google-cloud-storage. Run in a fresh process: this one may have them."""
    import subprocess
    import sys

    script = f"""
import sys
from bigjax.ops import metrics
writer = metrics.MetricWriter({str(tmp_path)!r}, enabled=True)
writer.write(1, {{"loss": 2.5}}, console=False)
writer.close()
for name in ("torch", "boto3", "google.cloud.storage"):
    assert name not in sys.modules, "tensorboardX imported " + name
assert not metrics.tensorboardx().record_writer.GCS_ENABLED
assert metrics.tensorboardx(bucket=True).record_writer.GCS_ENABLED  # tensorboardX's gs:// writer works from now on
from google.cloud import storage
import torch
assert torch.zeros(2).sum().item() == 0.0
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard events written"
