"""The launchers, run for what can run here: the local ones for real, SLURM's and the TPU VM's against stand-ins
for `srun` and `gcloud` that record their arguments, Kubernetes' manifests as parsed YAML; and the variables
through which they all reach bigjax.parallel.distributed. (launch/slurm.sbatch also runs for real: `make
test-slurm`.)"""

import os
import re
import stat
import subprocess

import pytest
import yaml
from conftest import REPO

from bigjax.parallel import distributed


def run(command, env=None, timeout=60, **kwargs):
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def stand_in(directory, name, body):
    """An executable `name` in `directory` that appends its arguments (one per line) to name.log, then runs body."""
    path = directory / name
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{directory}/{name}.log"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# --------------------------------------------------------------------------------------------------
# bigjax.parallel.distributed: how the environment describes a job


def test_job_from_environment():
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.job_from_environment(explicit) == distributed.JobSpec("10.0.0.1:8476", 4, 3)
    assert distributed.job_from_environment({}) is None
    assert distributed.job_from_environment({"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed.job_from_environment({"BIGJAX_DISTRIBUTED": "auto"}).detected
    # Inside `srun` with several tasks JAX reads SLURM's variables; the batch script itself is one process.
    assert distributed.job_from_environment({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}).detected
    assert distributed.job_from_environment({"SLURM_NTASKS": "8"}) is None
    assert (
        distributed.job_from_environment({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "BIGJAX_DISTRIBUTED": "off"})
        is None
    )

    with pytest.raises(distributed.DistributedError, match="JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID is not set"):
        distributed.job_from_environment({"JAX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match=r"JAX_PROCESS_ID=2 is not in 0..1"):
        distributed.job_from_environment({**explicit, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(distributed.DistributedError, match="BIGJAX_DISTRIBUTED='yes'"):
        distributed.job_from_environment({"BIGJAX_DISTRIBUTED": "yes"})


def test_timeouts_come_from_the_environment_with_minutes_by_default():
    assert distributed.timeouts({}) == {
        "BIGJAX_INIT_TIMEOUT": 300,
        "BIGJAX_HEARTBEAT_TIMEOUT": 100,
        "BIGJAX_SHUTDOWN_TIMEOUT": 120,
    }
    assert distributed.timeouts({"BIGJAX_HEARTBEAT_TIMEOUT": "5"})["BIGJAX_HEARTBEAT_TIMEOUT"] == 5
    with pytest.raises(distributed.DistributedError, match="BIGJAX_INIT_TIMEOUT='soon' must be a positive number"):
        distributed.timeouts({"BIGJAX_INIT_TIMEOUT": "soon"})


def test_a_bad_job_description_is_one_clear_error(cli):
    result = cli(
        "train", "--config", "x.py", "--workdir", "w", check=False, env={**os.environ, "JAX_NUM_PROCESSES": "2"}
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "error: JAX_NUM_PROCESSES=2 but JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID is not set"
    )


# --------------------------------------------------------------------------------------------------
# launch/multiprocess.sh and launch/local.sh


def test_multiprocess_wires_each_process_and_keeps_its_log(tmp_path):
    show = 'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $JAX_PLATFORMS $XLA_FLAGS"'
    result = run(["launch/multiprocess.sh", "3", "--logdir", tmp_path, "--", "sh", "-c", show])
    assert result.returncode == 0, result.stderr
    lines = [(tmp_path / f"process-{i}.log").read_text().split() for i in range(3)]
    assert [line[0] for line in lines] == ["0/3", "1/3", "2/3"]
    assert len({line[1] for line in lines}) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", lines[0][1])
    assert all(line[2] == "cpu" and line[-1] == "--xla_force_host_platform_device_count=2" for line in lines)
    assert "all 3 processes finished" in result.stderr


def test_multiprocess_stops_everyone_when_one_process_fails(tmp_path):
    # Process 1 fails at once; the others would take a minute and then leave a mark. They must not get there.
    script = 'if [ "$JAX_PROCESS_ID" = 1 ]; then echo "bad input"; exit 3; fi; sleep 60; touch "$0.$JAX_PROCESS_ID"'
    result = run(["launch/multiprocess.sh", "3", "--logdir", tmp_path, "--", "sh", "-c", script, tmp_path / "mark"])
    assert result.returncode == 3
    assert "process 1 exited with status 3; stopping the others" in result.stderr
    assert "[process 1] bad input" in result.stderr
    assert not list(tmp_path.glob("mark.*"))


def test_multiprocess_refuses_a_bad_count():
    result = run(["launch/multiprocess.sh", "two", "--", "true"])
    assert result.returncode == 2 and "N must be a positive number, got 'two'" in result.stderr


def test_local_runs_one_process_whatever_the_shell_holds(tmp_path):
    fake = stand_in(tmp_path, "bigjax", 'echo "distributed=$BIGJAX_DISTRIBUTED processes=${JAX_NUM_PROCESSES:-unset}"')
    env = {"BIGJAX": str(fake), "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}
    result = run(["launch/local.sh", "experiments/tiny.py:llama=True", "--config.total_steps=3"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "distributed=off processes=unset"
    assert (tmp_path / "bigjax.log").read_text().split() == [
        "train",
        "--config",
        "experiments/tiny.py:llama=True",
        "--workdir",
        "runs/tiny",
        "--config.total_steps=3",
    ]


# --------------------------------------------------------------------------------------------------
# launch/slurm.sbatch, with a stand-in srun (the real thing: make test-slurm)


def sbatch_with_stand_in_srun(tmp_path, **slurm_env):
    stand_in(tmp_path, "srun", 'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-unset}"')
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_CPUS_ON_NODE": "96",
        "WORKDIR": str(tmp_path / "run"),
        "BIGJAX": "bigjax",
        **slurm_env,
    }
    result = run(["bash", "launch/slurm.sbatch", "experiments/llama_1b.py", "--config.mesh.fsdp=-1"], env=env)
    calls = (tmp_path / "srun.log").read_text().splitlines() if (tmp_path / "srun.log").exists() else []
    return result, calls


def test_slurm_one_task_per_node_drives_all_its_gpus(tmp_path):
    result, calls = sbatch_with_stand_in_srun(tmp_path, SLURM_GPUS_ON_NODE="8")
    assert result.returncode == 0, result.stderr
    check_shared, train = calls
    assert check_shared == f"--ntasks-per-node=1 --ntasks=4 test -d {tmp_path / 'run'}"
    assert train.startswith("--ntasks-per-node=1 --ntasks=4 --cpus-per-task=96 --kill-on-bad-exit=1 --label")
    assert train.endswith(
        f"bigjax train --config experiments/llama_1b.py --workdir {tmp_path / 'run'} --config.mesh.fsdp=-1"
    )
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout  # not JAX's SLURM default of one GPU per task


def test_slurm_one_task_per_gpu(tmp_path):
    result, calls = sbatch_with_stand_in_srun(tmp_path, SLURM_GPUS_ON_NODE="8", BIGJAX_TASKS="gpu")
    assert result.returncode == 0, result.stderr
    assert calls[1].startswith("--ntasks-per-node=8 --ntasks=32 --cpus-per-task=12 --kill-on-bad-exit=1")
    assert "JAX_LOCAL_DEVICE_IDS=unset" in result.stdout  # JAX gives task i GPU i (SLURM_LOCALID)

    (tmp_path / "no-gpus").mkdir()
    result, _ = sbatch_with_stand_in_srun(tmp_path / "no-gpus", BIGJAX_TASKS="gpu")
    assert result.returncode != 0 and "BIGJAX_TASKS=gpu needs GPUS_PER_NODE" in result.stderr


def test_slurm_refuses_a_workdir_not_every_node_sees(tmp_path):
    stand_in(tmp_path, "srun", 'case "$*" in *"test -d"*) exit 1 ;; esac')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "WORKDIR": str(tmp_path / "w")}
    result = run(["bash", "launch/slurm.sbatch", "experiments/tiny.py"], env=env)
    assert (
        result.returncode == 2 and "is not visible on every node; set WORKDIR to a shared file system" in result.stderr
    )


# --------------------------------------------------------------------------------------------------
# launch/tpu_vm.sh, with --dry-run and with a stand-in gcloud


def test_tpu_vm_dry_run_creates_sets_up_runs_everywhere_and_deletes():
    result = run(
        ["launch/tpu_vm.sh", "--name", "demo", "--zone", "us-west4-a", "--create", "v5litepod-16", "--delete"]
        + ["--workdir", "/mnt/shared/run", "--dry-run", "--", "experiments/llama_1b.py", "--config.mesh.fsdp=-1"]
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    verbs = [line.split()[5] if line.startswith("+ gcloud") else line.split()[2] for line in commands]
    assert verbs == ["create", "archive", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
    assert "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite" in commands[0]
    train = commands[-2]
    assert "--worker=all" in train and "BIGJAX_DISTRIBUTED=auto" in train
    assert "bigjax\\ train" in train and "experiments/llama_1b.py\\ --config.mesh.fsdp=-1" in train
    assert commands[-1] == "+ gcloud compute tpus tpu-vm delete demo --quiet --zone=us-west4-a"


def test_tpu_vm_deletes_the_tpu_even_when_training_fails(tmp_path):
    stand_in(tmp_path, "gcloud", 'case "$*" in *"bigjax train"*) exit 1 ;; esac')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = run(["launch/tpu_vm.sh", "--name", "t", "--zone", "z", "--delete", "--", "experiments/tiny.py"], env=env)
    assert result.returncode == 1
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert "bigjax train" in calls[-2] and calls[-1] == "compute tpus tpu-vm delete t --quiet --zone=z"


def test_tpu_vm_trains_into_a_gs_workdir_without_the_shared_storage_check():
    result = run(
        ["launch/tpu_vm.sh", "--name", "t", "--zone", "z", "--workdir", "gs://b/r", "--dry-run", "--"]
        + ["experiments/tiny.py"]
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
    assert not any(".bigjax-shared" in line for line in commands)  # every worker reaches the bucket itself
    assert "--workdir\\ gs://b/r\\ " in commands[-1], commands[-1]


# --------------------------------------------------------------------------------------------------
# launch/k8s: the JobSets' wiring, down to what bigjax.parallel.distributed makes of a pod's environment


def pod_environment(container, jobset_name, index) -> dict:
    """The variables Kubernetes gives pod `index`: field references resolved, $(VAR) expanded."""
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            known = {
                "metadata.labels['jobset.sigs.k8s.io/jobset-name']": jobset_name,
                "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
            }
            env[var["name"]] = known[field]
    return env


@pytest.mark.parametrize("manifest", ["jobset-gpu.yaml", "jobset-tpu.yaml"])
def test_k8s_jobset_wires_coordinator_and_process_ids(manifest):
    jobset = yaml.safe_load((REPO / "launch" / "k8s" / manifest).read_text())
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    [replicated] = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    [container] = job["template"]["spec"]["containers"]
    assert container["command"][:2] == ["bigjax", "train"]
    port = container["ports"][0]["containerPort"]
    name = jobset["metadata"]["name"]

    for index in range(job["parallelism"]):
        spec = distributed.job_from_environment(pod_environment(container, name, index))
        # JobSet names pod i of replicated job R "NAME-R-0-i", in the DNS subdomain NAME.
        assert spec == distributed.JobSpec(f"{name}-{replicated['name']}-0-0.{name}:{port}", job["parallelism"], index)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    workdir = container["command"][container["command"].index("--workdir") + 1]
    assert any(workdir.startswith(mount + "/") for mount in mounts)  # on the shared volume
