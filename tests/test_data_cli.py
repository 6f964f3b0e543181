"""The data commands: `bigjax tokenizer train`, `bigjax data prepare` (then training reads the cache), training on
Parquet, and bad data input reported as one `error:` line with exit status 2."""

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import TINY

from bigjax.data import corpus


def write_speeches_parquet(path):
    texts, labels = corpus.shakespeare_genre("eval", 0.1)
    pq.write_table(pa.table({"speech": texts, "genre": labels}), path, row_group_size=64)
    return path


def test_train_a_tokenizer_prepare_the_cache_and_train_from_it(cli, cli_in_process, tmp_path):
    """`tokenizer train` and `data prepare` as processes; the training that reads their cache, through the same
    command line in this process."""
    text = tmp_path / "macbeth.txt"
    text.write_text(corpus.shakespeare_plays()["tragedies/macbeth"])
    source = [f"--config.data.source=text:{text}", f"--config.data.cache_dir={tmp_path / 'cache'}"]

    result = cli("tokenizer", "train", "--config", TINY, *source, "--vocab-size", "512", "--out", tmp_path / "t.json")
    assert f"wrote {tmp_path / 't.json'}: 512 ids" in result.stdout

    tokenizer = [f"--config.data.tokenizer={tmp_path / 't.json'}", "--config.model.vocab_size=512"]
    result = cli("data", "prepare", "--config", TINY, *source, *tokenizer)
    assert "train: tokenized 1 records into" in result.stdout and "eval: tokenized 1 records" in result.stdout

    overrides = [*source, *tokenizer, "--config.total_steps=2", "--config.checkpoint_every=0"]
    result = cli_in_process("train", "--config", TINY, "--workdir", tmp_path / "run", *overrides)
    assert "reading the tokenized cache" in result.stdout and "finished at step 2" in result.stdout


def test_train_on_parquet_files(cli_in_process, tmp_path):
    source = write_speeches_parquet(tmp_path / "speeches.parquet")
    overrides = [
        f"--config.data.source=parquet:{tmp_path}/*.parquet",
        "--config.data.text_field=speech",
        "--config.total_steps=2",
        "--config.checkpoint_every=0",
        "--config.eval_every=2",
    ]
    result = cli_in_process("train", "--config", TINY, "--workdir", tmp_path / "run", *overrides)
    assert f"1 Parquet file(s) from {tmp_path}/*.parquet, read by row group with pyarrow" in result.stdout
    assert "finished at step 2" in result.stdout
    assert source.exists() and (tmp_path / "run" / "metrics.jsonl").read_text().count('"eval/loss"') == 1


def test_bad_data_input_is_one_error_line(cli_in_process, tmp_path):
    result = cli_in_process(
        "train",
        "--config",
        TINY,
        "--workdir",
        tmp_path / "run",
        f"--config.data.source=jsonl:{tmp_path}/missing.jsonl",
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: JSONL source {tmp_path}/missing.jsonl: no such file or directory (config.data.source)"
    )
    speeches = write_speeches_parquet(tmp_path / "speeches.parquet")
    source = f"--config.data.source=parquet:{speeches}"
    result = cli_in_process("train", "--config", TINY, "--workdir", tmp_path / "run", source, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {speeches} has no column 'text' (config.data.text_field); its columns are speech, genre"
    )
    result = cli_in_process("data", "prepare", "--config", TINY, "--config.data.tokenizer=gpt2", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: config.data.tokenizer='gpt2' is not a tokenizer")
