"""Hugging Face interop (bigjax.hf) against transformers itself, in float32 on the CPU: tiny random GPT-2 and Llama
models saved with save_pretrained (nothing is downloaded), imported, compared logit for logit and token for token,
exported back and loaded by transformers again."""

import contextlib
import errno
import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import file_size_limit
from tokenizers import decoders, models, pre_tokenizers, trainers

from bigjax import config as config_lib
from bigjax import data, generate, hf, paths
from bigjax.errors import UserError
from bigjax.hf import convert, family, files
from bigjax.models import gpt
from bigjax.params import by_path
from bigjax.run import finetune
from bigjax.run.setup import make_setup

HF_VOCAB = 300  # the tokenizer's own ids; bigjax appends pad/cls/mask (303) and pads to 384
EPS32 = float(np.finfo(np.float32).eps)
# Both sides compute the same float32 sums in different orders (XLA's fused einsums vs torch's matmuls), so each
# logit differs by rounding alone: a few eps per reduction of length d, through every layer. A relative bound of
# 64 * eps32 per layer (+1 for the embedding and head), against the largest logit, allows that with room and is
# still ~1e4 times smaller than what any mapping mistake (a transposed kernel, a wrong rotary half) gives.
RELATIVE_TOLERANCE_PER_LAYER = 64 * EPS32
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE with HF_VOCAB ids, trained here on a few lines (GPT-2's kind of tokenizer, small)."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=HF_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([PROMPT, "whether 'tis nobler in the mind to suffer"] * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    assert tokenizer.get_vocab_size() == HF_VOCAB
    return path


def gpt2_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=HF_VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        intermediate_size=96,
        vocab_size=HF_VOCAB,
        max_position_embeddings=128,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return randomized(transformers.LlamaForCausalLM(config))


def randomized(model):
    """Norms start at exactly 1 and biases at 0: make them random too, so that a misplaced one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def mistral_model():
    """Mistral without a sliding window is Llama under another name."""
    torch.manual_seed(1)
    config = transformers.MistralConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=96,
        vocab_size=HF_VOCAB,
        max_position_embeddings=128,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.MistralForCausalLM(config).eval()


# The scaled RoPE variants: pretrained on 32 positions, tested on prompts longer than that (LONG_PROMPT), with a
# head of 16 (8 pairs, wavelengths 2 pi * 10^(i/2)) so that llama3's three bands all have pairs: kept (i=0, 6.3 <
# 32/4), blended (i=1, 19.9) and divided by factor (i >= 2, above 32/1).
SMALL_CONTEXT = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=HF_VOCAB,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=0,
)
ORIGINAL_CONTEXT = 32


def llama3_model():
    """Llama 3.1's RoPE scaling, with q/k/v/o biases (attention_bias) and MLP biases (mlp_bias)."""
    torch.manual_seed(2)
    rope = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    config = transformers.LlamaConfig(
        **SMALL_CONTEXT,
        rope_parameters=rope | dict(original_max_position_embeddings=ORIGINAL_CONTEXT),
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    return randomized(transformers.LlamaForCausalLM(config))


def qwen2_model():
    """Qwen2 (biases on q/k/v only) with YaRN, whose cos and sin are scaled by 0.1 ln(4) + 1."""
    torch.manual_seed(3)
    rope = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT)
    config = transformers.Qwen2Config(**SMALL_CONTEXT, rope_parameters=rope, tie_word_embeddings=True)
    return randomized(transformers.Qwen2ForCausalLM(config))


def llama_linear_model():
    """Linear RoPE scaling, its config.json rewritten below in the older form (rope_scaling with `type`)."""
    torch.manual_seed(4)
    rope = dict(rope_type="linear", rope_theta=10_000.0, factor=2.0)
    return randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_CONTEXT, rope_parameters=rope)))


def older_rope_config(config: dict) -> dict:
    """A config.json as transformers 4 wrote it: rope_theta at the top, the scaling in rope_scaling with `type`."""
    rope = config.pop("rope_parameters")
    return config | dict(rope_theta=rope.pop("rope_theta"), rope_scaling=dict(type=rope.pop("rope_type"), **rope))


MODELS = {
    "gpt2": gpt2_model,
    "llama": llama_model,
    "mistral": mistral_model,
    "llama3_biases": llama3_model,
    "qwen2_yarn": qwen2_model,
    "linear_older_config": llama_linear_model,
}
SCALED = {"llama3_biases", "qwen2_yarn", "linear_older_config"}
REWRITE_CONFIG = {"linear_older_config": older_rope_config}
EXPORTED_AS = {"gpt2": "GPT2LMHeadModel", "qwen2_yarn": "Qwen2ForCausalLM"}  # the others as LlamaForCausalLM
LONG_PROMPT = PROMPT + " the slings and arrows of outrageous fortune"


def save(model, directory, tokenizer_file, sharded=False):
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
    (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return directory


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def bigjax_logits(workdir, ids, rope_scaling: str | None = None) -> np.ndarray:
    """The logits of the run's newest checkpoint; with `rope_scaling`, of its parameters in a model whose
    model.rope_scaling.type is that instead."""
    generator = generate.load(workdir)
    model_config = config_lib.load_saved(workdir).model
    if rope_scaling is not None:
        model_config.rope_scaling.type = rope_scaling
    model = gpt.GPT(gpt.GPTConfig.from_config(model_config))
    # Compiled as one program: op by op, every operation of the model would be a compile of its own.
    logits = jax.jit(model.apply)({"params": generator.params}, np.asarray([ids], np.int32))
    return np.asarray(logits)[0]


def relative_difference(ours, theirs) -> float:
    return float(np.abs(ours[:, : theirs.shape[1]] - theirs).max() / np.abs(theirs).max())


def assert_logits_match(ours, theirs, num_layers):
    rel = relative_difference(ours, theirs)
    print(f"max relative logit difference {rel:.2e}")
    assert rel <= RELATIVE_TOLERANCE_PER_LAYER * (num_layers + 1), rel


# Reading a sharded index does not depend on the architecture: one case reads shards, the others one file.
CASES = [("gpt2", False), ("llama", True), ("mistral", False)] + [(arch, False) for arch in sorted(SCALED)]


@pytest.mark.parametrize(
    "arch, sharded", CASES, ids=[f"{arch}-{'sharded' if sharded else 'one_file'}" for arch, sharded in CASES]
)
def test_import_matches_transformers_logits_greedy_tokens_and_exports_back(arch, sharded, tokenizer_file, tmp_path):
    model = MODELS[arch]()
    hf_dir = save(model, tmp_path / "hf", tokenizer_file, sharded)
    assert (hf_dir / hf.INDEX_FILE).exists() == sharded
    if arch in REWRITE_CONFIG:
        config_file = hf_dir / "config.json"
        config_file.write_text(json.dumps(REWRITE_CONFIG[arch](json.loads(config_file.read_text()))))
    workdir = tmp_path / "run"
    hf.import_hf(hf_dir, workdir)  # on the tests' 8-device mesh
    prompt = LONG_PROMPT if arch in SCALED else PROMPT
    ids = [int(i) for i in tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode(prompt).ids]

    # Logits: the imported checkpoint (restored onto one device) against transformers.
    ours, theirs = bigjax_logits(workdir, ids), torch_logits(model, ids)
    assert_logits_match(ours, theirs, model.config.num_hidden_layers)
    # The ids bigjax added beyond the HF vocabulary have zero weights.
    assert np.all(ours[:, HF_VOCAB:] == 0)
    if arch in SCALED:  # the scaling is what made them match: the plain RoPE is far off
        assert len(ids) > ORIGINAL_CONTEXT
        unscaled = relative_difference(bigjax_logits(workdir, ids, rope_scaling="none"), theirs)
        print(f"max relative logit difference with the plain RoPE {unscaled:.2e}")
        assert unscaled > 10 * RELATIVE_TOLERANCE_PER_LAYER * (model.config.num_hidden_layers + 1), unscaled

    # Greedy decoding with bigjax's KV cache continues the prompt as transformers' greedy generate does.
    new = generate.load(workdir).generate_ids([ids], generate.Sampling(max_new_tokens=12, temperature=0.0))[0]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = expected[0, len(ids) :].tolist()
    assert 0 not in expected, "the reference stopped token is generated: pick another seed"
    assert new == expected

    # Export: transformers loads it and computes the very same logits as the original (the same float32 weights).
    out = tmp_path / "exported"
    assert hf.export(workdir, out) == 0
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    reloaded.eval()
    # Mistral without a sliding window comes back as the Llama it is.
    assert type(reloaded).__name__ == EXPORTED_AS.get(arch, "LlamaForCausalLM")
    assert reloaded.config.vocab_size == HF_VOCAB
    np.testing.assert_array_equal(torch_logits(reloaded, ids), theirs)


def test_cli_import_then_generate_and_train_resumes_at_step_0(cli, cli_in_process, tokenizer_file, tmp_path):
    """`bigjax import` in a process; generate, train and eval on what it wrote through the same command line in this
    one (each is tested as a process elsewhere)."""
    hf_dir = save(gpt2_model(), tmp_path / "hf", tokenizer_file)
    workdir = tmp_path / "run"
    out = cli("import", "--hf", hf_dir, "--workdir", workdir, "--config.data.seq_len=32").stdout
    assert "into" in out and "step 0" in out
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == f"hf:{(workdir / 'tokenizer.json').resolve()}"
    assert saved["data"]["seq_len"] == 32 and saved["model"]["vocab_size"] == HF_VOCAB + 3

    prompt = "To be, or"
    greedy = ["--temperature", "0", "--max-new-tokens", "5"]
    result = cli_in_process("generate", "--workdir", workdir, "--prompt", prompt, *greedy)
    assert result.stdout.strip().startswith(prompt)
    assert "generating from checkpoint 0" in result.stderr + result.stdout

    args = ["--config", workdir / "config.json", "--workdir", workdir]
    result = cli_in_process("train", *args, "--config.total_steps=2", "--config.batch_size=8", "--config.log_every=1")
    assert "resumed from step 0" in result.stdout and "finished at step 2" in result.stdout
    result = cli_in_process("eval", "--workdir", workdir, "--once", "--config.eval_batches=2", "--config.batch_size=8")
    assert "validation at step 2" in result.stdout and "loss=" in result.stdout


@pytest.mark.parametrize(
    "field, value",
    [("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}), ("partial_rotary_factor", 0.5), ("hidden_act", "gelu")],
)
def test_a_field_bigjax_cannot_represent_is_one_error_line(cli, cli_in_process, field, value, tokenizer_file, tmp_path):
    """The first case in a process of its own (exit 2 and one line, no traceback, from a real process); the others
    through the same command line in this one."""
    hf_dir = save(llama_model(), tmp_path / "hf", tokenizer_file)
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    run = cli if field == "rope_scaling" else cli_in_process
    result = run("import", "--hf", hf_dir, "--workdir", tmp_path / "run", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


# An imported run trains on the bundled plays by default: seconds to tokenize, and nothing here reads them.
SYNTHETIC_DATA = "--config.data.source=synthetic"


@pytest.fixture(scope="module")
def gpt2_hf_dirs(tokenizer_file, tmp_path_factory):
    """The tiny GPT-2 saved by transformers: {False: in one file, True: in shards with their index}."""
    root, model = tmp_path_factory.mktemp("gpt2"), gpt2_model()
    return {sharded: save(model, root / f"sharded_{sharded}", tokenizer_file, sharded) for sharded in (False, True)}


@pytest.fixture(scope="module")
def imported_gpt2(gpt2_hf_dirs, tmp_path_factory):
    """(the tiny GPT-2, a bigjax run imported from it): for the tests that export, each into its own --out."""
    workdir = tmp_path_factory.mktemp("imported") / "run"
    hf.import_hf(gpt2_hf_dirs[False], workdir, [SYNTHETIC_DATA])
    return gpt2_model(), workdir


def edited_config(**fields):
    """A damage to an HF directory: config.json with `fields` set (None: removed)."""

    def edit(hf_dir):
        config = json.loads((hf_dir / "config.json").read_text()) | fields
        (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return edit


def without_tensor(name):
    def edit(hf_dir):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(hf_dir / hf.SINGLE_FILE)
        del tensors[name]
        save_file(tensors, hf_dir / hf.SINGLE_FILE)

    return edit


def truncated(hf_dir):
    weights = hf_dir / hf.SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def first_shard_removed(hf_dir):
    (hf_dir / min(json.loads((hf_dir / hf.INDEX_FILE).read_text())["weight_map"].values())).unlink()


def written(name, text):
    return lambda hf_dir: (hf_dir / name).write_text(text)


# case: (sharded, damage, overrides, what the one error line names)
BAD_IMPORTS = {
    "config_is_a_list": (False, written("config.json", "[1, 2]"), [], "config.json is not a JSON object"),
    "config_lacks_a_field": (False, edited_config(n_embd=None), [], "config.json has no 'n_embd'"),
    "config_field_mistyped": (False, edited_config(n_layer="2"), [], "config.json: a field has the wrong type"),
    "weights_truncated": (False, truncated, [], "model.safetensors is not a readable safetensors file"),
    "weights_garbage": (False, written(hf.SINGLE_FILE, "garbage"), [], "model.safetensors is not a readable"),
    "index_garbage": (True, written(hf.INDEX_FILE, "{not json"), [], "model.safetensors.index.json is not"),
    "index_without_weight_map": (True, written(hf.INDEX_FILE, "{}"), [], "model.safetensors.index.json has no"),
    "shard_missing": (True, first_shard_removed, [], "model-00001-of-.* is missing"),
    "tensor_missing": (False, without_tensor("transformer.h.1.mlp.c_fc.bias"), [], "has no tensor h.1.mlp.c_fc.bias"),
    "shape_disagrees": (False, edited_config(n_embd=64), [], r"c_proj.weight has shape \(32, 32\), whose axis 0"),
    "vocab_disagrees": (False, edited_config(vocab_size=400), [], r"wte.weight has shape \(300, 32\), not .*=400"),
    "tokenizer_garbage": (False, written("tokenizer.json", "{not json"), [], "tokenizer.json is not a Hugging Face"),
    "mesh_refused": (False, lambda hf_dir: None, ["--config.mesh.tensor=3"], "does not divide the 8 devices"),
}


def contents(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_a_failed_import_is_one_error_and_leaves_nothing_behind(case, gpt2_hf_dirs, tmp_path):
    """Everything is checked before anything is written: a refused import creates no workdir, adds nothing to an
    empty directory of the user's (the tokenizer was copied first once), and leaves the HF directory as it was."""
    sharded, damage, overrides, message = BAD_IMPORTS[case]
    hf_dir = shutil.copytree(gpt2_hf_dirs[sharded], tmp_path / "hf")
    damage(hf_dir)
    before = contents(hf_dir)
    users_empty_dir = tmp_path / "empty"
    users_empty_dir.mkdir()
    for workdir in (tmp_path / "new" / "run", users_empty_dir):
        with pytest.raises(UserError, match=message):
            hf.import_hf(hf_dir, workdir, overrides)
    assert not (tmp_path / "new").exists() and not any(users_empty_dir.iterdir())
    assert contents(hf_dir) == before


def test_import_refuses_a_workdir_with_anything_in_it_the_hf_directory_included(gpt2_hf_dirs, tmp_path):
    """Import into its own HF directory once overwrote the model's config.json; into any directory without
    checkpoints it wrote beside the user's files. Both are refused before anything is read or written."""
    hf_dir = shutil.copytree(gpt2_hf_dirs[False], tmp_path / "hf")
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine too")
    before = contents(hf_dir)
    for workdir, message in ((hf_dir, "is not empty"), (users, "is not empty"), (a_file, "is a file")):
        with pytest.raises(UserError, match=f"--workdir {workdir} {message}"):
            hf.import_hf(hf_dir, workdir)
    assert contents(hf_dir) == before
    assert contents(users) == {"notes.txt": b"mine"} and a_file.read_text() == "mine too"


def test_an_import_whose_writes_fail_removes_what_it_wrote(gpt2_hf_dirs, tmp_path, monkeypatch):
    """The disk fills up at the import's last writes, the checkpoint and config.json written already: one error,
    and everything it wrote is removed (the directories it made too; an empty one of the user's stays, empty)."""
    written_before = []

    def disk_full(hf_dir, workdir):
        written_before.extend(sorted(p.name for p in workdir.iterdir()))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "copy_tokenizer_files", disk_full)
    users_empty_dir = tmp_path / "empty"
    users_empty_dir.mkdir()
    for workdir in (tmp_path / "new" / "run", users_empty_dir):
        with pytest.raises(UserError, match=f"writing {workdir} failed: No space left on device"):
            hf.import_hf(gpt2_hf_dirs[False], workdir, [SYNTHETIC_DATA])
    assert written_before == ["checkpoints", "config.json", "lock.json", "staging"] * 2  # staging: the lock's
    assert not (tmp_path / "new").exists() and not any(users_empty_dir.iterdir())


def test_a_writer_that_finds_the_output_filled_under_its_lock_is_refused_and_removes_nothing(tmp_path):
    """Two imports into one new workdir: the second checked it empty, then took the lock only once the first had
    finished (forced here: the hold writes the first's file). Checked again under the lock, it is refused, and
    neither the first's files nor the directory it believed it made are removed."""
    workdir = tmp_path / "new" / "run"

    @contextlib.contextmanager
    def held_after_another_import_finished(directory):
        (directory / "config.json").write_text("the first import's")
        yield

    with (
        pytest.raises(UserError, match="--workdir .* is not empty"),
        paths.writing_new_output(workdir, "--workdir", hold=held_after_another_import_finished),
    ):
        raise AssertionError("never reached: refused before the body")
    assert contents(workdir) == {"config.json": b"the first import's"}

    # A body that fails removes what it wrote and the directories made for it, not the user's empty directory.
    users_empty_dir = tmp_path / "empty"
    users_empty_dir.mkdir()
    for out in (tmp_path / "a" / "b", users_empty_dir):
        with (
            pytest.raises(UserError, match=f"writing {out} failed: the disk is full"),
            paths.writing_new_output(out) as directory,
        ):
            (directory / "sub").mkdir()
            (directory / "sub" / "file").write_text("half")
            raise OSError("the disk is full")
    assert not (tmp_path / "a").exists() and not any(users_empty_dir.iterdir())


def test_an_export_onto_a_full_disk_is_one_error_and_leaves_nothing(imported_gpt2, tmp_path):
    _, workdir = imported_gpt2
    users_empty_dir = tmp_path / "empty"
    users_empty_dir.mkdir()
    for out in (tmp_path / "new" / "exported", users_empty_dir):
        with pytest.raises(UserError, match=f"writing {out} failed.*File too large"), file_size_limit(64 * 1024):
            hf.export(workdir, out)  # model.safetensors is 150 kB
    assert not (tmp_path / "new").exists() and not any(users_empty_dir.iterdir())
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="--out .*a_file is a file"):
        hf.export(workdir, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_unknown_architecture_is_refused(tokenizer_file, tmp_path):
    hf_dir = save(gpt2_model(), tmp_path / "hf", tokenizer_file)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFError, match="architectures"):
        hf.config_from_hf(hf_dir)


def hf_config_dir(tmp_path, architecture: str, **fields):
    """A directory holding only a config.json (enough for config_from_hf): a small model of `architecture`."""
    config = dict(architectures=[architecture], model_type=architecture.removesuffix("ForCausalLM").lower())
    config.update(SMALL_CONTEXT, rope_parameters=dict(rope_type="default", rope_theta=10_000.0))
    config.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "architecture, fields, message",
    [
        (
            "Qwen2ForCausalLM",
            dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
            "use_sliding_window",
        ),
        ("LlamaForCausalLM", dict(rope_parameters=dict(rope_type="longrope", factor=4.0)), "rope_parameters.rope_type"),
        ("LlamaForCausalLM", dict(rope_scaling=dict(type="linear", factor=1.0)), "rope_scaling.factor=1.0"),
        (
            "LlamaForCausalLM",
            dict(rope_parameters=dict(rope_type="yarn", factor=4.0, truncate=False)),
            "rope_parameters.truncate=False",
        ),
    ],
)
def test_what_bigjax_cannot_represent_is_refused_naming_the_field(architecture, fields, message, tmp_path):
    with pytest.raises(hf.HFError, match=message):
        hf.config_from_hf(hf_config_dir(tmp_path, architecture, **fields))


def test_each_architecture_gets_its_own_biases_and_rope_fields(tmp_path):
    """Mistral and Qwen2 have no attention_bias or mlp_bias (transformers ignores them there); Qwen2's sliding window
    on no layer is no window; transformers' defaults fill what a rope type leaves out."""

    def read(architecture, **fields):
        m = hf.config_from_hf(hf_config_dir(tmp_path, architecture, **fields)).model
        return config_lib.linear_biases(m), m.rope_scaling.to_dict()

    ignored = dict(attention_bias=True, mlp_bias=True)
    assert read("MistralForCausalLM", **ignored)[0] == (False, False, False)
    assert read("Qwen2ForCausalLM", **ignored, use_sliding_window=True, sliding_window=16, max_window_layers=2)[0] == (
        True,
        False,
        False,
    )
    assert read("LlamaForCausalLM", attention_bias=True)[0] == (True, True, False)
    yarn = read("LlamaForCausalLM", rope_scaling=dict(rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.5))[1]
    assert yarn["original_max_len"] == 128 and (yarn["beta_fast"], yarn["beta_slow"]) == (32.0, 1.0)
    assert yarn["attention_factor"] == pytest.approx((0.1 * np.log(4) + 1) / (0.05 * np.log(4) + 1))


def test_a_run_whose_biases_no_architecture_has_is_refused_at_export():
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, out_bias=True)
    with pytest.raises(hf.HFError, match=r"q/k/v=False o=True MLP=False.*Qwen2 is Llama with biases on q/k/v only"):
        family.for_config(config)
    config.model.update(use_bias=True, qkv_bias=False)  # GPT-2 needs every bias
    config.model.update(positions="learned", norm="layernorm", mlp="gelu")
    with pytest.raises(hf.HFError, match=r"q/k/v=False o=True MLP=True"):
        family.for_config(config)


@pytest.fixture(scope="module")
def imported_llama(tokenizer_file, tmp_path_factory):
    """(the tiny Llama's save_pretrained directory, a bigjax run imported from it): for the tests that read both."""
    root = tmp_path_factory.mktemp("llama")
    hf_dir = save(llama_model(), root / "hf", tokenizer_file)
    hf.import_hf(hf_dir, root / "run")
    return hf_dir, root / "run"


def test_init_from_hf_loads_the_backbone_of_a_classifier(imported_llama):
    hf_dir, imported = imported_llama
    expected = by_path(generate.load(imported).params)

    config = config_lib.defaults("gpt", "classification")
    config.model.update(hf.config_from_hf(hf_dir).model)
    config.model.vocab_size = HF_VOCAB + 3
    config.task.num_classes = 3
    config.init_from.workdir = f"hf:{hf_dir}"
    config.init_from.exclude = "mlp_norm"  # these keep their fresh initialization (ones)
    setup = make_setup(config)
    shardings = setup.state_shardings
    state = finetune.load_pretrained_state(setup.init_state(), config.init_from, shardings)

    loaded = by_path(state.params)
    assert set(loaded) == set(expected) - {"unembed/kernel"} | {"classifier/kernel", "classifier/bias"}
    for name, array in loaded.items():
        if name.startswith("classifier"):
            assert not np.any(np.asarray(array)), name  # the new head: zero-initialized
        elif "mlp_norm" in name:
            np.testing.assert_array_equal(np.asarray(array), 1.0)  # excluded: fresh
        else:
            np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[name]), err_msg=name)
            assert array.sharding == by_path(shardings.params)[name], name
    assert len(jax.tree.leaves(state.params)) == len(loaded)


def test_bfloat16_weights_are_read_exactly(tokenizer_file, tmp_path):
    """numpy has no bfloat16: bigjax reads such tensors by the file's layout, and widens them exactly to float32."""
    model = llama_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    read = hf.TensorReader(tmp_path / "hf")
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        expected = dict(model.named_parameters())[name].detach().float().numpy()
        np.testing.assert_array_equal(read(name).full(), expected, err_msg=name)


def test_mistral_with_a_sliding_window_is_refused(tokenizer_file, tmp_path):
    hf_dir = save(mistral_model(), tmp_path / "hf", tokenizer_file)
    config = json.loads((hf_dir / "config.json").read_text())
    config["sliding_window"] = 16
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFError, match="sliding_window=16"):
        hf.config_from_hf(hf_dir)


def test_each_device_reads_only_its_own_block(tokenizer_file, tmp_path, monkeypatch):
    """On an fsdp x tensor mesh, import reads from the safetensors files exactly the blocks the devices hold: of a
    split parameter, no device reads the whole tensor, and every element is read once per device holding it."""
    reads = []  # (HF name, elements read)
    original = files.TensorReader.__call__

    def recording(self, name):
        view = original(self, name)

        def read(index):
            block = view.read(index)
            reads.append((name, block.size))
            return block

        return files.View(view.shape, read)

    monkeypatch.setattr(files.TensorReader, "__call__", recording)
    model = llama_model()
    hf_dir = save(model, tmp_path / "hf", tokenizer_file)
    overrides = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    hf.import_hf(hf_dir, tmp_path / "run", overrides)

    sizes = {name: p.numel() for name, p in model.named_parameters()}
    read_per_tensor = {}
    for name, size in reads:
        assert size < sizes[name], f"{name}: a device read the whole tensor ({size} elements)"
        read_per_tensor[name] = read_per_tensor.get(name, 0) + size
    # q_proj [h*hd, d] is split 4 ways (embed over fsdp) and 2 ways (heads over tensor): each of the 8 devices holds
    # 1/8 of it, so the whole tensor is read exactly once, in 8 blocks. A norm scale [d] is split 4 ways (embed)
    # and held twice (tensor): read twice.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert read_per_tensor[q] == sizes[q]
    assert read_per_tensor["model.norm.weight"] == 2 * sizes["model.norm.weight"]
    assert set(read_per_tensor) == set(sizes)


def test_export_writes_shards_above_the_size_limit_and_transformers_loads_them(
    cli, cli_in_process, imported_gpt2, tmp_path
):
    """`bigjax export` through the command line in this process; refused in a process of its own (a successful
    `bigjax export` process is test_a_two_process_job_...'s). Imported in this process: `bigjax import` is
    test_cli_import_...'s."""
    model, workdir = imported_gpt2
    out = tmp_path / "exported"
    args = ["export", "--workdir", workdir, "--out", out]
    assert "exported step 0" in cli_in_process(*args, "--max-shard-size", "40KB").stdout  # a few tensors per file
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / hf.SINGLE_FILE).exists()
    # Readable as any file this user writes (safetensors writes 0600): a server running as another user loads it.
    umask = os.umask(0o022)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = list(range(1, 20))
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(model, ids))

    refused = cli(*args, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error:") and "not empty" in refused.stderr


def test_views_read_the_blocks_numpy_would_cut():
    """The lazy views against numpy doing the same reshapes, transposes and slices on the whole array."""
    whole = np.arange(6 * 12, dtype=np.float32).reshape(6, 12)
    view = files.View(whole.shape, lambda index: whole[index])
    cases = [
        (view.T.split_axis(1, (3, 2)), whole.T.reshape(12, 3, 2)),
        (view.split_axis(1, (4, 3)), whole.reshape(6, 4, 3)),
        (view.columns(4, 8).split_axis(1, (2, 2)), whole[:, 4:8].reshape(6, 2, 2)),
        (view.padded(0, 9), np.pad(whole, ((0, 3), (0, 0)))),
        (files.stack([view, view.padded(0, 6)]), np.stack([whole, whole])),
        (view.split_axis(1, (4, 3)).merge_axes(1, 2), whole),
    ]
    for lazy, expected in cases:
        assert lazy.shape == expected.shape
        for index in np.ndindex(*(2,) * len(expected.shape)):  # every combination of halves of each axis
            block = tuple(
                slice(0, n // 2) if h == 0 else slice(n // 2, n) for h, n in zip(index, expected.shape, strict=True)
            )
            np.testing.assert_array_equal(lazy[block], expected[block])


def test_a_two_process_job_exports_the_same_files_as_one_process(imported_llama, tmp_path):
    """Each parameter split over both processes' devices is gathered one tensor at a time; process 0 writes."""
    from test_multiprocess import assert_succeeded, start_processes, wait_for

    _, run = imported_llama
    hf.export(run, tmp_path / "one")  # one process (this one) with all 8 devices
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "bigjax.cli", "export", "--workdir", run, "--out", tmp_path / "two"]
    assert_succeeded(wait_for(start_processes(command, 2, logs), timeout=120), logs)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in (hf.SINGLE_FILE, "config.json", "tokenizer.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_gpt2_124m_pretrains_on_the_plays_with_a_gpt2_style_tokenizer_json(cli_in_process, tokenizer_file, tmp_path):
    """experiments/gpt2_124m.py:tokenizer=PATH reads real text through that tokenizer (shrunk to run here; through
    the command line in this process)."""
    experiment = f"experiments/gpt2_124m.py:tokenizer={tokenizer_file},seq=32,batch=8,steps=2"
    small = ["num_layers=1", "d_model=32", "num_heads=2", "dtype=float32", "attention=xla"]
    result = cli_in_process(
        "train",
        "--config",
        experiment,
        "--workdir",
        tmp_path / "run",
        "--config.log_every=1",
        *[f"--config.model.{o}" for o in small],
    )
    assert "the bundled plays" in result.stdout and "finished at step 2" in result.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == f"hf:{tokenizer_file}" and saved["data"]["source"] == "shakespeare"


def test_a_trained_llama_run_with_a_sentencepiece_tokenizer_exports_for_transformers(
    cli_in_process, sentencepiece_file, tmp_path
):
    """A run trained here (not imported) exports: transformers loads every weight (none missing or unexpected),
    computes bigjax's logits to float32 rounding, reads the SentencePiece tokenizer as one that encodes a whole play
    as bigjax did, and generate() stops at the run's eos."""
    spm = sentencepiece_file
    run = tmp_path / "run"
    tokenizer_args = [f"--config.data.tokenizer=sentencepiece:{spm}", "--config.model.vocab_size=416"]
    cli_in_process("train", "--config", "experiments/tiny.py:llama=True,steps=2", "--workdir", run, *tokenizer_args)
    out = tmp_path / "exported"
    hf.export(run, out)  # in this process: `bigjax export` processes are test_a_two_process_job_...'s

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    assert_transformers_tokenizes_a_whole_play_as_bigjax(out, f"sentencepiece:{spm}")
    ours = data.make_tokenizer(f"sentencepiece:{spm}")
    ids = [int(i) for i in ours.encode("ROMEO: But, soft! what light through yonder window breaks?")]
    assert_logits_match(bigjax_logits(run, ids), torch_logits(reloaded.eval(), ids), 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.special_ids["eos"] == reloaded.generation_config.eos_token_id

    # The README's way to serve an export.
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    reply = pipe("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert reply.startswith("ROMEO:") and len(reply) > len("ROMEO:")


LLAMA3 = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
DEEPSEEK_YARN = dict(original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", factor=4.0),
        dict(rope_type="llama3", factor=8.0, **LLAMA3),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
        dict(rope_type="yarn", factor=40.0, **DEEPSEEK_YARN),
    ],
    ids=["linear", "llama3", "yarn", "yarn_mscale"],
)
def test_scaled_rope_frequencies_are_transformers_at_real_sizes(rope):
    """Llama 3.1 8B's, Qwen2.5's and DeepSeek V3's RoPE (head 128, theta 5e5 or 1e6): the frequencies and the
    cos/sin factor of transformers' rope initializers, to float32 rounding. XLA's float32 power is exp(y ln x),
    off by up to about y ln(theta) eps (y < 1), more than torch's: that is the bound."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from bigjax.models.layers import RopeScaling, rope_frequencies

    theta = 5e5 if rope["rope_type"] == "llama3" else 1e6
    positions = int(rope.get("original_max_position_embeddings", 32768) * rope["factor"])
    hf_config = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=positions,
        rope_parameters=rope | {"rope_theta": theta},
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
    _, scaling = hf.llama.rope_from_hf(hf_config.to_dict())
    defaults = config_lib.defaults().model.rope_scaling.to_dict()
    inv_freq, factor = rope_frequencies(128, theta, RopeScaling(**(defaults | scaling)))
    np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=(np.log(theta) + 4) * EPS32, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-15)


# --------------------------------------------------------------------------------------------------
# Tokenizers handed to transformers, and special ids

PLAY = "tragedies/hamlet"  # 5427 lines, 175 kB


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory):
    """A SentencePiece unigram model as `bigjax tokenizer train` makes one (byte fallback; [CLS] and [MASK] as
    user-defined pieces), trained here on three plays."""
    from bigjax.data import corpus
    from bigjax.data import tokenizers as bigjax_tokenizers

    path = tmp_path_factory.mktemp("sentencepiece") / "spm.model"
    bigjax_tokenizers.train_tokenizer(list(corpus.shakespeare_plays().values())[:3], 400, str(path))
    return path


def sentencepiece_bpe(directory):
    """A SentencePiece BPE model (the kind Llama 2 and Gemma ship), otherwise trained as bigjax trains one."""
    import sentencepiece

    from bigjax.data import corpus

    lines = (line for text in list(corpus.shakespeare_plays().values())[:3] for line in text.splitlines() if line)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(directory / "bpe"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=3,
        user_defined_symbols=["[CLS]", "[MASK]"],
        minloglevel=2,
    )
    return directory / "bpe.model"


def assert_transformers_tokenizes_a_whole_play_as_bigjax(hf_dir, spec: str):
    """transformers' AutoTokenizer of `hf_dir` encodes every line of a whole bundled play, and the play as one text
    (a causal LM run's document), to the ids bigjax's tokenizer `spec` gives them, adding nothing; and decodes those
    ids, and a continuation ending at eos, to bigjax's text."""
    from bigjax.data import corpus

    ours = data.make_tokenizer(spec)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    play = corpus.shakespeare_plays()[PLAY]
    lines = [line for line in play.splitlines() if line.strip()]
    encoded = theirs(lines)["input_ids"]
    differ = [line for line, ids in zip(lines, encoded, strict=True) if ids != ours.encode(line).tolist()]
    assert not differ, f"{len(differ)} of {len(lines)} lines are encoded otherwise, e.g. {differ[0]!r}"
    ids = ours.encode(play).tolist()
    assert theirs(play)["input_ids"] == ids
    for text in ("  two leading spaces", "[MASK] is [CLS]kept whole", "ümlaut 😀 日本語 ½", "tab\t\tand  spaces  "):
        assert theirs(text)["input_ids"] == ours.encode(text).tolist(), text
    assert theirs.decode(ids) == ours.decode(ids)
    ended = ids[:40] + [ours.special_ids["eos"]]
    assert theirs.decode(ended, skip_special_tokens=True) == ours.decode(ended)


@pytest.mark.parametrize(
    "kind, model_type",
    [("sentencepiece_unigram", "llama"), ("sentencepiece_bpe", "llama"), ("tokenizer_json", "bert")],
)
def test_the_tokenizer_export_writes_reads_in_transformers_as_in_bigjax(kind, model_type, sentencepiece_file, tmp_path):
    """What export writes beside a run's model (here beside the config.json of a Llama or a BERT, whose model_type
    AutoTokenizer falls back on) tokenizes a whole play as the run did: a SentencePiece model (unigram, as bigjax
    trains them, or BPE) and a tokenizer.json of bigjax's own training (byte-level BPE)."""
    from bigjax.data import corpus
    from bigjax.data import tokenizers as bigjax_tokenizers

    if kind == "sentencepiece_unigram":
        spec = f"sentencepiece:{sentencepiece_file}"
    elif kind == "sentencepiece_bpe":
        spec = f"sentencepiece:{sentencepiece_bpe(tmp_path)}"
    else:
        bigjax_tokenizers.train_tokenizer(list(corpus.shakespeare_plays().values())[:3], 400, str(tmp_path / "t.json"))
        spec = f"hf:{tmp_path / 't.json'}"
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": model_type}))
    tokenizer = data.make_tokenizer(spec)
    for name, content in convert.tokenizer_files(spec, convert.special_ids(tokenizer, tokenizer.vocab_size)).items():
        (out / name).write_bytes(content)
    assert_transformers_tokenizes_a_whole_play_as_bigjax(out, spec)


def llama_with_special_ids(vocab_size: int):
    """A Llama whose config.json names its own bos (1) and eos (2), as released Llamas do."""
    torch.manual_seed(5)
    config = transformers.LlamaConfig(**SMALL_CONTEXT | dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2))
    return transformers.LlamaForCausalLM(config).eval()


def test_an_hf_directory_with_only_a_sentencepiece_model_imports_and_exports_with_it(sentencepiece_file, tmp_path):
    """tokenizer.model without tokenizer.json: the run tokenizes with it, and export hands it on (as a tokenizer
    transformers reads as bigjax does) with the checkpoint's own bos and eos."""
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    llama_with_special_ids(400).save_pretrained(hf_dir)
    shutil.copyfile(sentencepiece_file, hf_dir / "tokenizer.model")
    hf.import_hf(hf_dir, run)
    assert config_lib.load_saved(run).data.tokenizer == f"sentencepiece:{(run / 'tokenizer.model').resolve()}"
    ours = data.make_tokenizer(f"sentencepiece:{sentencepiece_file}")
    assert generate.load(run).tokenizer.encode(PROMPT).tolist() == ours.encode(PROMPT).tolist()

    hf.export(run, out)
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)
    assert_transformers_tokenizes_a_whole_play_as_bigjax(out, f"sentencepiece:{sentencepiece_file}")


def test_an_hf_directory_without_a_tokenizer_says_so_and_export_keeps_its_special_ids(capsys, tmp_path):
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    llama_with_special_ids(HF_VOCAB).save_pretrained(hf_dir)
    hf.import_hf(hf_dir, run)
    said = capsys.readouterr().out
    assert f"{hf_dir} has no tokenizer" in said and "--config.data.tokenizer" in said, said

    hf.export(run, out)
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)  # not the byte tokenizer's 257 and 259
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not (out / "tokenizer.json").exists()


def without_tensor(hf_dir, name: str):
    """The directory's model.safetensors without tensor `name` (a partial or damaged save)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf_dir / hf.SINGLE_FILE)
    del tensors[name]
    save_file(tensors, str(hf_dir / hf.SINGLE_FILE), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_untied_causal_lm_without_its_output_layer_is_refused(arch, tokenizer_file, tmp_path):
    model = (
        llama_model()
        if arch == "llama"
        else transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=HF_VOCAB, tie_word_embeddings=False)
        )
    )
    assert not model.config.tie_word_embeddings
    hf_dir = save(model, tmp_path / "hf", tokenizer_file)
    without_tensor(hf_dir, "lm_head.weight")
    with pytest.raises(hf.HFError, match="lm_head.weight"):
        hf.import_hf(hf_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gpt2_with_the_exact_gelu_imports_and_exports(tokenizer_file, tmp_path):
    """activation_function="gelu" is the erf GELU: model.mlp="gelu_exact", and back."""
    torch.manual_seed(6)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=HF_VOCAB, n_positions=64, activation_function="gelu"
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # GELU inputs of |x| ~ 3, where the erf and the tanh forms differ by up to ~5e-4
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(40.0)
    model.eval()
    hf_dir, run, out = save(model, tmp_path / "hf", tokenizer_file), tmp_path / "run", tmp_path / "exported"
    hf.import_hf(hf_dir, run)
    ids = tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode(PROMPT).ids
    theirs, ours = torch_logits(model, ids), bigjax_logits(run, ids)
    assert_logits_match(ours, theirs, 2)
    for block in model.transformer.h:  # the same weights through the tanh GELU: out of tolerance
        block.mlp.act = transformers.activations.ACT2FN["gelu_new"]
    tanh = relative_difference(ours, torch_logits(model, ids))
    assert tanh > RELATIVE_TOLERANCE_PER_LAYER * 3, tanh

    hf.export(run, out)
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, ids), theirs)


@pytest.mark.parametrize(
    "given", [dict(attention_factor=1.3), dict(mscale=1.0, mscale_all_dim=0.5)], ids=["explicit", "mscale"]
)
def test_a_yarn_attention_factor_is_exported_so_transformers_scales_as_the_original(given, tmp_path):
    """The factor on cos and sin, given or derived from DeepSeek's mscales, is written into the export's
    rope_parameters: transformers computes the same frequencies and factor from it as from the original config (so
    the same weights give the same logits), and not YaRN's default 0.1 ln(factor) + 1."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT)
    hf_dir = hf_config_dir(tmp_path, "LlamaForCausalLM", rope_parameters=rope | given)
    config = hf.config_from_hf(hf_dir)
    exported = family.for_config(config).hf_config(config, HF_VOCAB, {})

    def yarn(fields):
        return ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**fields))

    (inv_freq, factor), (expected_inv_freq, expected_factor) = yarn(exported), yarn(files.read_hf_config(hf_dir))
    assert factor == expected_factor != pytest.approx(0.1 * np.log(4.0) + 1)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# init_from.workdir=hf:PATH and the experiment's architecture


def suggested_overrides(message: str) -> list[str]:
    """The `--config.KEY=VALUE` a refusal suggests."""
    return re.findall(r"--config\.[\w.]+=[^\s),;]+", message)


def test_init_from_hf_refuses_a_llama_of_other_settings_listing_each_and_allows_a_context_extension(
    tokenizer_file, tmp_path
):
    """A Llama experiment whose rope_theta, key/value heads and output layer are not the checkpoint's is refused
    in one line naming each difference (and nothing the run may choose: vocabulary, length, dropout, dtypes); with
    the overrides it suggests, it loads; a RoPE scaling over a checkpoint without one (a context extension) is the
    run's choice."""
    hf_dir = save(llama_model(), tmp_path / "hf", tokenizer_file)  # rope_theta 5e5, 2 kv heads, untied
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(
        num_layers=2, d_model=64, num_heads=4, mlp_dim=96, max_len=64, vocab_size=HF_VOCAB + 3, norm_eps=1e-5,
        positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, dropout=0.1,
    )  # fmt: skip
    config.init_from.workdir = f"hf:{hf_dir}"
    setup = make_setup(config)
    with pytest.raises(hf.HFError) as refused:
        finetune.load_pretrained_into(setup, setup.init_state())
    message = str(refused.value)
    assert "\n" not in message
    fixes = suggested_overrides(message)
    assert sorted(fix.partition("=")[0] for fix in fixes) == [
        "--config.model.num_kv_heads",
        "--config.model.rope_theta",
        "--config.model.tie_embeddings",
    ], message

    for fix in [*fixes, "--config.model.rope_scaling.type=yarn", "--config.model.rope_scaling.factor=2.0"]:
        config_lib.apply_override(config, fix)
    config.model.rope_scaling.original_max_len = 128
    setup = make_setup(config)
    state = finetune.load_pretrained_into(setup, setup.init_state())
    embedding = dict(llama_model().named_parameters())["model.embed_tokens.weight"].detach().numpy()
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["embedding"])[:HF_VOCAB], embedding)
