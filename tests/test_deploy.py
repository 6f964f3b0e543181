"""`bigjax export --format onnx|stablehlo` (bigjax.deploy): the ONNX files run in onnxruntime and give bigjax's own
logits; the StableHLO prefill and decode step, deserialized, decode greedily what `bigjax generate` does.

Each run is a committed checkpoint at step 0 written as `bigjax import` writes one (no train step to compile), of a
shrunk experiment in its trained layout (layers scanned where the experiment scans them: the unstacking path),
with noise added to every parameter and BatchNorm statistic so that no layer is the identity and no statistic is
(0, 1): a parameter in the wrong place, or BatchNorm in training mode, changes the logits."""

import json
import sys

import jax
import numpy as np
import onnxruntime
import pytest
from conftest import REPO
from tolerance import float32_sum_tolerance, image_sum_lengths, transformer_sum_lengths

from bigjax import config as config_lib
from bigjax import data, deploy, generate
from bigjax.deploy import onnx_export, stablehlo
from bigjax.errors import UserError
from bigjax.models import gpt
from bigjax.run import checkpoint, lock
from bigjax.run.setup import make_setup

# The models, shrunk; each keeps what makes its export path differ (scanned layers, BatchNorm, max-pool stem).
RUNS = {
    "gpt": ("tiny.py", []),  # scanned layers
    "cnn": ("cnn_digits.py:norm=batchnorm", ["model.features=(4, 8)", "model.hidden_dim=16"]),
    "vit": ("vit_digits.py:layers=2,d=16", ["model.scan_layers=True"]),
    "resnet": (
        "resnet18_cifar10.py",
        [
            "model.width=4",
            "model.stem=imagenet",  # its max-pool is one of the nodes rewritten for onnxruntime
            "model.dtype=float32",
            "data.source=digits",
            "data.image_size=8",
            "data.channels=1",
            "data.image_mean=(0.5,)",
            "data.image_std=(0.5,)",
        ],
    ),
}


def saved_run(workdir, name: str, noise: float = 0.1):
    """A workdir with a committed checkpoint at step 0 of RUNS[name]; returns (config, the variables saved)."""
    experiment, overrides = RUNS[name]
    config = config_lib.load(str(REPO / "experiments" / experiment), [f"config.{o}" for o in overrides])
    config.batch_size = 8
    setup = make_setup(config)
    state = setup.init_state()
    # The noise drawn and added on the host, then put back on the state's shards: op by op on the devices, each
    # operation on each shape of parameter would be a compile of its own (compiled as one program, ResNet's random
    # draws over 8 devices took 14 s to compile).
    rng = np.random.default_rng(1)
    shaken = lambda tree: jax.tree.map(
        lambda a: (np.asarray(a) + noise * rng.standard_normal(a.shape, np.float32)).astype(a.dtype), tree
    )
    model_state = {c: jax.tree.map(lambda a: abs(a) + 0.5, shaken(v)) for c, v in state.model_state.items()}
    shardings = setup.state_shardings
    state = state.replace(
        params=jax.device_put(shaken(state.params), shardings.params),
        model_state=jax.device_put(model_state, shardings.model_state),
    )
    with lock.held(workdir) as fence:
        saves = checkpoint.writer(workdir, config.keep_checkpoints, fence)
        saves.save(0, state, data.state_before_any_batch(), {"nan_skips": 0}, config)
        saves.finish()
        checkpoint.write_config(workdir, config, fence)
    variables = jax.tree.map(np.asarray, {"params": state.params, **state.model_state})
    return config, setup.task, variables


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpt")
    config, task, variables = saved_run(workdir, "gpt", noise=0.5)
    return workdir, config, task, variables


def onnx_logits(out, feed: dict) -> np.ndarray:
    """model.onnx of `out` in onnxruntime, as docs/deployment.md's snippet runs it."""
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    return session.run(None, feed)[0]


def relative_difference(values, reference) -> float:
    return float(np.max(np.abs(values - reference)) / np.max(np.abs(reference)))


def test_gpt_onnx_gives_bigjax_logits_at_any_batch_and_length(gpt_run, tmp_path):
    workdir, config, task, variables = gpt_run
    out = tmp_path / "onnx"
    assert deploy.export(workdir, out, "onnx") == 0
    described = json.loads((out / "model.json").read_text())
    assert described["inputs"][0] == {"name": "tokens", "dtype": "int32", "shape": ["batch", "length"]}
    vocab = config.model.vocab_size
    c = gpt.GPTConfig.from_config(config.model)
    # onnxruntime and XLA add the same float32 terms in other orders (tests/tolerance.py).
    bound = float32_sum_tolerance(*transformer_sum_lengths(1, c.vocab_size, c.d_model, c.mlp_dim, c.max_len, 2))
    rng = np.random.default_rng(0)
    apply = jax.jit(task.model.apply)  # bigjax's model, layers scanned: one program per shape, not op by op
    for batch, length in [(3, config.model.max_len), (1, 5)]:  # both dimensions are dynamic
        tokens = rng.integers(0, vocab, (batch, length), np.int32)
        ours = np.asarray(apply(variables, tokens))[..., :vocab]
        theirs = onnx_logits(out, {"tokens": tokens})
        assert theirs.shape == (batch, length, vocab)
        difference = relative_difference(theirs, ours)
        print(f"gpt {batch}x{length}: max relative difference {difference:.3g} (bound {bound:.3g})")
        assert difference < bound, (difference, bound)
    assert described["checked"]["max_relative_difference"] < bound

    snippet = readme_snippet("onnxruntime.InferenceSession").replace("out/model.onnx", str(out / "model.onnx"))
    ran = {}
    exec(snippet, ran)
    tokens = np.array([[72, 105, 33]], np.int32)
    ours = np.asarray(apply(variables, tokens))[..., :vocab]
    assert relative_difference(ran["logits"], ours) < bound


def readme_snippet(containing: str) -> str:
    """The python block of docs/deployment.md that contains `containing` (the page a user copies it from)."""
    blocks = (REPO / "docs" / "deployment.md").read_text().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if containing in block)


@pytest.mark.parametrize("name", ["cnn", "vit", "resnet"])
def test_image_classifier_onnx_gives_bigjax_logits(name, tmp_path):
    config, task, variables = saved_run(tmp_path / "run", name)
    out = tmp_path / "onnx"
    deploy.export(tmp_path / "run", out, "onnx")
    described = json.loads((out / "model.json").read_text())
    assert described["inputs"][0]["shape"] == ["batch", 8, 8, 1]
    assert described["preprocessing"]["mean"] == [0.5]
    images = np.random.default_rng(0).standard_normal((3, 8, 8, 1), np.float32)
    # Eval mode: BatchNorm's running stats. Compiled: one program, not a compile per operation.
    ours = np.asarray(jax.jit(lambda v, x: task.model.apply(v, x, train=False))(variables, images))
    theirs = onnx_logits(out, {"images": images})
    bound = float32_sum_tolerance(*image_sum_lengths(config))
    print(f"{name}: max relative difference {relative_difference(theirs, ours):.3g} (bound {bound:.3g})")
    assert theirs.shape == (3, 10)
    assert relative_difference(theirs, ours) < bound, (relative_difference(theirs, ours), bound)


def test_stablehlo_greedy_decoding_is_bigjax_generate(gpt_run, tmp_path):
    workdir, config, _, _ = gpt_run
    out = tmp_path / "stablehlo"
    deploy.export(workdir, out, "stablehlo", platforms=("cpu",))
    served = stablehlo.load(out)
    assert served.manifest["cache_columns"] == config.model.max_len
    # Rows of different lengths (right-padded prefill), one that stops short of max_new_tokens at most.
    prompts = [[72, 105, 33], list(range(40, 51)), [259]]
    # 20 new tokens: the cache generate sizes is max_len columns too (one width of the same sums).
    ours = generate.load(workdir).generate_ids(prompts, generate.Sampling(max_new_tokens=20, temperature=0))
    assert stablehlo.greedy(served, prompts, max_new_tokens=20) == ours
    assert len({tuple(row) for row in ours}) == len(ours)  # the rows differ: the cache is per row


@pytest.mark.parametrize("fmt, missing", [("stablehlo", "flatbuffers"), ("onnx", "jax2onnx")])
def test_a_missing_optional_dependency_is_one_error_naming_the_extra(gpt_run, tmp_path, monkeypatch, fmt, missing):
    # As if it were not installed: `import` of a module that sys.modules maps to None raises ImportError. jax imports
    # its serializer, which needs flatbuffers, at the first serialization: as if none had happened yet.
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, "jax._src.export.serialization", raising=False)
    with pytest.raises(deploy.DeployError, match=f"--format {fmt} needs {missing}: pip install 'bigjax\\[deploy\\]'"):
        deploy.export(gpt_run[0], tmp_path / "out", fmt, platforms=("cpu",))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_refused_runs_say_so_in_one_line(tmp_path, cli):
    config = config_lib.load(str(REPO / "experiments" / "bert_tiny_mlm.py"))
    (tmp_path / "config.json").write_text(config_lib.to_json(config))  # a run's config.json, alone
    result = cli("export", "--workdir", tmp_path, "--out", tmp_path / "out", "--format", "onnx", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error:") and "masked_lm" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    # An --out that holds anything, or is a file, is refused before the run is read (one error, as above).
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine").write_text("mine")
    for out, message in ((tmp_path / "full", "is not empty"), (tmp_path / "full" / "mine", "is a file")):
        with pytest.raises(UserError, match=f"--out {out} {message}"):
            deploy.export(tmp_path, out, "onnx")
    assert (tmp_path / "full" / "mine").read_text() == "mine"

    with pytest.raises(deploy.DeployError, match="stablehlo exports .*decode step of: gpt causal_lm$"):
        deploy.check_exportable(config_lib.load(str(REPO / "experiments" / "cnn_digits.py")), "stablehlo", "run")
    run = config_lib.load(str(REPO / "experiments" / "tiny.py"))
    run.quant.bits = 8
    with pytest.raises(deploy.DeployError, match="quantized run .* export the float run"):
        deploy.check_exportable(run, "onnx", "run")
    run.quant.qat = True  # quantization-aware training keeps float weights: exported as they are
    deploy.check_exportable(run, "onnx", "run")
    run.quant.bits, run.lora.rank = 0, 4
    with pytest.raises(deploy.DeployError, match="LoRA run .* `bigjax lora merge"):
        deploy.check_exportable(run, "onnx", "run")


def test_unstack_layers_names_each_layer_as_the_unrolled_model():
    stacked = {"layers": {"mlp": {"kernel": np.arange(6).reshape(3, 2)}}, "stage2_rest": {"bias": np.ones((2, 1))}}
    unrolled = onnx_export.unstack_layers(stacked)
    assert sorted(unrolled) == ["layers_0", "layers_1", "layers_2", "stage2_block2", "stage2_block3"]
    np.testing.assert_array_equal(unrolled["layers_2"]["mlp"]["kernel"], [4, 5])
