"""`bigjax import --hf`, `bigjax export` and `init_from.workdir=hf:PATH`: Hugging Face directories in and out of
bigjax runs, for the architectures of bigjax.hf.family.

Import places every parameter straight onto its shards: each device's block is read from the safetensors files
when that device asks for it (files.View), so no host reads a block it does not hold. bigjax pads the vocabulary up
to model.vocab_multiple: import appends zero rows (zero columns of an untied head), export cuts them off.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np

from bigjax import config as config_lib
from bigjax.hf import family as family_lib
from bigjax.hf import files
from bigjax.hf.common import HFError, Params
from bigjax.models import quantized
from bigjax.params import by_path, nest, param_path

SOURCE_FILE = "hf_source.json"  # written by `bigjax import`: the HF vocabulary size export cuts back to
VOCAB_AXES = {"embed/embedding": 0, "unembed/kernel": 1, "mlm_bias": 0}  # the axes bigjax pads the vocabulary along


def config_from_hf(hf_dir, overrides=()):
    """A validated bigjax config for the model in hf_dir; `overrides` after."""
    hf = files.read_hf_config(hf_dir)
    config = family_lib.for_architectures(hf).bigjax_config(hf)
    if "max_len" in config.model:
        config.data.seq_len = min(config.data.seq_len, config.model.max_len)
    normalization = files.read_image_normalization(hf_dir)
    if normalization and "vocab_size" not in config.model:  # the pixels the model was trained on
        config.data.image_mean, config.data.image_std = normalization
    for override in overrides:
        config_lib.apply_override(config, override)
    config_lib.check_values(config)
    return config


# --------------------------------------------------------------------------------------------------
# HF -> bigjax parameters


def hf_views(read, config) -> tuple[dict, dict]:
    """(layer 0's views by sub-path, the global views by path) of the HF model: which bigjax paths it has."""
    family = family_lib.for_config(config)
    return family.layer_tensors(read, 0, config), family.global_tensors(read, config)


def parameter_view(path: str, read, config) -> files.View:
    """The HF weights of bigjax parameter `path`, as a lazy view in bigjax's layout (layers stacked when scanned)."""
    family = family_lib.for_config(config)
    if path.startswith("layers/"):  # scanned: one array stacked over the layers
        sub = path.removeprefix("layers/")
        return files.stack([family.layer_tensors(read, i, config)[sub] for i in range(config.model.num_layers)])
    if path.startswith("layers_"):  # unrolled: layers_I/...
        index, _, sub = path.removeprefix("layers_").partition("/")
        return family.layer_tensors(read, int(index), config)[sub]
    return family.global_tensors(read, config)[path]


def place(path: str, view: files.View, leaf, sharding) -> jax.Array:
    """`view` as the array `leaf` (shape, dtype) describes, on `sharding`: each device reads its own block."""
    if path in VOCAB_AXES:
        view = view.padded(VOCAB_AXES[path], leaf.shape[VOCAB_AXES[path]])
    if view.shape != tuple(leaf.shape):
        raise HFError(f"{path}: the weights have shape {view.shape} but the model needs {tuple(leaf.shape)}")
    return jax.make_array_from_callback(view.shape, sharding, lambda index: view[index].astype(leaf.dtype, copy=False))


def available_paths(read, config):
    """A test of which bigjax paths the HF model in `read` has weights for. Model-state arrays (BatchNorm
    statistics) are named `COLLECTION/path` (`batch_stats/stem_norm/mean`), parameters by their path alone."""
    layer_views, global_views = hf_views(read, config)

    def available(path: str) -> bool:
        if path.startswith("layers/") or path.startswith("layers_"):
            return path.partition("/")[2] in layer_views
        return path in global_views

    return available


def load_tree(read, config, abstract, shardings, prefix: str = "") -> tuple[dict, list[str]]:
    """({path: array} of the arrays of `abstract` (the parameters, or one model-state collection with `prefix`
    "COLLECTION/") that the HF model has, each made straight onto its sharding; [the paths it lacks])."""
    available, shardings = available_paths(read, config), by_path(shardings)
    loaded, missing = {}, []
    for path, leaf in by_path(abstract).items():
        if available(prefix + path):
            loaded[path] = place(prefix + path, parameter_view(prefix + path, read, config), leaf, shardings[path])
        else:
            missing.append(path)
    return loaded, missing


def load_selected(tree, hf_dir, selected: dict, shardings, prefix: str = "") -> tuple[dict, list[str]]:
    """`tree` (the parameters, or a model-state collection with `prefix` "COLLECTION/") with the arrays of the
    "/"-paths in `selected` that the HF model has replaced by its weights (the HF model's own layout, from its
    config.json; the vocabulary padded to this run's). Returns (tree, the paths loaded)."""
    hf_config = config_from_hf(hf_dir)
    read = files.TensorReader(hf_dir)
    available, shardings = available_paths(read, hf_config), by_path(shardings)
    loaded = {
        path: place(prefix + path, parameter_view(prefix + path, read, hf_config), leaf, shardings[path])
        for path, leaf in by_path(tree).items()
        if selected[path] and available(prefix + path)
    }
    merged = jax.tree_util.tree_map_with_path(lambda keypath, leaf: loaded.get(param_path(keypath), leaf), tree)
    return merged, sorted(loaded)


# --------------------------------------------------------------------------------------------------
# `bigjax import`


def import_hf(hf_dir, workdir, overrides=()) -> int:
    """Write `workdir` as a run at step 0 of the HF model in `hf_dir`: a committed checkpoint (the imported
    parameters, a fresh optimizer state, the data iterator's start), config.json and the tokenizer. Returns the
    number of parameters. `bigjax train --config WORKDIR/config.json` then resumes it at step 0."""
    from bigjax import checkpoint, data, lock, metrics, paths
    from bigjax import state as state_lib
    from bigjax.setup import make_setup

    config = config_from_hf(hf_dir, overrides)  # every refusal before anything is written
    text = "vocab_size" in config.model
    hf_vocab = files.read_hf_config(hf_dir)["vocab_size"] if text else None
    read = files.TensorReader(hf_dir)  # the weights are there, in a form we read
    workdir = paths.workdir(workdir)
    with lock.held(workdir, say=metrics.say) as fence:
        if checkpoint.had_checkpoints(workdir):
            raise HFError(f"{workdir} already holds checkpoints; import into a new --workdir")
        if text:
            if files.copy_tokenizer_files(hf_dir, workdir) and config.data.tokenizer == "byte":
                config.data.tokenizer = f"hf:{pathlib.Path(workdir).resolve() / 'tokenizer.json'}"
            # A tokenizer lacking a special token bigjax needs (pad, cls, mask) gets it appended after its last id:
            # the model needs rows for those too (zero rows; export cuts back to the HF vocabulary).
            tokenizer = data.make_tokenizer(config.data.tokenizer)
            config.model.vocab_size = max(hf_vocab, tokenizer.vocab_size)
            config_lib.check_values(config)

        setup = make_setup(config)
        params, fresh = load_tree(read, config, setup.abstract_state.params, setup.state_shardings.params)
        model_state = {}
        for collection, arrays in setup.abstract_state.model_state.items():
            loaded, missing = load_tree(
                read, config, arrays, setup.state_shardings.model_state[collection], f"{collection}/"
            )
            if missing:
                raise HFError(f"{hf_dir} has no weights for {collection} {', '.join(missing)}")
            model_state[collection] = nest(loaded)
        if fresh:  # the head a bare model (BertModel, ViTModel) lacks: bigjax's own initialization
            initialized = by_path(setup.init_state().params)
            params.update({path: initialized[path] for path in fresh})
            metrics.say(f"import: {hf_dir} has no {', '.join(fresh)}: initialized as a new run's")
        tx = setup.tx
        state = jax.jit(
            lambda p, s: state_lib.TrainState(
                step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=tx.init(p), model_state=s
            ),
            out_shardings=setup.state_shardings,
            donate_argnums=(0, 1),
        )(nest(params), model_state)
        data_state = data.train_batches(config).get_state()

        saves = checkpoint.writer(workdir, config.keep_checkpoints, fence)
        saves.save(0, state, data_state, {"nan_skips": 0}, config)
        saves.finish()
        checkpoint.write_config(workdir, config, fence)
        source = {"source": str(hf_dir)} | ({"vocab_size": hf_vocab} if text else {})
        (workdir / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return state_lib.count_parameters(state.params)


# --------------------------------------------------------------------------------------------------
# `bigjax export`


def export(workdir, out, step: int | None = None, max_shard_size: int | str = files.MAX_SHARD_SIZE) -> int:
    """Write `out` (config.json, the safetensors weights, the tokenizer files) from a committed checkpoint of a run
    whose model is a Hugging Face architecture; returns the step exported.

    The parameters are restored onto all devices, split over fsdp (a model too large for one device exports too),
    and gathered to the host one tensor at a time; process 0 writes."""
    from jax.experimental import multihost_utils

    from bigjax import checkpoint, data, paths
    from bigjax.setup import make_setup

    workdir = paths.workdir(workdir)
    config = config_lib.load_saved(workdir)
    refusal = quantized.float_export_refusal(config, workdir)
    if refusal:
        raise HFError(refusal)
    family = family_lib.for_config(config)  # or refused before anything is read
    max_shard_bytes = files.shard_bytes(max_shard_size)
    committed = checkpoint.committed_steps(workdir)
    if not committed or (step is not None and step not in committed):
        raise HFError(f"{workdir}: no committed checkpoint {step if step is not None else ''} (committed: {committed})")
    step = committed[-1] if step is None else step
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise HFError(f"--out {out} exists and is not empty; export into a new directory")

    # Parameters split over every device on fsdp. The batch size only has to divide that mesh: nothing trains here.
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config.batch_size = config.optim.grad_accum * jax.device_count()
    target = make_setup(config).variables_target()
    mngr = checkpoint.manager(workdir, read_only=True)
    variables = checkpoint.restore_variables(mngr, step, target)
    # The parameters by path, and the model state (BatchNorm statistics) as COLLECTION/path.
    restored = by_path(variables.pop("params"))
    restored |= {
        f"{collection}/{path}": leaf for collection, tree in variables.items() for path, leaf in by_path(tree).items()
    }
    params = Params(restored, fetch=lambda array: multihost_utils.process_allgather(array, tiled=True))

    text = "vocab_size" in config.model
    source = workdir / SOURCE_FILE
    source = json.loads(source.read_text()) if source.exists() else {}
    hf_vocab = source.get("vocab_size", config.model.vocab_size) if text else None
    tensors = {
        # np.array, not ascontiguousarray: that makes a 0-d array (num_batches_tracked) 1-d
        name: np.array(array, dtype=np.float32 if np.issubdtype(array.dtype, np.floating) else None, order="C")
        for name, array in family.hf_tensors(params, config, hf_vocab).items()
    }
    special = special_ids(data.make_tokenizer(config.data.tokenizer), hf_vocab) if text else {}
    hf_config = family.hf_config(config, hf_vocab, special) | dict(torch_dtype="float32")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        files.save_weights(tensors, out, max_shard_bytes)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2))
        if config.task.name == "causal_lm":  # what generate() stops at; pad as eos, as GPT-2's own file does
            generation = special | ({"pad_token_id": special["eos_token_id"]} if special else {})
            (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if text:
            copy_tokenizer(config.data.tokenizer, out)
        else:  # how transformers' image processor should prepare pixels: as bigjax's data pipeline does
            (out / files.PREPROCESSOR_FILE).write_text(json.dumps(files.image_processor_config(config), indent=2))
    return step


def special_ids(tokenizer, hf_vocab: int) -> dict:
    """bos/eos ids for config.json, where the HF vocabulary has them (ids bigjax appended are cut off: never name
    those). GPT-2's tokenizer has no separate start token: its bos is its eos (<|endoftext|>), as in the original."""
    eos, cls = tokenizer.special_ids["eos"], tokenizer.special_ids["cls"]
    if eos >= hf_vocab:
        return {}
    return dict(eos_token_id=eos, bos_token_id=cls if cls < hf_vocab else eos)


# transformers' LlamaTokenizer reads a SentencePiece model (tokenizer.model); bigjax adds no bos/eos when encoding.
SENTENCEPIECE_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": False,
    "add_eos_token": False,
    "legacy": False,
}


def copy_tokenizer(spec: str, out: pathlib.Path):
    """The run's tokenizer files for transformers: a Hugging Face tokenizer.json as it is, a SentencePiece model as
    the tokenizer.model of a LlamaTokenizer. The byte tokenizer has no Hugging Face form."""
    from bigjax.data import tokenizers

    kind, path = tokenizers.parse_spec(spec)
    if kind == "byte":
        return
    path = pathlib.Path(path)
    if kind == "sentencepiece":
        shutil.copyfile(path, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG, indent=2))
    elif path.name == "tokenizer.json":
        files.copy_tokenizer_files(path.parent, out)  # with tokenizer_config.json and special_tokens_map.json
    else:
        shutil.copyfile(path, out / "tokenizer.json")
