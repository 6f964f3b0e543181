"""End to end through the command line: train, the separate eval job, generate."""

import subprocess
import sys
import time

from conftest import REPO, TINY

from bigjax import metrics


def test_train_then_eval_then_generate(cli, tmp_path):
    workdir = tmp_path / "run"
    out = cli("train", "--config", TINY, "--workdir", workdir).stdout
    assert "finished at step 8" in out
    assert (workdir / "config.json").exists()
    rows = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "step_time"):
        assert all(key in r for r in rows), key

    out = cli("eval", "--config", TINY, "--workdir", workdir, "--once").stdout
    assert "validation at step 8" in out and "bits_per_char" in out

    greedy = [
        cli(
            "generate", "--workdir", workdir, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20"
        ).stdout
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")
    sampled = cli(
        "generate",
        "--workdir",
        workdir,
        "--prompt",
        "ROMEO:",
        "--temperature",
        "1.0",
        "--top-k",
        "5",
        "--max-new-tokens",
        "20",
        "--seed",
        "3",
    ).stdout
    assert sampled.startswith("ROMEO:") and len(sampled.encode()) >= len("ROMEO:") + 1

    # Run again with the same workdir: it resumes from step 8 and trains on to the new end.
    out = cli("train", "--config", TINY + ":steps=10", "--workdir", workdir).stdout
    assert "resumed from step 8" in out and "finished at step 10" in out


def test_eval_job_started_before_training_evaluates_every_checkpoint_once(cli, tmp_path):
    workdir = tmp_path / "run"
    evaluator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigjax.cli",
            "eval",
            "--config",
            TINY,
            "--workdir",
            str(workdir),
            "--poll",
            "0.2",
            "--timeout",
            "300",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    assert evaluator.poll() is None  # waiting for checkpoints that do not exist yet
    cli("train", "--config", TINY, "--workdir", workdir)
    out, err = evaluator.communicate(timeout=300)
    assert evaluator.returncode == 0, err
    steps = [row["step"] for row in metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")]
    assert steps == [4, 8]  # checkpoint_every=4, total_steps=8: each once, then it exited
    assert "validation at step 8" in out

    # Restarted after the fact, it finds nothing new to do and still reports the final step.
    out = cli("eval", "--config", TINY, "--workdir", workdir).stdout
    assert "validation at step 8" in out
    assert [row["step"] for row in metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")] == [4, 8]


def test_generate_without_a_run_is_a_clear_error(cli, tmp_path):
    result = cli("generate", "--workdir", tmp_path / "nothing", "--prompt", "x", check=False)
    assert result.returncode == 2 and "config.json not found" in result.stderr
