"""W&B and MLflow beside metrics.jsonl, with the real libraries and no network: W&B offline (its run files read
back), MLflow in its local store (read back by its own client). A run stopped and resumed continues the same tracker
runs, and the eval job logs into them."""

import glob
import json
import struct
import sys

import pytest
from conftest import TINY, copy_run

from bigjax import config as config_lib
from bigjax.run import evaluate, train


@pytest.fixture
def offline(monkeypatch):
    """No tracker reaches the network: W&B offline, MLflow's usage telemetry off (its store is a local file)."""
    for name, value in dict(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    ).items():
        monkeypatch.setenv(name, value)


def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb): W&B's protobuf Records in LevelDB's log format (32 KiB blocks of
    chunks: checksum, length, type), after a 7-byte W&B header. wandb ships no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, records, pending = 7, [], b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:
            position += left_in_block  # a block's tail too short for a header is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path, metric: str) -> list[tuple]:
    """(step, value) of `metric` in a W&B run file's history rows (W&B's own `_step` counts this process's rows)."""
    rows = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_records(path)
        if record.WhichOneof("record_type") == "history"
    ]
    return [(row["step"], row[metric]) for row in rows if metric in row]


def test_a_run_its_resume_and_its_eval_job_log_into_the_same_wandb_and_mlflow_runs(offline, tmp_path):
    config = config_lib.load(TINY, ["--config.trackers=wandb,mlflow", "--config.wandb.name=tiny"])
    workdir = tmp_path / "run"
    train.train(config, workdir, stop_at_step=4)
    train.train(config, workdir)  # resumes at 4
    evaluate.run_eval_job(config, workdir, poll_seconds=0.1)  # checkpoints 4 and 8

    recorded = json.loads((workdir / "trackers.json").read_text())
    rows = [row for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    evals = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8] and [row["step"] for row in evals] == [4, 8]
    assert not list(workdir.glob("events*"))  # TensorBoard was left out of config.trackers

    # W&B: one offline run file per process (first trainer, resumed trainer, eval job), all of the recorded run.
    files = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert [path.rsplit("-", 1)[1] for path in files] == [f"{recorded['wandb']}.wandb"] * 3
    losses = [(row["step"], row["loss"]) for row in rows]
    assert [wandb_history(path, "loss") for path in files] == [losses[:2], losses[2:], []]
    assert wandb_history(files[2], "eval/loss") == [(row["step"], row["loss"]) for row in evals]
    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.project, run.display_name) == (recorded["wandb"], "bigjax", "tiny")
    params = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert params["optim"]["lr"] == config.optim.lr and params["trackers"] == ["wandb", "mlflow"]

    # MLflow: its own client reads the local store back; one run holds both attempts and the eval job's metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bigjax")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [recorded["mlflow"]]
    history = client.get_metric_history(recorded["mlflow"], "loss")
    assert [(m.step, m.value) for m in history] == [(row["step"], row["loss"]) for row in rows]
    eval_history = client.get_metric_history(recorded["mlflow"], "eval/loss")
    assert [(m.step, m.value) for m in eval_history] == [(row["step"], row["loss"]) for row in evals]
    mlflow_run = client.get_run(recorded["mlflow"])
    assert mlflow_run.data.params["optim.lr"] == str(config.optim.lr)
    assert mlflow_run.data.params["model.num_layers"] == "2"
    assert (mlflow_run.info.run_name, mlflow_run.info.status) == ("run", "FINISHED")


def test_the_eval_job_of_a_run_with_no_recorded_tracker_run_logs_to_a_run_of_its_own(
    offline, tiny_run, tmp_path, capsys
):
    workdir = copy_run(tiny_run, tmp_path)  # trained without trackers: no trackers.json
    config = config_lib.load(TINY, ["--config.trackers=mlflow"])
    evaluate.run_eval_job(config, workdir, once=True)
    assert f"eval: {workdir / 'trackers.json'} names no mlflow run" in capsys.readouterr().out
    assert not (workdir / "trackers.json").exists()  # the eval job holds no lock: it records nothing

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("bigjax").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [8]
    assert run.info.status == "FINISHED" and run.data.params == {}  # its own run, ended; the config is the trainer's


@pytest.mark.parametrize("tracker, module", [("wandb", "wandb"), ("mlflow", "sqlalchemy")])
def test_a_tracker_whose_library_is_missing_is_one_error_line_before_anything_is_written(
    tracker, module, cli_in_process, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, module, None)  # `import MODULE` fails, as where it is not installed
    workdir = tmp_path / "run"
    result = cli_in_process(
        "train", "--config", TINY, "--workdir", workdir, f"--config.trackers={tracker}", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: config.trackers has {tracker!r}, but {module} is not installed; pip install 'bigjax[{tracker}]' "
        f"(or drop {tracker!r} from config.trackers)"
    )
    assert not workdir.exists()


def test_mlflow_s_default_local_store_is_refused_for_a_workdir_in_a_bucket(tiny_config):
    from bigjax.ops import trackers

    with pytest.raises(
        trackers.TrackerError, match=r"cannot be in a bucket \(gs://b/run\); set config.mlflow.tracking_uri"
    ):
        trackers.check(tiny_config("", "--config.trackers=mlflow"), "gs://b/run")
    trackers.check(
        tiny_config("", "--config.trackers=mlflow", "--config.mlflow.tracking_uri=http://mlflow:5000"), "gs://b/run"
    )


def test_an_unknown_tracker_is_one_error_line_from_the_config(cli_in_process, tmp_path):
    workdir = tmp_path / "run"
    result = cli_in_process(
        "train", "--config", TINY, "--workdir", workdir, "--config.trackers=tensorboard,neptune", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config.trackers has 'neptune', which bigjax does not know; the trackers are tensorboard, wandb, "
        "mlflow (several at once, e.g. --config.trackers=tensorboard,wandb; metrics.jsonl is always written)"
    ]
    assert not workdir.exists()


def test_a_tracker_that_cannot_start_its_run_is_a_user_error_naming_it(offline, tiny_config, tmp_path):
    """A library's own exception (here MLflow's, for a tracking URI it has no store for) becomes one line for the
    user (a UserError: the CLI prints it as `error: ...`, exit 2), and no run is recorded."""
    from bigjax.ops import trackers
    from bigjax.run import lock

    config = tiny_config("", "--config.trackers=mlflow", "--config.mlflow.tracking_uri=nosuchscheme://tracker")
    with lock.held(tmp_path, say=print) as job_lock, pytest.raises(trackers.TrackerError) as error:
        trackers.start(config, tmp_path, job_lock)
    message = str(error.value)
    assert message.startswith(f"cannot start the mlflow run of {tmp_path}: UnsupportedModelRegistryStoreURIException")
    assert message.endswith("fix that, or drop 'mlflow' from config.trackers, then rerun the same command")
    assert "\n" not in message and not (tmp_path / "trackers.json").exists()


def test_a_trainer_that_lost_its_workdir_lock_logs_nothing_more_to_its_tracker_run(offline, tiny_config, tmp_path):
    """Tracker calls are fenced like a metrics row: once another trainer holds the workdir, a write is refused."""
    from mlflow.tracking import MlflowClient

    from bigjax.ops import trackers
    from bigjax.run import lock

    config = tiny_config("", "--config.trackers=mlflow")
    with lock.held(tmp_path, say=print) as job_lock:
        [run] = trackers.start(config, tmp_path, job_lock)
        run.write(1, {"loss": 1.0})
        record = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        (tmp_path / lock.LOCK_FILE).write_text(json.dumps({**record, "token": "0" * 32}))  # another trainer's now
        with pytest.raises(lock.LockError, match="lost its lock"):
            run.write(2, {"loss": 0.5})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1]
