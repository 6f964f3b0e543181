"""Tables of benchmark results, and the step times of a `bigjax train` run.

    python3 benchmarks/summarize.py runs/bench/*.jsonl          a Markdown table of every measurement
    python3 benchmarks/summarize.py --train DIR/metrics.jsonl --skip-steps 50
                                                                one JSON object: that run's steady step times

The JSON lines are those benchmarks/gpu.sh writes: `bigjax bench --json` objects, nanoGPT's, train loops', each
with a "name".
"""

from __future__ import annotations

import argparse
import json
import statistics


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def table(rows: list[dict]) -> str:
    header = "| name | device | batch | tokens/s | MFU | MFU causal | step ms (min–max) | compile s | peak GiB |"
    lines = [header, "|" + " --- |" * header.count(" | ") + " --- |"]
    for row in rows:
        if row.get("failed"):
            lines.append(f"| {row['name']} | failed | | | | | | | |")
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    row["name"],
                    f"{row.get('num_devices', 1)} x {row.get('device_kind', '?')}",
                    str(row.get("batch_size", "")),
                    number(row.get("tokens_per_second"), "{:,.0f}"),
                    number(row.get("mfu"), "{:.1%}"),
                    number(row.get("mfu_causal"), "{:.1%}"),
                    step_times(row),
                    number(row.get("compile_seconds"), "{:.1f}"),
                    number(row["peak_memory_bytes"] / 2**30 if row.get("peak_memory_bytes") else None, "{:.2f}"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def number(value, form: str) -> str:
    return form.format(value) if value is not None else ""


def step_times(row: dict) -> str:
    middle = row.get("step_time_median", row.get("step_time_mean"))
    if middle is None:
        return ""
    if "step_time_min" in row:
        return f"{middle * 1e3:.2f} ({row['step_time_min'] * 1e3:.2f}–{row['step_time_max'] * 1e3:.2f})"
    return f"{middle * 1e3:.2f} (mean)"


def train_steps(path: str, skip_steps: int) -> dict:
    """Step times of the log rows that cover only steps after `skip_steps` (the first ones include warm-up)."""
    rows = [row for row in read_rows([path]) if "step_time" in row]
    kept, previous = [], 0
    for row in rows:
        if previous >= skip_steps:
            kept.append(row)
        previous = row["step"]
    times = [row["step_time"] for row in kept]
    return {
        "tool": "bigjax train (synthetic data)",
        "log_rows": len(kept),
        "step_time_median": statistics.median(times),
        "step_time_min": min(times),
        "step_time_max": max(times),
        "tokens_per_second": statistics.median(row["tokens_per_second"] for row in kept),
        "mfu": statistics.median(row["mfu"] for row in kept) if all("mfu" in row for row in kept) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--train", help="a bigjax train run's metrics.jsonl")
    parser.add_argument("--skip-steps", type=int, default=50)
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train_steps(args.train, args.skip_steps)))
    else:
        print(table(read_rows(args.files)))


if __name__ == "__main__":
    main()
