"""End to end through the command line: train, the separate eval job, generate."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY, read_until, run_cli

from bigjax import generate
from bigjax.ops import metrics
from bigjax.run import checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny experiment trained through the CLI for 8 steps (checkpoints 4 and 8): (workdir, stdout).
    Tests that change the workdir change a copy (`copy_of`)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    return workdir, run_cli("train", "--config", TINY, "--workdir", workdir).stdout


def copy_of(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def test_train_then_eval_then_resume(cli_in_process, trained, tmp_path):
    """Training is the process (the module's `trained`); evaluating and resuming it run the same command lines in
    this one (the eval job as a process: test_eval_job_started_before_training_evaluates_every_checkpoint_once)."""
    out = trained[1]
    workdir = copy_of(trained, tmp_path)
    assert "finished at step 8" in out
    assert (workdir / "config.json").exists()
    rows = [row for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row]  # not the goodput row
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "step_time"):
        assert all(key in r for r in rows), key

    out = cli_in_process("eval", "--config", TINY, "--workdir", workdir, "--once").stdout
    assert "validation at step 8" in out and "bits_per_char" in out

    # Run again with the same workdir: it resumes from step 8 and trains on to the new end.
    out = cli_in_process("train", "--config", TINY + ":steps=10", "--workdir", workdir).stdout
    assert "resumed from step 8" in out and "finished at step 10" in out


def completions(stdout: str, prompts) -> list[str]:
    """The completions `bigjax generate` printed for several prompts, each after its header and prompt."""
    parts = re.split(r"^----- \d+ of \d+ -----\n", stdout, flags=re.MULTILINE)
    assert parts[0] == "" and len(parts) == len(prompts) + 1, stdout
    assert all(part.startswith(prompt) for part, prompt in zip(parts[1:], prompts, strict=True))
    return [part[len(prompt) : -1] for part, prompt in zip(parts[1:], prompts, strict=True)]  # less print's newline


def test_generate_a_batch_with_stops_from_the_newest_committed_checkpoint(cli, cli_in_process, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("JULIET:\n")
    # 40 new tokens: past the tiny model's context of 32.
    command = ["generate", "--workdir", workdir, "--prompt", "ROMEO:", "--prompts-file", prompts_file]
    command += ["--temperature", "1.0", "--top-k", "10", "--top-p", "0.95", "--seed", "1", "--max-new-tokens", "40"]
    at_8 = cli(*command)
    assert "generating from checkpoint 8" in at_8.stderr
    romeo, juliet = completions(at_8.stdout, ["ROMEO:", "JULIET:"])
    assert len(romeo) >= 10 and len(juliet) >= 10

    # Which checkpoint it reads is asked in this process (the same command, no process of its own to start).
    at_4 = cli_in_process(*command, "--step", "4")
    assert "generating from checkpoint 4" in at_4.stderr and at_4.stdout != at_8.stdout

    # A newer step that was never committed (step 4's arrays, no commit marker): Orbax would list it as the
    # latest; generate reads the newest committed one, and refuses it by name.
    shutil.copytree(workdir / "checkpoints" / "4", workdir / "checkpoints" / "12")
    (workdir / "checkpoints" / "12" / checkpoint.COMMIT_MARKER).unlink()
    again = cli_in_process(*command)
    assert "generating from checkpoint 8" in again.stderr and again.stdout == at_8.stdout
    refused = cli_in_process(*command, "--step", "12", check=False)
    assert refused.returncode == 2 and "checkpoint 12 is not a committed checkpoint" in refused.stderr

    # A stop string from the middle of ROMEO's completion ends it there; JULIET's goes on as before.
    stop = next(
        romeo[i : i + 2]
        for i in range(4, len(romeo) - 1)
        if romeo[i : i + 2].isprintable() and romeo[i : i + 2] not in juliet
    )
    stopped = cli_in_process(*command, "--stop", "never written", stop)
    assert completions(stopped.stdout, ["ROMEO:", "JULIET:"]) == [romeo[: romeo.index(stop)], juliet]


def test_eval_job_started_before_training_evaluates_every_checkpoint_once(cli_in_process, tmp_path):
    """Beside the trainer, it also scores each checkpoint on an lm-evaluation-harness task (config.eval.harness; a
    local YAML over local data, tests/lm_eval_tasks/), logged in the same row as the loss. The eval job is a process;
    the trainer, and the job restarted at the end, run the command line in this one."""
    workdir, stderr = tmp_path / "run", tmp_path / "eval-stderr"
    harness = ["tasks=bigjax_choice", "include_path=tests/lm_eval_tasks", "limit=2"]
    command = ["eval", "--config", TINY, "--workdir", workdir, "--poll", "0.2", "--timeout", "300"]
    command += [f"--config.eval.harness.{setting}" for setting in harness]
    with open(stderr, "w") as errors:
        evaluator = subprocess.Popen(
            [sys.executable, "-m", "bigjax.cli", *map(str, command)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},  # the task's data is local
        )
    # Its word that it follows the workdir, before any checkpoint exists: then the trainer starts.
    out = read_until(evaluator, "eval job: mesh", stderr)
    cli_in_process("train", "--config", TINY, "--workdir", workdir)
    out += evaluator.stdout.read()  # to the end: the job exits after the final step
    assert evaluator.wait() == 0, stderr.read_text()[-3000:]
    rows = metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [4, 8]  # checkpoint_every=4, total_steps=8: each once, then it exited
    assert all(0 <= row["harness/bigjax_choice/acc"] <= 1 and "loss" in row for row in rows), rows
    assert "validation at step 8" in out

    # Restarted after the fact, it finds nothing new to do and still reports the final step.
    out = cli_in_process("eval", "--config", TINY, "--workdir", workdir).stdout
    assert "validation at step 8" in out
    assert [row["step"] for row in metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")] == [4, 8]


def test_generate_without_a_run_is_a_clear_error(cli_in_process, tmp_path):
    result = cli_in_process("generate", "--workdir", tmp_path / "nothing", "--prompt", "x", check=False)
    assert result.returncode == 2 and "config.json not found" in result.stderr


def test_eval_and_generate_on_a_garbage_config_json_say_which_file(cli_in_process, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0,')
    for command in (["eval", "--once"], ["generate", "--prompt", "x"]):
        result = cli_in_process(*command, "--workdir", workdir, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {workdir / 'config.json'} is not valid JSON")
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert (workdir / "config.json").read_text() == '{"seed": 0,'  # nothing changed


def test_generate_builds_each_checkpoints_model_from_the_config_saved_in_it(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"].update(d_model=64, num_layers=3)  # as a later run of another model size leaves config.json
    (workdir / "config.json").write_text(json.dumps(saved))
    generator = generate.load(workdir)
    assert generator.step == 8 and "cannot be read" not in capsys.readouterr().err
    assert generator.params["embed"]["embedding"].shape[1] == 32  # the checkpoint's d_model
    assert len(generator.complete(["ROMEO:"], generate.Sampling(max_new_tokens=4, temperature=0.0))) == 1


def command_options(name: str) -> dict:
    """{option: its argparse action} of one command's parser, read from the parser the CLI builds."""
    import argparse

    from bigjax.commands import COMMANDS

    commands = argparse.ArgumentParser().add_subparsers()
    for command in COMMANDS:
        command.add(commands)
    return {action.dest: action for action in commands.choices[name]._actions}


def test_the_closed_sets_of_options_are_the_configs_and_the_family_tables():
    from bigjax import families
    from bigjax.config import CHOICES

    quantize = command_options("quantize")
    assert list(quantize["bits"].choices) == [bits for bits in CHOICES["quant.bits"] if bits]
    assert list(quantize["mode"].choices) == list(CHOICES["quant.mode"])
    export = command_options("export")
    assert list(export["format"].choices) == list(families.EXPORT_FORMATS)
    for fmt in ("onnx", "stablehlo"):  # each serving format exports some family's run, and says which in its help
        assert families.deployed_in(fmt) and families.deployed_in(fmt) in export["format"].help
