"""Per-host sharding for real: two local processes (4 CPU devices each) read only their halves of each global batch,
assemble the global batch with jax.make_array_from_process_local_data, and resume from a step that one process
reached: the global batches are those of one process reading everything."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TINY, xla_flags
from multihost_batches import digest

from bigjax import config as config_lib
from bigjax import data
from bigjax.data import corpus

FIRST, STEPS = 2, 3  # resume at step 2 (as if one process had run steps 0 and 1), read three batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out, override_sets, timeout=240):
    """One job of two processes that reads the batches of each config (`override_sets`) in turn: each config's
    results, per process."""
    port = free_port()
    overrides = [arg for i, group in enumerate(override_sets) for arg in (["--and"] if i else []) + group]
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=xla_flags(4),
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
            BIGJAX_INIT_TIMEOUT="60",
        )
        command = [sys.executable, str(REPO / "tests" / "multihost_batches.py"), str(out), str(FIRST), str(STEPS)]
        processes.append(
            subprocess.Popen(
                [*command, TINY, *overrides],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for index, (p, (_, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert p.returncode == 0, f"process {index} failed:\n{err[-3000:]}"
    return [
        [json.loads(open(f"{out}.{config}.{index}").read()) for index in range(2)]
        for config in range(len(override_sets))
    ]


def source_overrides(source: str, tmp_path) -> list[str]:
    if source == "parquet":  # the same speeches in a Parquet file, the genre as a string
        texts, labels = corpus.shakespeare_genre("train", 0.1)
        table = pa.table({"speech": texts, "genre": [corpus.GENRE_NAMES[y] for y in labels]})
        pq.write_table(table, tmp_path / "speeches.parquet", row_group_size=100)
        columns = ["--config.data.text_field=speech", "--config.data.label_field=genre"]
        return [f"--config.data.source=parquet:{tmp_path / 'speeches.parquet'}", *columns]
    return [f"--config.data.source={source}"]


SOURCES = ["shakespeare_genre", "parquet"]


@pytest.fixture(scope="module")
def read_by_two_processes(tmp_path_factory):
    """{source: (its overrides, what each of the two processes read)}: one job reads every source in turn (what is
    tested is per source, each in a test of its own; one job spares the second its processes' start-up)."""
    tmp_path = tmp_path_factory.mktemp("sources")
    override_sets = [
        [
            *source_overrides(source, tmp_path),
            "--config.task.name=classification",
            "--config.task.num_classes=2",
            "--config.batch_size=16",
        ]
        for source in SOURCES
    ]
    results = run_two_processes(tmp_path / "hashes.json", override_sets)
    return {source: (overrides, read) for source, overrides, read in zip(SOURCES, override_sets, results, strict=True)}


@pytest.mark.parametrize("source", SOURCES)
def test_two_processes_read_their_shards_and_assemble_the_global_batches(read_by_two_processes, source):
    overrides, results = read_by_two_processes[source]
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
    assert all(r["rows"] == [8] * STEPS for r in results)  # each process reads half of every batch

    config = config_lib.load(TINY, overrides)
    whole = data.train_batches(config, process_index=0, process_count=1)  # one process, reading everything
    whole.set_state({"step": FIRST})
    for i in range(STEPS):
        batch = next(whole)
        halves = [{k: v[p * 8 : (p + 1) * 8] for k, v in batch.items()} for p in range(2)]
        assert [r["host"][i] for r in results] == [digest(h) for h in halves]  # process p read rows p*8..p*8+7
        assert results[0]["global_"][i] == results[1]["global_"][i] == digest(batch)
    assert len(set(results[0]["global_"])) == STEPS
    assert np.all(np.asarray(results[0]["host"]) != np.asarray(results[1]["host"]))
