"""A workdir in a bucket: `--workdir gs://bucket/run` trains, resumes exactly, sets an unusable checkpoint aside,
and is read by the eval job and `generate`.

The bucket is a local Google Cloud Storage emulator (the PyPI package gcp-storage-emulator) that every client
bigjax uses is pointed at: TensorStore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL, gcsfs (etils.epath: bigjax's
own files and Orbax's directories) and google-cloud-storage (TensorBoard) by STORAGE_EMULATOR_HOST.
"""

import json
import os
import socket
import time

import numpy as np
import pytest
from conftest import TINY
from etils import epath

from bigjax import config as config_lib
from bigjax.ops import metrics
from bigjax.run import train

BUCKET = "bigjax-test"


def emulate_cloud_storage_more_closely():
    """Three gaps in the emulator, where real Cloud Storage behaves as below.

    - It sends an object's generation (x-goog-generation) with its bytes, and TensorStore reads it. The emulator
      leaves it out, so reading an object written earlier in the run fails against the emulator alone.
    - It honours ifGenerationMatch preconditions (answering 412 when the generation differs).
    - It knows `moveTo`. The emulator answers 501, which gcsfs retries for 40 s before it copies and deletes;
      a 400 makes it copy and delete at once.
    """
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def refuse_move(request, response, storage, *args, **kwargs):
        response.status = HTTPStatus.BAD_REQUEST
        response.json({"error": {"code": 400, "message": "moveTo is not emulated"}})

    server.HANDLERS = ((r"^.*/o/.*/moveTo/o/.*$", {"POST": refuse_move}), *server.HANDLERS)

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except NotFound:
            pass
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation  # objects.get calls it for ?alt=media

    def with_preconditions(handler):
        """Cloud Storage refuses a request whose ifGenerationMatch is not the object's generation (0: absent) with
        412; the workdir lock's compare-and-swap relies on it."""

        def checked(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if wanted:
                name = request.params.get("object_id") or request.query.get("name", [None])[0]
                name = name or request.data["meta"].get("name")
                try:
                    current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
                except NotFound:
                    current = "0"
                if current != wanted[0]:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return None
            return handler(request, response, storage, *args, **kwargs)

        return checked

    replaced = {download: download_with_generation}
    replaced.update({handler: with_preconditions(handler) for handler in (objects.insert, objects.delete, objects.get)})
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler in replaced:
                handlers[method] = replaced[handler]


@pytest.fixture(scope="module")
def bucket_env():
    """The environment that points bigjax (and this process: `pointed_at_the_emulator`) at a fresh emulator."""
    from gcp_storage_emulator.server import create_server

    emulate_cloud_storage_more_closely()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://localhost:{port}"
    yield {
        **os.environ,
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore's credentials for a test server
        "NO_GCE_CHECK": "True",  # google-auth: no waiting for a GCE metadata server that is not there
        "EPATH_USE_TF": "false",  # etils.epath through gcsfs, which the emulator reaches (TensorFlow's GCS does not)
    }
    server.stop()


@pytest.fixture(autouse=True)
def pointed_at_the_emulator(bucket_env, monkeypatch):
    """This process reaches the emulator too, for each test: its own view of the bucket (epath through gcsfs, as
    bigjax's), and the commands it runs in process. The clients read these variables when they are made or asked,
    except epath: it picks TensorFlow's GCS (which the emulator does not reach) or gcsfs once per process, at its
    first path of any kind, so that choice is made again under EPATH_USE_TF=false, and again after the test."""
    from etils.epath import gpath

    for name, value in bucket_env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    gpath._is_tf_installed.cache_clear()
    yield
    monkeypatch.undo()
    gpath._is_tf_installed.cache_clear()


def test_a_bucket_workdir_trains_resumes_evaluates_and_generates(cli, cli_in_process, bucket_env, tmp_path):
    """The resume is a `bigjax train` process of its own, as after a preemption (the emulator reached by the
    environment alone); the other commands run the same command line in this process."""
    run = f"gs://{BUCKET}/run"
    args = ["--config", TINY, "--config.log_every=1"]
    cli_in_process("train", *args, "--workdir", run, "--stop-at-step", "4")
    # A step Orbax began and never committed, as a killed save leaves it: set aside on resume, not read.
    epath.Path(f"{run}/checkpoints/6/params/half-written").write_text("x")
    resumed = cli("train", *args, "--workdir", run, env=bucket_env)
    assert "resumed from step 4" in resumed.stdout
    assert f"checkpoint 6 at {run}/checkpoints/6 has no commit_success.txt: a save that never" in resumed.stdout
    quarantined = [p.name for p in epath.Path(f"{run}/quarantine").iterdir() if p.is_dir()]
    assert [name.split(".")[0] for name in quarantined] == ["6"]

    cli_in_process("eval", "--workdir", run, "--once")
    sample = cli_in_process("generate", "--workdir", run, "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert sample.stdout.startswith("ROMEO:")
    files = [p.name for p in epath.Path(run).iterdir()]
    assert any(name.startswith("events.out.tfevents") for name in files)  # TensorBoard
    eval_rows = epath.Path(f"{run}/eval/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in eval_rows] == [8]

    # The same run on a local disk, uninterrupted.
    local = tmp_path / "local"
    train.train(config_lib.load(TINY, ["config.log_every=1"]), local)
    train_rows = epath.Path(f"{run}/metrics.jsonl").read_text().splitlines()
    bucket_losses = {row["step"]: row["loss"] for row in map(json.loads, train_rows) if "loss" in row}
    local_losses = {row["step"]: row["loss"] for row in metrics.read_jsonl(local / "metrics.jsonl") if "loss" in row}
    assert sorted(bucket_losses) == list(range(1, 9))
    np.testing.assert_array_equal([bucket_losses[s] for s in range(1, 9)], [local_losses[s] for s in range(1, 9)])


def foreign_lock(heartbeat_age: float) -> dict:
    now = time.time()
    return dict(
        host="other-host",
        pid=4242,
        pid_start=1,
        machine="another-boot/pid:[1]",
        command="bigjax train ...",
        since=now - 3600,
        heartbeat=now - heartbeat_age,
        lease_seconds=120.0,
        token="theirs",
    )


def test_a_bucket_workdir_is_locked_like_a_disk(cli_in_process):
    run = f"gs://{BUCKET}/locked"
    args = ["train", "--config", TINY, "--config.log_every=1", "--workdir", run]
    lock_record = epath.Path(f"{run}/lock.json")
    lock_record.write_text(json.dumps(foreign_lock(5)))

    refused = cli_in_process(*args, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"error: {run} is in use by another trainer: pid 4242 on host other-host" in refused.stderr
    assert json.loads(lock_record.read_text())["token"] == "theirs"

    lock_record.write_text(json.dumps(foreign_lock(500)))
    taken = cli_in_process(*args)
    assert f"took over the lock of {run}: its holder is gone (pid 4242 on host other-host" in taken.stdout
    assert not lock_record.exists()  # given up at the end


def test_the_bucket_lock_record_is_changed_only_by_compare_and_swap():
    """Two changes of the lock's record made from the same read, the second one written last: refused, because the
    first moved the object's generation on. Then a write from a fresh read goes through."""
    from bigjax.run import lock

    store = lock._BucketRecord(epath.Path(f"gs://{BUCKET}/cas/lock.json"))
    outcomes = []
    with store.change() as (first_read, first_write):
        with store.change() as (second_read, second_write):
            second_write({"token": "second"})
        try:
            first_write({"token": "first"})
            outcomes.append("first overwrote the second")
        except lock.Conflict:
            outcomes.append("first refused")
    with store.change() as (current, write):
        outcomes.append(current["token"])
        write(None)
    assert outcomes == ["first refused", "second"]


def test_a_bucket_workdir_is_plotted_into_the_bucket(cli_in_process):
    run = f"gs://{BUCKET}/plotted"
    rows = "".join(json.dumps({"step": step, "loss": 6.0 - step / 4}) + "\n" for step in (2, 4, 6))
    epath.Path(f"{run}/metrics.jsonl").write_text(rows)
    assert cli_in_process("plot", "--workdir", run).stdout == f"wrote {run}/plot.png\n"
    assert epath.Path(f"{run}/plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
