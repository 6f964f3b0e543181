"""A workdir in a bucket: `--workdir gs://bucket/run` trains, resumes exactly, sets an unusable checkpoint aside,
and is read by the eval job and `generate`.

The bucket is a local Google Cloud Storage emulator (the PyPI package gcp-storage-emulator) that every client
bigjax uses is pointed at: TensorStore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL, gcsfs (etils.epath: bigjax's
own files and Orbax's directories) and google-cloud-storage (TensorBoard) by STORAGE_EMULATOR_HOST.
"""

import os
import socket

import numpy as np
import pytest
from conftest import TINY

from bigjax import metrics

BUCKET = "bigjax-test"


def emulate_cloud_storage_more_closely():
    """Two gaps in the emulator, where real Cloud Storage behaves as below.

    - It sends an object's generation (x-goog-generation) with its bytes, and TensorStore reads it. The emulator
      leaves it out, so reading an object written earlier in the run fails against the emulator alone.
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
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = download_with_generation


@pytest.fixture(scope="module")
def bucket_env():
    from gcp_storage_emulator.server import create_server

    emulate_cloud_storage_more_closely()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://localhost:{port}"
    emulator = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore's credentials for a test server
        "NO_GCE_CHECK": "True",  # google-auth: no waiting for a GCE metadata server that is not there
        "EPATH_USE_TF": "false",  # etils.epath through gcsfs, which the emulator reaches (TensorFlow's GCS does not)
    }
    saved = {key: os.environ.get(key) for key in emulator}
    os.environ.update(emulator)  # for this process's own reads of the bucket, too
    yield dict(os.environ)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def losses(workdir) -> dict:
    return {row["step"]: row["loss"] for row in metrics.read_jsonl(f"{workdir}/metrics.jsonl")}


def test_a_bucket_workdir_trains_resumes_evaluates_and_generates(cli, bucket_env, tmp_path):
    from etils import epath

    run = f"gs://{BUCKET}/run"
    args = ["--config", TINY, "--config.log_every=1"]
    cli("train", *args, "--workdir", run, "--stop-at-step", "4", env=bucket_env)
    # A step Orbax began and never committed, as a killed save leaves it: set aside on resume, not read.
    (epath.Path(run) / "checkpoints" / "6" / "params").mkdir(parents=True)
    (epath.Path(run) / "checkpoints" / "6" / "params" / "half-written").write_text("x")
    resumed = cli("train", *args, "--workdir", run, env=bucket_env)
    assert "resumed from step 4" in resumed.stdout
    assert "checkpoint 6 at gs://bigjax-test/run/checkpoints/6 has no commit_success.txt" in resumed.stdout
    assert [p.name.split(".")[0] for p in (epath.Path(run) / "quarantine").iterdir() if p.is_dir()] == ["6"]

    local = tmp_path / "local"
    cli("train", *args, "--workdir", local)
    assert sorted(losses(run)) == list(range(1, 9))
    np.testing.assert_array_equal([losses(run)[s] for s in range(1, 9)], [losses(local)[s] for s in range(1, 9)])

    cli("eval", "--workdir", run, "--once", env=bucket_env)
    assert [row["step"] for row in metrics.read_jsonl(f"{run}/eval/metrics.jsonl")] == [8]
    sample = cli("generate", "--workdir", run, "--prompt", "ROMEO:", "--max-new-tokens", "8", env=bucket_env)
    assert sample.stdout.startswith("ROMEO:")
    assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(run).iterdir())  # TensorBoard
