"""Requests per second of `bigjax lm-eval` against lm-eval's own `hf` model on the same run exported, same tasks.

    python benchmarks/lm_eval_speed.py [--out DIR] [--docs 200] [--d-model 256] [--layers 4] [--max-len 256]

A GPT (d_model, layers, max_len) with a byte-level BPE of 1024 ids is trained for a few steps on the bundled
corpus (its weights matter little to speed), exported with `bigjax export`, and three local tasks are written
over the corpus: multiple choice (4 choices a document: loglikelihood), rolling perplexity (one speech a
document), greedy generation (16 new tokens, a stop string). Each model runs the three tasks twice in one process,
the same --batch-size; the first run includes compiling (bigjax) or warming up (torch), the second is the steady
rate. Prints a table and writes DIR/lm_eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_tasks(root: pathlib.Path, docs: int) -> pathlib.Path:
    """Three task YAMLs over JSONL files made from the bundled corpus, in root/tasks (absolute data paths)."""
    from bigjax.data import corpus

    lines = [line.strip() for line in corpus.shakespeare_split("eval", 0.1).splitlines() if 30 < len(line) < 90]
    speeches = [s for s in corpus.speeches(corpus.shakespeare_split("eval", 0.1)) if 200 < len(s) < 2000]
    rng = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    with (tasks / "choice.jsonl").open("w") as f:
        for line in lines[:docs]:
            cut = line.rfind(" ", 0, len(line) * 2 // 3)
            others = [o[o.rfind(" ", 0, len(o) * 2 // 3) :] for o in rng.sample(lines, 3)]
            f.write(json.dumps(dict(question=line[:cut], choices=[line[cut:], *others], answer=0)) + "\n")
    with (tasks / "rolling.jsonl").open("w") as f:
        for speech in speeches[: max(1, docs // 4)]:
            f.write(json.dumps(dict(text=speech)) + "\n")
    with (tasks / "generate.jsonl").open("w") as f:
        for line in lines[docs : docs + max(1, docs // 4)]:
            f.write(json.dumps(dict(prompt=line[: len(line) // 2], answer=line[len(line) // 2 :])) + "\n")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    yamls = {
        "speed_choice": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
        "speed_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n",
        "speed_generate": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    }
    for name, body in yamls.items():
        data = tasks / f"{name.split('_')[1]}.jsonl"
        files = f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        (tasks / f"{name}.yaml").write_text(f"task: {name}\n{common}{files}{body}")
    return tasks


def train_and_export(root: pathlib.Path, d_model: int, layers: int, max_len: int):
    from bigjax import config as config_lib
    from bigjax.data import corpus, tokenizers
    from bigjax.hf import convert
    from bigjax.run import train

    tokenizer = root / "tokenizer.json"
    if not tokenizer.exists():
        tokenizers.train_tokenizer([corpus.shakespeare_split("train", 0.1)[:300_000]], 1024, f"hf:{tokenizer}")
    vocab = tokenizers.make_tokenizer(f"hf:{tokenizer}").vocab_size
    workdir, hf_dir = root / "run", root / "hf"
    if not workdir.exists():
        overrides = [
            f"--config.data.tokenizer=hf:{tokenizer}",
            f"--config.model.vocab_size={vocab}",
            "--config.model.dtype=float32",
            f"--config.model.d_model={d_model}",
            f"--config.model.num_layers={layers}",
            f"--config.model.max_len={max_len}",
            f"--config.data.seq_len={max_len}",
            "--config.total_steps=4",
            "--config.checkpoint_every=4",
            "--config.mesh.data=1",
        ]
        train.train(config_lib.load("experiments/tiny.py", overrides), workdir)
    if not hf_dir.exists():
        convert.export(workdir, hf_dir)
    return workdir, hf_dir, tokenizers.make_tokenizer(f"hf:{tokenizer}").special_ids["eos"]


def timed_runs(lm, manager, tasks, limit) -> list[dict]:
    import lm_eval

    runs = []
    for _ in range(2):
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0
        )
        seconds = time.perf_counter() - started
        requests = sum(len(sample["resps"]) for task in tasks for sample in results["samples"][task])
        runs.append(dict(seconds=round(seconds, 2), requests=requests, requests_per_s=round(requests / seconds, 2)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lm_eval_speed")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    root = pathlib.Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)

    import jax
    import torch
    from lm_eval.models.huggingface import HFLM

    from bigjax.eval import harness

    tasks_dir = build_tasks(root, args.docs)
    workdir, hf_dir, eos = train_and_export(root, args.d_model, args.layers, args.max_len)
    tasks = ["speed_choice", "speed_rolling", "speed_generate"]
    manager = harness.load_task_manager(tasks, str(tasks_dir))
    ours = harness.load_model(workdir, batch_size=args.batch_size)
    theirs = HFLM(
        pretrained=str(hf_dir), device="cpu", dtype="float32", prefix_token_id=eos, batch_size=args.batch_size
    )
    report = dict(
        machine=dict(platform=platform.platform(), jax=str(jax.devices()), torch_threads=torch.get_num_threads()),
        model=dict(d_model=args.d_model, layers=args.layers, max_len=args.max_len, vocab=1024),
        tasks=tasks,
        batch_size=args.batch_size,
        bigjax=timed_runs(ours, manager, tasks, None),
        hf=timed_runs(theirs, manager, tasks, None),
    )
    (root / "lm_eval_speed.json").write_text(json.dumps(report, indent=2))
    print(f"{'model':<8} {'run':<6} {'requests':>8} {'seconds':>8} {'requests/s':>10}")
    for name in ("bigjax", "hf"):
        for label, run in zip(("first", "second"), report[name], strict=True):
            print(f"{name:<8} {label:<6} {run['requests']:>8} {run['seconds']:>8} {run['requests_per_s']:>10}")


if __name__ == "__main__":
    main()
