"""`bigjax lm-eval`: lm-evaluation-harness on a run, against lm-eval's own `hf` model on the run exported.

The tasks are local YAMLs over local files (tests/lm_eval_tasks/): a multiple-choice task (loglikelihood), a
perplexity task (loglikelihood_rolling) and a generation task (generate_until). No network: the Hub is off.
"""

import json
import pathlib

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the [eval] extra, which [dev] installs

REPO = pathlib.Path(__file__).resolve().parent.parent
TASKS_DIR = "tests/lm_eval_tasks"  # their data_files are relative to the repository root
TASKS = ["bigjax_choice", "bigjax_rolling", "bigjax_generate"]


@pytest.fixture(autouse=True)
def at_the_root_offline(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT trained here with a byte-level BPE tokenizer of its own, in float32 (so that bigjax and torch agree
    to 1e-4), checkpoints 20 and 40, the newest `bigjax export`ed: (workdir, HF directory, eos id)."""
    from bigjax import config as config_lib
    from bigjax.data import corpus, tokenizers
    from bigjax.hf import convert
    from bigjax.run import train

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = root / "tokenizer.json"
    tokenizers.train_tokenizer([corpus.shakespeare_split("train", 0.1)[:100_000]], 300, f"hf:{tokenizer}")
    vocab = tokenizers.make_tokenizer(f"hf:{tokenizer}").vocab_size
    overrides = [
        f"--config.data.tokenizer=hf:{tokenizer}",
        f"--config.model.vocab_size={vocab}",
        "--config.model.dtype=float32",
        "--config.model.max_len=64",
        "--config.data.seq_len=64",
        "--config.total_steps=40",
        "--config.checkpoint_every=20",
        "--config.optim.lr=3e-3",
    ]
    workdir = root / "run"
    train.train(config_lib.load("experiments/tiny.py", overrides), workdir)
    convert.export(workdir, root / "hf")
    return workdir, root / "hf", tokenizers.make_tokenizer(f"hf:{tokenizer}").special_ids["eos"]


@pytest.fixture(scope="module")
def reference(lm_run):
    """lm-eval's own `hf` model (transformers, on the CPU, float32) on the exported run, with the samples: the
    prefix token is eos, as bigjax's (every training record follows one)."""
    from bigjax.eval import harness

    _, hf_dir, eos = lm_run
    args = dict(pretrained=str(hf_dir), device="cpu", dtype="float32", prefix_token_id=eos)
    manager = harness.load_task_manager(TASKS, TASKS_DIR)
    return lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0
    )


def responses(results, task) -> list:
    """Each request's response, in the order of the documents and their requests: (log-likelihood, greedy) pairs,
    rolling log-likelihoods, or generated texts."""
    return [repeats[0] for sample in results["samples"][task] for repeats in sample["resps"]]


@pytest.mark.parametrize("mesh", [None, dict(data=1, fsdp=4, tensor=2)], ids=["run_mesh", "fsdp4_tensor2"])
def test_the_same_log_likelihoods_generations_and_metrics_as_lm_evals_hf_model(lm_run, reference, mesh):
    from bigjax.eval import harness

    workdir, _, _ = lm_run
    ours = harness.evaluate(workdir, TASKS, TASKS_DIR, batch_size=4, mesh=mesh, log_samples=True)
    for task in ("bigjax_choice", "bigjax_rolling"):
        mine, theirs = responses(ours, task), responses(reference, task)
        assert len(mine) == len(theirs) > 0
        as_numbers = lambda rs: np.array([r[0] if isinstance(r, list | tuple) else r for r in rs], np.float64)
        np.testing.assert_allclose(as_numbers(mine), as_numbers(theirs), rtol=0, atol=1e-4, err_msg=task)
        if task == "bigjax_choice":  # is_greedy
            assert [bool(r[1]) for r in mine] == [bool(r[1]) for r in theirs]
    assert responses(ours, "bigjax_generate") == responses(reference, "bigjax_generate")
    for task in TASKS:
        for metric, value in reference["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_the_command_prints_a_table_and_writes_lm_evals_json_to_a_new_file_only(lm_run, cli_in_process, tmp_path):
    workdir, _, _ = lm_run
    out = tmp_path / "results.json"
    args = ["lm-eval", "--workdir", workdir, "--tasks", "bigjax_choice", "--include-path", TASKS_DIR, "--limit", 2]
    args += ["--num-fewshot", 1]
    printed = cli_in_process(*args, "--out", out).stdout
    assert "bigjax_choice" in printed and "acc_norm" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["bigjax_choice"]["sample_len"] == 2 and "samples" not in saved
    assert saved["configs"]["bigjax_choice"]["output_type"] == "multiple_choice"
    assert saved["n-shot"]["bigjax_choice"] == 1 == saved["configs"]["bigjax_choice"]["num_fewshot"]
    assert saved["pretty_env_info"].startswith("jax:")  # the environment the model ran in, not torch's

    before = out.read_bytes()
    again = cli_in_process(*args, "--out", out, check=False)
    assert again.returncode == 2 and again.stderr.startswith(f"error: --out {out} exists")
    assert out.read_bytes() == before


def config_alone(workdir, tmp_path, **task):
    """A workdir holding only `workdir`'s config.json, its task section updated with `task`: no checkpoint."""
    config = json.loads((workdir / "config.json").read_text())
    config["task"].update(task)
    (tmp_path / "config_alone").mkdir()
    (tmp_path / "config_alone" / "config.json").write_text(json.dumps(config))
    return tmp_path / "config_alone"


# The task each case names; no_checkpoint names one that needs the Hub: the missing checkpoint is said first.
TASK_OF_CASE = {
    "needs_the_hub": "bigjax_needs_the_hub",
    "unknown_task": "bigjax_chioce",
    "no_checkpoint": "bigjax_needs_the_hub",
}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("lm_eval_missing", "needs the lm-eval package, which is not installed: pip install 'bigjax[eval]'"),
        ("not_a_language_model", "trained a classification model; lm-eval scores causal LMs only"),
        ("needs_the_hub", "task 'bigjax_needs_the_hub' needs to download its data from the Hugging Face Hub"),
        ("unknown_task", "unknown lm-eval task 'bigjax_chioce'; close: bigjax_choice"),
        ("no_checkpoint", "no committed checkpoint in"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(case, expected, lm_run, cli_in_process, monkeypatch, tmp_path):
    workdir, task = lm_run[0], TASK_OF_CASE.get(case, "bigjax_choice")
    if case == "lm_eval_missing":
        monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    if case == "not_a_language_model":
        workdir = config_alone(workdir, tmp_path, name="classification", num_classes=2)
    if case == "no_checkpoint":
        workdir = config_alone(workdir, tmp_path)
    if case == "needs_the_hub":  # offline, as on a cluster with HF_HUB_OFFLINE=1: the same ConnectionError at once,
        # where the unreachable Hub costs huggingface_hub's five retries (23 s) first
        import datasets
        import huggingface_hub

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # both read the variable at import
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        expected += ", which cannot be reached (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
    out = tmp_path / "results.json"
    args = ["--workdir", workdir, "--tasks", task, "--include-path", TASKS_DIR, "--out", out]
    result = cli_in_process("lm-eval", *args, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1
    assert not out.exists()


def test_the_eval_job_scores_each_checkpoint_on_the_harness_tasks_beside_the_loss(lm_run, tmp_path):
    from conftest import copy_run

    from bigjax import config as config_lib
    from bigjax.eval import harness
    from bigjax.ops import metrics
    from bigjax.run import evaluate

    workdir = copy_run(lm_run[0], tmp_path)
    tasks = ["bigjax_choice", "bigjax_rolling"]
    settings = [f"tasks={','.join(tasks)}", f"include_path={TASKS_DIR}", "limit=2"]
    config = config_lib.load_saved(workdir, [f"--config.eval.harness.{setting}" for setting in settings])
    evaluate.run_eval_job(config, workdir, timeout=60)

    rows = metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [20, 40]
    names = ["harness/bigjax_choice/acc", "harness/bigjax_choice/acc_norm", "harness/bigjax_rolling/bits_per_byte"]
    assert all("loss" in row and all(name in row for name in names) for row in rows)
    # Each checkpoint with its own parameters; the newest scored as `bigjax lm-eval` scores it.
    assert rows[0]["harness/bigjax_rolling/bits_per_byte"] != rows[1]["harness/bigjax_rolling/bits_per_byte"]
    alone = dict(
        ((task, metric), value)
        for task, metric, value in harness.metric_rows(harness.evaluate(workdir, tasks, TASKS_DIR, limit=2))
    )
    for name in names:
        _, task, metric = name.split("/")
        assert rows[1][name] == pytest.approx(alone[task, metric], rel=1e-4), name
    events = b"".join(path.read_bytes() for path in (workdir / "eval").glob("events*"))
    assert all(name.encode() in events for name in names)  # TensorBoard too


def test_two_processes_score_as_lm_evals_hf_model_does(lm_run, reference, tmp_path):
    """A job of 2 processes (4 devices each): process 0 drives lm-eval and writes the results, process 1 follows."""
    from test_multiprocess import start_processes, wait_for

    workdir, _, _ = lm_run
    out = tmp_path / "results.json"
    command = ["python", "-m", "bigjax.cli", "lm-eval", "--workdir", workdir, "--tasks", ",".join(TASKS)]
    command += ["--include-path", TASKS_DIR, "--batch-size", 4, "--out", out]
    processes = start_processes([__import__("sys").executable, *command[1:]], 2, tmp_path / "logs")
    codes = wait_for(processes, timeout=400)
    logs = [(tmp_path / "logs" / f"process-{i}.err").read_text()[-2000:] for i in range(2)]
    assert codes == {0: 0, 1: 0}, logs
    saved = json.loads(out.read_text())["results"]
    for task in TASKS:
        for metric, value in reference["results"][task].items():
            if isinstance(value, float):
                assert saved[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert "bigjax_choice" in (tmp_path / "logs" / "process-0.out").read_text()
    assert "bigjax_choice" not in (tmp_path / "logs" / "process-1.out").read_text()  # process 1 reports nothing
