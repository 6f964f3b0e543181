"""What each test costs: CPU seconds (its own and its subprocesses'), the Python and `bigjax` processes it starts,
and the XLA compiles done (and served by the persistent compilation cache) in it and in them.

CPU time rather than wall time: it hardly depends on what else runs on the machine. Opt-in, so it costs nothing
otherwise:

    BIGJAX_TEST_COSTS=costs.jsonl .venv/bin/python -m pytest -p no:xdist tests   # or with -n 3: it works per worker
    .venv/bin/python tests/costs.py costs.jsonl [--top 20]                         # per file, top tests, totals

tests/conftest.py registers this module as a plugin when BIGJAX_TEST_COSTS is set. It puts tests/costs_site on
PYTHONPATH, so every Python process a test starts appends its own record (costs_site/sitecustomize.py).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import resource
import time

import pytest

SITE = pathlib.Path(__file__).resolve().parent / "costs_site"
TEST_ENV = "BIGJAX_TEST_COSTS_TEST"


def _site_module():
    """costs_site/sitecustomize.py under another name (this process must not record itself as a subprocess)."""
    spec = importlib.util.spec_from_file_location("bigjax_test_costs_site", SITE / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CostsPlugin:
    def __init__(self, path: str):
        self.path = path
        self.site = _site_module()
        self.compiles = self.site.watch_compiles()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))

    def snapshot(self) -> dict:
        return {
            "cpu_self": self.site.cpu_seconds(resource.RUSAGE_SELF),
            "cpu_children": self.site.cpu_seconds(resource.RUSAGE_CHILDREN),
            "wall": time.perf_counter(),
            **self.compiles.as_dict(),
        }

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        """Setup, call and teardown together: a module fixture's cost goes to the test that first needs it."""
        os.environ[TEST_ENV] = item.nodeid
        before = self.snapshot()
        try:
            yield
        finally:
            after = self.snapshot()
            del os.environ[TEST_ENV]
            delta = {key: round(after[key] - before[key], 3) for key in before}
            self.site.append(self.path, {"kind": "test", "test": item.nodeid, **delta})


def register(config) -> None:
    """Called by tests/conftest.py: records costs when BIGJAX_TEST_COSTS names a file."""
    path = os.environ.get("BIGJAX_TEST_COSTS")
    if path:
        config.pluginmanager.register(CostsPlugin(os.path.abspath(path)), "bigjax-test-costs")


# --- the summary -------------------------------------------------------------------------------------------------


def file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def load(path: str) -> dict[str, dict]:
    """Per test: its own record plus the sums of its subprocesses' records."""
    tests: dict[str, dict] = collections.defaultdict(
        lambda: {"procs": 0, "bigjax": 0, "sub_compiles": 0, "sub_hits": 0, "sub_short": 0}
    )
    for line in pathlib.Path(path).read_text().splitlines():
        record = json.loads(line)
        test = tests[record["test"]]
        if record["kind"] == "test":
            test.update({k: v for k, v in record.items() if k not in ("kind", "test")})
        elif record["kind"] == "start":
            test["procs"] += 1
            test["bigjax"] += record["bigjax"]
        elif record["kind"] == "exit":
            test["bigjax"] += record["bigjax_late"]
            test["sub_compiles"] += record["compiled"]
            test["sub_hits"] += record["cache_hits"]
            test["sub_short"] += record["short"]
    for test in tests.values():  # a test still running (or killed) has its processes' lines and none of its own
        test.setdefault("cpu_self", 0.0)
        test.setdefault("cpu_children", 0.0)
        test["cpu"] = test["cpu_self"] + test["cpu_children"]
        test["compiles"] = test.get("compiled", 0) + test["sub_compiles"]
        test["hits"] = test.get("cache_hits", 0) + test["sub_hits"]
        test["uncached"] = test.get("short", 0) + test["sub_short"]
    return dict(tests)


# compiles: not served by the persistent cache; hits: served by it; uncached: compiles too short to be written to it
COLUMNS = ("cpu", "cpu_self", "cpu_children", "procs", "bigjax", "compiles", "hits", "uncached")


def per_file(tests: dict[str, dict]) -> dict[str, dict]:
    files: dict[str, dict] = {}
    for nodeid, test in tests.items():
        row = files.setdefault(file_of(nodeid), {"tests": 0, **{c: 0 for c in COLUMNS}})
        row["tests"] += 1
        for column in COLUMNS:
            row[column] += test.get(column, 0)
    return files


def table(rows: dict[str, dict], first: str) -> str:
    header = f"{first:58s} {'tests':>5s} " + " ".join(f"{c:>12s}" for c in COLUMNS)
    lines = [header]
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["cpu"]):
        cells = " ".join(f"{row[c]:12.1f}" if isinstance(row[c], float) else f"{row[c]:12d}" for c in COLUMNS)
        lines.append(f"{name[-58:]:58s} {row.get('tests', 1):5d} {cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    tests = {k: v for k, v in load(args.path).items() if k}
    files = per_file(tests)
    print(table(files, "file"))
    total = {c: sum(row[c] for row in files.values()) for c in COLUMNS}
    print(table({"TOTAL": {"tests": len(tests), **total}}, ""))
    largest = max(files, key=lambda f: files[f]["cpu"])
    print(
        f"\nOn 2 cores the tests take at least half the total CPU, {total['cpu'] / 2:.0f} s (`make test`'s three"
        f" workers share them); the largest file: {largest}, {files[largest]['cpu']:.0f} s"
    )
    top = dict(sorted(tests.items(), key=lambda kv: -kv[1]["cpu"])[: args.top])
    print("\n" + table(top, "test"))


if __name__ == "__main__":
    main()
