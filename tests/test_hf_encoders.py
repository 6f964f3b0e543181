"""Hugging Face encoders (BERT, ViT, ResNet) against transformers itself, in float32 on the CPU: tiny random models
saved with save_pretrained (nothing is downloaded), imported, compared logit for logit, exported back and loaded
by transformers again with no missing or unexpected weights.

The random models are scaled so that a wrong detail shows: weights of std ~1.5/sqrt(fan_in), so that the GELU's
inputs reach |x| ~ 3 (where the tanh and the exact GELU differ by ~1e-3; near 0 they agree), and every LayerNorm
and BatchNorm weight, bias and running statistic random (an identity norm hides a misplaced one)."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bigjax import config as config_lib
from bigjax import hf
from bigjax.hf import family as family_lib
from bigjax.hf import files
from bigjax.run import checkpoint
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

EPS32 = float(np.finfo(np.float32).eps)
# As in tests/test_hf.py: both sides compute the same float32 sums in other orders (XLA's fused einsums and
# convolutions vs torch's), so each output differs by rounding alone, a few eps per reduction, through every layer.
# 64 eps per layer (+2: the embedding and the head), against the largest output, allows that with room; a mapping
# mistake or the tanh GELU in place of the exact one (~1e-3 at |x| ~ 3) is 100x or more above it.
RELATIVE_TOLERANCE_PER_LAYER = 64 * EPS32
TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(path):
    """BERT's kind of tokenizer (WordPiece, lower-cased, [CLS] ... [SEP]), trained here on a few lines."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIAL)
    tokenizer.train_from_iterator([TEXT, "a dog is not a cat, and a mat is not a hat"] * 20, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wordpiece") / "tokenizer.json"
    wordpiece_tokenizer(path)
    return path


def randomize(model, seed=0):
    """Weights at a scale where the GELU's inputs reach |x| ~ 3, random norms and BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=generator)

    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if "running_var" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=generator) * 1.5)
            elif "running_mean" in name or name.endswith("bias"):
                p.copy_(0.3 * randn(p.shape))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * randn(p.shape))
            elif p.ndim >= 2 and "embeddings" not in name and "cls_token" not in name:
                p.copy_(1.5 * randn(p.shape) / np.sqrt(p[0].numel()))  # fan_in = in x kh x kw
            else:
                p.copy_(randn(p.shape))
    return model.eval()


def bert_config(vocab_size, **extra):
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        **extra,
    )


def vit_config(**extra):
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        **extra,
    )


def resnet_config(layer_type):
    depths = [1, 1, 1, 1] if layer_type == "basic" else [3, 4, 6, 3]
    width = 8
    expansion = 1 if layer_type == "basic" else 4
    return transformers.ResNetConfig(
        embedding_size=width,
        hidden_sizes=[expansion * width * 2**i for i in range(4)],
        depths=depths,
        layer_type=layer_type,
        num_labels=5,
    )


def save(model, directory, tokenizer_file=None):
    model.save_pretrained(directory)
    if tokenizer_file is not None:
        (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return directory


def restored(workdir):
    """(config, setup, variables) of the workdir's step-0 checkpoint, restored over the 8 devices (fsdp): once per
    test, for every model it is applied with below."""
    config = config_lib.load_saved(workdir)
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config.batch_size = jax.device_count()
    setup = make_setup(config)
    variables = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 0, setup.variables_target())
    return config, setup, variables


def text_inputs(ids):
    tokens = np.asarray([ids], np.int32)
    return tokens, np.ones_like(tokens), np.arange(len(ids), dtype=np.int32)[None]


def bigjax_outputs(run, inputs, capture=None, **model_overrides) -> np.ndarray:
    """The logits on `inputs` (or, with `capture`, the output of that submodule) of the model of `run` (what
    `restored` returns) with its restored variables; with `model_overrides`, of the model with those settings
    instead (the same variables: none of them changes a parameter's shape)."""
    config, setup, variables = run
    model = setup.task.model
    if model_overrides:
        config = config_lib.from_dict(config.to_dict())
        config.model.update(model_overrides)
        model = make_task(config).model
    # Compiled as one program: op by op, every operation of the model on the 8 devices would be a compile of its own.
    if capture is None:
        return np.asarray(jax.jit(model.apply)(variables, *inputs))
    capturing = lambda variables, *inputs: model.apply(  # noqa: E731
        variables, *inputs, capture_intermediates=lambda m, _: m.name == capture
    )
    _, state = jax.jit(capturing)(variables, *inputs)
    out = jax.tree.leaves(state["intermediates"])[0]
    return np.asarray(out)


def relative_difference(ours, theirs) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_close(ours, theirs, layers, what=""):
    rel = relative_difference(ours, theirs)
    print(f"{what}: max relative difference {rel:.2e}")
    assert rel <= RELATIVE_TOLERANCE_PER_LAYER * (layers + 2), (what, rel)
    return rel


def exported(workdir, out, auto_class, reference, inputs):
    """Export; transformers loads every weight (none missing, unexpected or mismatched) and computes `reference`."""
    assert hf.export(workdir, out) == 0
    reloaded, info = getattr(transformers, auto_class).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    # safetensors hands transformers memory-mapped weights, at whatever alignment the file gives each tensor, and
    # torch's CPU matmuls can round a last bit otherwise there: compared bit for bit with the reference model, whose
    # weights torch allocated, they are copied into torch's own memory first.
    for parameter in reloaded.parameters():
        parameter.data = parameter.data.clone()
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded.eval()(**inputs).logits.numpy(), reference)
    return reloaded


# --------------------------------------------------------------------------------------------------
# BERT


@pytest.mark.parametrize(
    "arch, mesh",
    [("BertForMaskedLM", "fsdp_tensor"), ("BertForSequenceClassification", "data")],
)
def test_bert_matches_transformers_and_exports_back(arch, mesh, tokenizer_file, tmp_path):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    hf_vocab = tokenizer.get_vocab_size()
    model = randomize(getattr(transformers, arch)(bert_config(hf_vocab, num_labels=3)))
    hf_dir = save(model, tmp_path / "hf", tokenizer_file)
    overrides = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"] if mesh != "data" else []
    hf.import_hf(hf_dir, tmp_path / "run", overrides)  # on the tests' 8 devices: fsdp x tensor, or data parallel
    ids = tokenizer.encode(TEXT).ids  # [CLS] ... [SEP]: each bigjax example starts with its cls token
    assert ids[0] == tokenizer.token_to_id("[CLS]")

    # The GELU's inputs do reach |x| ~ 3, where the tanh and the exact form differ.
    seen = []
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, i, out: seen.append(out.abs().max())
    )
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    hook.remove()
    assert seen[0] > 3

    inputs, run = text_inputs(ids), restored(tmp_path / "run")
    ours = bigjax_outputs(run, inputs)
    if arch == "BertForMaskedLM":
        assert np.all(ours[0, :, hf_vocab:] == 0)  # the padded vocabulary: zero rows, zero bias
        ours = ours[:, :, :hf_vocab]
    else:
        ours = ours[:, 0]  # the first (only) packed example
    assert_close(ours, theirs, model.config.num_hidden_layers, f"{arch} import")

    # The exact GELU is what makes it match: with the tanh GELU the same weights miss by far more.
    tanh = bigjax_outputs(run, inputs, mlp="gelu")
    tanh = tanh[:, :, :hf_vocab] if arch == "BertForMaskedLM" else tanh[:, 0]
    assert relative_difference(tanh, theirs) > 2 * RELATIVE_TOLERANCE_PER_LAYER * (2 + 2)  # twice the tolerance

    auto = "AutoModelForMaskedLM" if arch == "BertForMaskedLM" else "AutoModelForSequenceClassification"
    out = tmp_path / "exported"
    reloaded = exported(tmp_path / "run", out, auto, theirs, {"input_ids": torch.tensor([ids])})
    assert type(reloaded).__name__ == arch
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast(TEXT)["input_ids"] == ids


def test_bare_bert_model_hidden_states_and_pooler_match(tokenizer_file, tmp_path):
    """BertModel imports as a classifier with the pooler loaded and a new zero head (bigjax's initialization)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = randomize(transformers.BertModel(bert_config(tokenizer.get_vocab_size())))
    hf_dir = save(model, tmp_path / "hf", tokenizer_file)
    hf.import_hf(hf_dir, tmp_path / "run", ["--config.model.scan_layers=false"])  # layers_1: the last layer
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task"]["name"] == "classification" and saved["task"]["num_classes"] == 2

    ids = tokenizer.encode(TEXT).ids
    with torch.no_grad():
        output = model(torch.tensor([ids]))
    inputs, run = text_inputs(ids), restored(tmp_path / "run")
    hidden = bigjax_outputs(run, inputs, capture="layers_1")  # the last post-LN layer's output
    assert_close(hidden, output.last_hidden_state.numpy(), 2, "BertModel hidden states")
    pooled = np.tanh(bigjax_outputs(run, inputs, capture="pooler")[:, 0])
    assert_close(pooled, output.pooler_output.numpy(), 3, "BertModel pooler")
    _, _, variables = run
    assert not np.any(np.asarray(variables["params"]["classifier"]["kernel"]))


# --------------------------------------------------------------------------------------------------
# ViT


def pixels(config, seed=0) -> np.ndarray:
    """One float32 image batch, NHWC for bigjax (HF takes the same numbers as NCHW)."""
    size = config.image_size
    return np.random.default_rng(seed).normal(size=(2, size, size, config.num_channels)).astype(np.float32)


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def test_vit_matches_transformers_and_exports_back(tmp_path):
    model = randomize(transformers.ViTForImageClassification(vit_config(num_labels=4)))
    hf_dir = save(model, tmp_path / "hf")
    hf.import_hf(hf_dir, tmp_path / "run")
    images = pixels(model.config)
    with torch.no_grad():
        theirs = model(pixel_values=nchw(images)).logits.numpy()
    run = restored(tmp_path / "run")
    ours = bigjax_outputs(run, (images,))
    assert_close(ours, theirs, model.config.num_hidden_layers, "ViTForImageClassification import")
    tanh = bigjax_outputs(run, (images,), mlp="gelu")
    assert relative_difference(tanh, theirs) > 2 * RELATIVE_TOLERANCE_PER_LAYER * (2 + 2)  # twice the tolerance

    out = tmp_path / "exported"
    exported(tmp_path / "run", out, "AutoModelForImageClassification", theirs, {"pixel_values": nchw(images)})
    processor = json.loads((out / files.PREPROCESSOR_FILE).read_text())
    assert processor["image_mean"] == [0.5] * 3 and processor["size"] == {"height": 16, "width": 16}
    transformers.AutoImageProcessor.from_pretrained(out)  # transformers reads it


def test_bare_vit_model_hidden_states_match(tmp_path):
    model = randomize(transformers.ViTModel(vit_config()))
    hf_dir = save(model, tmp_path / "hf")
    hf.import_hf(hf_dir, tmp_path / "run")
    images = pixels(model.config, seed=1)
    with torch.no_grad():
        theirs = model(pixel_values=nchw(images)).last_hidden_state.numpy()
    ours = bigjax_outputs(restored(tmp_path / "run"), (images,), capture="encoder_norm")
    assert_close(ours, theirs, 2, "ViTModel hidden states")


# --------------------------------------------------------------------------------------------------
# BERT and ViT over a large common offset


@pytest.mark.parametrize("family, offset", [("bert", 100.0), ("vit", 300.0)])
def test_logits_match_transformers_when_the_hidden_states_carry_a_large_common_offset(
    family, offset, tokenizer_file, tmp_path
):
    """`offset` added to every word embedding (BERT: the embedding norm's input) or every position embedding (ViT:
    the residual stream, into every pre-norm) changes no logit in exact arithmetic. Torch's LayerNorm takes the
    variance in two passes, E[(x - E[x])^2]; one pass, E[x^2] - E[x]^2, cancels offset^2 against offset^2 and
    misses the variance (~1 here) by ~offset^2 eps. Both sides hold each of those inputs only to ~offset eps, which
    each layer passes on: the tolerance grows by that much."""
    if family == "bert":
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        model = randomize(transformers.BertForSequenceClassification(bert_config(tokenizer.get_vocab_size())))
        offset_of = model.bert.embeddings.word_embeddings.weight
        ids = tokenizer.encode(TEXT).ids
        inputs, theirs_inputs = text_inputs(ids), {"input_ids": torch.tensor([ids])}
    else:
        model = randomize(transformers.ViTForImageClassification(vit_config(num_labels=4)))
        offset_of = model.vit.embeddings.position_embeddings
        images = pixels(model.config)
        inputs, theirs_inputs = (images,), {"pixel_values": nchw(images)}
    with torch.no_grad():
        offset_of += offset
        theirs = model(**theirs_inputs).logits.numpy()
    hf.import_hf(save(model, tmp_path / "hf", tokenizer_file if family == "bert" else None), tmp_path / "run")
    run = restored(tmp_path / "run")

    def ours(**model_overrides):
        logits = bigjax_outputs(run, inputs, **model_overrides)
        return logits[:, 0] if family == "bert" else logits  # BERT: the first (only) packed example

    layers = model.config.num_hidden_layers
    tolerance = (RELATIVE_TOLERANCE_PER_LAYER + offset * EPS32) * (layers + 2)
    two_pass = relative_difference(ours(), theirs)
    assert two_pass <= tolerance, (two_pass, tolerance)
    assert relative_difference(ours(norm_variance="one_pass"), theirs) > 2 * tolerance  # the offset is large enough


# --------------------------------------------------------------------------------------------------
# ResNet


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_matches_transformers_with_batch_stats_and_exports_back(layer_type, tmp_path):
    model = randomize(transformers.ResNetForImageClassification(resnet_config(layer_type)))
    hf_dir = save(model, tmp_path / "hf")
    overrides = ["--config.data.image_size=32", "--config.mesh.data=1", "--config.mesh.fsdp=8"]
    hf.import_hf(hf_dir, tmp_path / "run", overrides)
    images = pixels(transformers.ViTConfig(image_size=32, num_channels=3))
    with torch.no_grad():
        theirs = model(pixel_values=nchw(images)).logits.numpy()
    run = restored(tmp_path / "run")
    ours = bigjax_outputs(run, (images,))
    convs = 1 + 2 * sum(model.config.depths) if layer_type == "basic" else 1 + 3 * sum(model.config.depths)
    assert_close(ours, theirs, convs, f"ResNet ({layer_type}) import")
    # The running statistics went into the model state, not the parameters.
    _, _, variables = run
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["stem_norm"]["var"]),
        model.resnet.embedder.embedder.normalization.running_var.numpy(),
    )
    # bigjax's default "same" padding samples other pixels at the strided layers: the padding setting matters.
    same = bigjax_outputs(run, (images,), conv_padding="same")
    assert relative_difference(same, theirs) > 1e-2

    exported(tmp_path / "run", tmp_path / "exported", "AutoModelForImageClassification", theirs,
             {"pixel_values": nchw(images)})  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Refusals, views, the command line


@pytest.mark.parametrize(
    "family, setting, value",
    [
        ("bert", "norm_position", "pre"),
        ("vit", "pooling", "gap"),
        ("vit", "position_embedding", "sincos2d"),
        ("resnet", "conv_padding", "same"),
        ("resnet", "stem", "cifar"),
    ],
)
def test_export_refuses_a_setting_transformers_lacks_naming_it(family, setting, value):
    config = config_lib.defaults(family, "classification")
    config.model[setting] = value
    with pytest.raises(hf.HFError, match=f"config.model.{setting}={value!r}"):
        family_lib.for_config(config)


@pytest.mark.parametrize(
    "field, value",
    [("downsample_in_first_stage", True), ("depths", [2, 2, 2, 3]), ("hidden_sizes", [8, 16, 32, 48])],
)
def test_a_resnet_bigjax_cannot_represent_is_one_error_line(cli, cli_in_process, field, value, tmp_path):
    """The first case in a process of its own (exit 2 and one line, no traceback, from a real process); the others
    through the same command line in this one."""
    hf_dir = save(transformers.ResNetForImageClassification(resnet_config("basic")), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    run = cli if field == "downsample_in_first_stage" else cli_in_process
    result = run("import", "--hf", hf_dir, "--workdir", tmp_path / "run", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], result.stderr


def test_transpose_and_range_views_read_what_numpy_cuts():
    whole = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    view = files.View(whole.shape, lambda index: whole[index])
    cases = [
        (view.transpose(2, 3, 1, 0), whole.transpose(2, 3, 1, 0)),
        (view.transpose(3, 2, 0, 1), whole.transpose(3, 2, 0, 1)),
        (view.range(1, 1, 3), whole[:, 1:3]),
        (view.range(1, 0, 1).plus(view.range(1, 2, 3)), whole[:, :1] + whole[:, 2:3]),
    ]
    for lazy, expected in cases:
        assert lazy.shape == expected.shape
        for index in np.ndindex(*(2,) * expected.ndim):
            block = tuple(
                slice(0, max(n // 2, 1)) if h == 0 else slice(max(n // 2, 1), n)
                for h, n in zip(index, expected.shape, strict=True)
            )
            np.testing.assert_array_equal(lazy[block], expected[block])


# --------------------------------------------------------------------------------------------------
# Recipes: fine-tuning a Hugging Face BERT or ViT directory, shrunk to 2 steps here


def test_imdb_finetune_recipe_fine_tunes_a_local_hf_bert(cli_in_process, tokenizer_file, tmp_path):
    """The recipe through the command line, in this process."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = randomize(transformers.BertForMaskedLM(bert_config(tokenizer.get_vocab_size())))
    hf_dir = save(model, tmp_path / "bert", tokenizer_file)
    reviews = tmp_path / "reviews.jsonl"
    lines = [{"text": f"{TEXT} {i}", "label": i % 2} for i in range(40)]
    reviews.write_text("\n".join(json.dumps(line) for line in lines))
    result = cli_in_process(
        "train",
        "--config",
        f"experiments/imdb_finetune.py:hf={hf_dir},seq=32,batch=8",
        "--workdir",
        tmp_path / "run",
        f"--config.data.source=jsonl:{reviews}",
        "--config.data.eval_split=",
        "--config.total_steps=2",
        "--config.eval_every=0",
        "--config.early_stopping.metric=",
        "--config.log_every=1",
    )
    assert "finished at step 2" in result.stdout, result.stdout
    assert (
        "init_from: loaded" in result.stdout
        and "freshly initialized: classifier/bias, classifier/kernel, pooler" in (result.stdout)
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["mlp"] == "gelu_exact" and saved["model"]["norm_variance"] == "two_pass"
    assert saved["data"]["tokenizer"] == f"hf:{hf_dir / 'tokenizer.json'}"


def test_vit_transfer_recipe_starts_from_a_local_hf_vit(cli_in_process, tmp_path):
    """The recipe through the command line, in this process."""
    model = randomize(transformers.ViTForImageClassification(vit_config(num_labels=4)))
    hf_dir = save(model, tmp_path / "vit")
    result = cli_in_process(
        "train",
        "--config",
        f"experiments/vit_transfer.py:hf={hf_dir},batch=8",
        "--workdir",
        tmp_path / "run",
        "--config.data.source=digits",
        "--config.data.train_split=train",
        "--config.data.eval_split=",
        "--config.task.num_classes=10",
        "--config.total_steps=2",
        "--config.eval_every=0",
        "--config.early_stopping.metric=",
        "--config.log_every=1",
    )
    assert "finished at step 2" in result.stdout, result.stdout
    assert "freshly initialized: head/bias, head/kernel" in result.stdout


def test_init_from_hf_loads_a_resnets_batch_stats_with_its_parameters(tmp_path):
    from bigjax.params import by_path
    from bigjax.run import finetune

    model = randomize(transformers.ResNetForImageClassification(resnet_config("basic")))
    hf_dir = save(model, tmp_path / "hf")
    config = hf.config_from_hf(hf_dir, ["--config.data.image_size=32", "--config.task.num_classes=3"])
    config.init_from.update(dict(workdir=f"hf:{hf_dir}", exclude="^head/"))
    setup = make_setup(config)
    state = finetune.load_pretrained_state(setup.init_state(), config.init_from, setup.state_shardings)
    stats = by_path(state.model_state["batch_stats"])
    norm = model.resnet.encoder.stages[1].layers[0].shortcut.normalization
    np.testing.assert_array_equal(np.asarray(stats["stage2_block1/shortcut_norm/mean"]), norm.running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(stats["stage2_block1/shortcut_norm/var"]), norm.running_var.numpy())
    assert not np.any(np.asarray(state.params["head"]["kernel"]))  # excluded: a new head

    # One training step moves each running statistic 0.1 of the way to the batch's, as torch's momentum=0.1 does
    # (torch's running variance takes the batch's unbiased variance, n/(n-1) of Flax's: the mean is compared to
    # torch's, the variance to the batch's variance that Flax takes). Each norm's input went through `convs`
    # convolutions whose sums XLA and torch add in other orders.
    norms = {"stem_norm": (model.resnet.embedder.embedder.normalization, 1), "stage2_block1/shortcut_norm": (norm, 4)}
    old = {name: (n.running_mean.numpy().copy(), n.running_var.numpy().copy()) for name, (n, _) in norms.items()}
    inputs = {}  # what each of those norms saw in torch (a pre-hook that returns None leaves its input as it is)
    for name, (hf_norm, _) in norms.items():
        hf_norm.register_forward_pre_hook(lambda module, args, name=name: inputs.update({name: args[0].numpy()}))
    images = pixels(transformers.ViTConfig(image_size=32, num_channels=3))
    with torch.no_grad():
        model.train()(pixel_values=nchw(images))
    batch = {"image": images, "labels": np.zeros(2, np.int32), "label_weights": np.ones(2, np.float32)}
    on_host = jax.device_get((state.params, state.model_state))  # one device: a program compiled for one is cheaper
    _, moved = jax.jit(lambda p, s: setup.task.loss_sums(p, s, batch, train=True))(*on_host)
    moved = by_path(moved["batch_stats"])
    for name, (hf_norm, convs) in norms.items():
        (old_mean, old_var), x = old[name], inputs[name]
        assert_close(np.asarray(moved[f"{name}/mean"]), hf_norm.running_mean.numpy(), convs, f"{name} mean")
        np.testing.assert_allclose(hf_norm.running_mean.numpy(), 0.9 * old_mean + 0.1 * x.mean((0, 2, 3)), rtol=1e-5)
        expected_var = 0.9 * old_var + 0.1 * x.var((0, 2, 3))
        assert_close(np.asarray(moved[f"{name}/var"]), expected_var, convs, f"{name} variance")


def test_init_from_hf_refuses_a_bert_into_another_architecture_listing_each_difference(tmp_path):
    """A post-LN, exact-GELU BERT is not loaded into a pre-LN, tanh-GELU experiment: one line names each setting in
    which the experiment's model computes something else (not dropout, a run's own choice), as the override that
    makes it the checkpoint's; with those set, it loads and pools as transformers does."""
    from test_hf import suggested_overrides

    from bigjax.run import finetune

    model = randomize(transformers.BertModel(bert_config(120)))
    hf_dir = save(model, tmp_path / "hf")
    config = config_lib.defaults("bert", "classification")
    config.model.update(
        num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64, vocab_size=120, norm_position="pre"
    )
    config.task.num_classes = 2
    config.init_from.update(dict(workdir=f"hf:{hf_dir}", exclude="^classifier/"))
    with pytest.raises(hf.HFError) as refused:  # as load_pretrained_into asks (tests/test_hf.py's Llama case)
        hf.check_architecture(config, hf_dir)
    message = str(refused.value)
    fixes = suggested_overrides(message)
    assert sorted(fix.partition("=")[0].removeprefix("--config.model.") for fix in fixes) == [
        "mlp",
        "norm_eps",
        "norm_position",
        "norm_variance",
        "type_vocab_size",
    ], message

    for fix in fixes:
        config_lib.apply_override(config, fix)
    setup = make_setup(config)
    state = finetune.load_pretrained_into(setup, setup.init_state())
    ids = list(range(5, 20))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).pooler_output.numpy()
    _, captured = jax.jit(
        lambda params, inputs: setup.task.model.apply(
            {"params": params}, *inputs, capture_intermediates=lambda m, _: m.name == "pooler"
        )
    )(state.params, text_inputs(ids))
    pooled = np.tanh(np.asarray(jax.tree.leaves(captured["intermediates"])[0])[:, 0])
    assert_close(pooled, expected, 3, "pooler after init_from")
