"""`bigjax import --hf`, `bigjax export` and `init_from.workdir=hf:PATH`: Hugging Face directories in and out of
bigjax runs, for the architectures of bigjax.hf.family.

Import places every parameter straight onto its shards: each device's block is read from the safetensors files
when that device asks for it (files.View), so no host reads a block it does not hold. bigjax pads the vocabulary up
to model.vocab_multiple: import appends zero rows (zero columns of an untied head), export cuts them off.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np

from bigjax import config as config_lib
from bigjax import families
from bigjax.compress.variant import Variant
from bigjax.hf import common, files, mapping
from bigjax.hf import family as family_lib
from bigjax.hf.common import HFError, Params
from bigjax.parallel.mesh import MESH_AXES
from bigjax.params import by_path, nest, param_path

SOURCE_FILE = "hf_source.json"  # written by `bigjax import`: the HF vocabulary size and special ids export gives back
SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
VOCAB_AXES = {"embed/embedding": 0, "unembed/kernel": 1, "mlm_bias": 0}  # the axes bigjax pads the vocabulary along


def config_from_hf(hf_dir, overrides=()):
    """A validated bigjax config for the model in hf_dir; `overrides` after."""
    hf = files.read_hf_config(hf_dir)
    family = family_lib.for_architectures(hf)
    try:
        config = family.bigjax_config(hf)
    except (TypeError, ValueError, AttributeError) as error:
        # bigjax_config reads config.json alone, so these are its values of a wrong type (a string for a size, a
        # number for a table): refused by the config's typed fields or by Python itself.
        raise HFError(
            f"{hf.path}: a field has the wrong type ({error}); correct it, or save the model again with transformers' "
            "save_pretrained"
        ) from None
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


def tables(config, read=None):
    """(layer i -> the family's mapping of layer i, the mapping of everything else), with the HF names under the
    prefix the files in `read` use (import) or the one export writes (read None)."""
    family = family_lib.for_config(config)
    root = getattr(family, "ROOT", "")
    if read is not None and hasattr(family, "import_root"):
        root = family.import_root(read)
    return (lambda i: family.layer_table(config, i, root)), family.global_table(config, root)


def layer_views(read, config, i: int) -> dict:
    return mapping.views(tables(config, read)[0](i), read)


def hf_views(read, config) -> tuple[dict, dict]:
    """(layer 0's views by sub-path, the global views by path) of the HF model: which bigjax paths it has."""
    layer_table, global_table = tables(config, read)
    return mapping.views(layer_table(0), read), mapping.views(global_table, read)


def layers_of(path: str, config) -> tuple[range, str] | None:
    """(the layers, the path under a layer) of a parameter of the Transformer layers: a scanned stack's (`layers/...`;
    a MoE's `dense_layers/...` and `moe_layers/...`) or one unrolled layer's (`layers_I/...`); None for the rest."""
    head, _, sub = path.partition("/")
    for name, start, stop in common.layer_stacks(config.model):
        if head == name:
            return range(start, stop), sub
    index = head.removeprefix("layers_")
    if head.startswith("layers_") and index.isdigit():
        return range(int(index), int(index) + 1), sub
    return None


def parameter_view(path: str, read, config) -> files.View:
    """The HF weights of bigjax parameter `path`, as a lazy view in bigjax's layout (layers stacked when scanned)."""
    found = layers_of(path, config)
    if found is None:
        return mapping.views(tables(config, read)[1], read)[path]
    layers, sub = found
    if path.startswith("layers_"):
        return layer_views(read, config, layers[0])[sub]
    return files.stack([layer_views(read, config, i)[sub] for i in layers])


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
    global_views = mapping.views(tables(config, read)[1], read)
    views_of_layer = functools.cache(lambda i: layer_views(read, config, i))

    def available(path: str) -> bool:
        found = layers_of(path, config)
        if found is None:
            return path in global_views
        layers, sub = found
        return sub in views_of_layer(layers[0])  # the layers of one stack have the same parameters

    return available


def check_weights(read, config, hf_vocab: int | None) -> None:
    """Every HF tensor the model maps is there, for every layer, in the layout config.json's sizes describe (layers
    of one shape, the vocabulary as long as vocab_size): weights that disagree are refused before an import writes
    anything. (Each is compared again with the shape the model needs as it is placed.)"""
    for _, start, stop in common.layer_stacks(config.model):
        stack = [layer_views(read, config, i) for i in range(start, stop)]
        for sub in stack[0]:
            files.stack([layer[sub] for layer in stack])  # which refuses layers of different shapes
    views = mapping.views(tables(config, read)[1], read)
    for path, axis in VOCAB_AXES.items():
        if hf_vocab is not None and path in views and views[path].shape[axis] != hf_vocab:
            raise views[path].disagrees(f"not config.json's vocab_size={hf_vocab} along axis {axis}")


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


# What a run chooses for itself, whatever the checkpoint was trained with: the vocabulary and length (bigjax pads
# the vocabulary; a learned position table of another length is refused by its shape), dropout, and how the model
# runs (dtypes, attention kernel, scan, remat) or starts (initialization, BatchNorm's momentum), and how a mixture of
# experts trains (its router's losses, and a capacity that drops tokens while training, as dropout does).
RUN_SETTINGS = frozenset(
    {"vocab_size", "vocab_multiple", "max_len", "dropout", "dtype", "param_dtype", "attention", "scan_layers"}
    | {"remat", "init_std", "bn_momentum", "freeze_batch_stats", "zero_init_residual"}
    | {"moe.router_aux_loss", "moe.router_z_loss", "moe.capacity_factor"}
)


def check_architecture(config, hf_dir) -> None:
    """Refuse (one line) a run whose model would compute something other than the HF checkpoint's with its weights:
    each setting that differs, as the override that makes it the checkpoint's. Everything else of the model is the
    experiment's to choose (RUN_SETTINGS), and so is a RoPE scaling over a checkpoint without one (a context
    extension)."""
    classifier = config.task.name == "classification"  # it has no output layer over the vocabulary to tie
    ours, theirs = architecture(config.model, classifier), architecture(config_from_hf(hf_dir).model, classifier)
    where = f"config.init_from.workdir=hf:{hf_dir}: this run's model is not the checkpoint's (its config.json)"
    take = "take the model from the checkpoint (c.model = bigjax.hf.config_from_hf(PATH).model, as "
    take += "experiments/imdb_finetune.py does)"
    if ours["family"] != theirs["family"]:
        raise HFError(f"{where}: model.family={ours['family']!r}, the checkpoint's {theirs['family']!r}; {take}")
    differing = [key for key in theirs if ours.get(key) != theirs[key]]
    if theirs.get("rope_scaling.type") == "none":
        differing = [key for key in differing if not key.startswith("rope_scaling.")]
    if differing:
        listed = ", ".join(f"model.{key}={ours.get(key)!r} (the checkpoint's: {theirs[key]!r})" for key in differing)
        overrides = " ".join(f"--config.model.{key}={theirs[key]}" for key in differing)
        raise HFError(f"{where}: {listed}; set {overrides}, or {take}")


def architecture(m, classifier: bool) -> dict:
    """The settings of model config `m` that decide what its weights compute, by dotted key (rope_scaling.factor),
    with the sizes and biases that 0 and None leave to the model resolved as the model resolves them; for a
    `classifier`, without tie_embeddings."""
    from bigjax.models import vit

    flat = {}
    for key, value in m.items():
        if key in RUN_SETTINGS:
            continue
        if hasattr(value, "items"):
            flat |= {f"{key}.{sub}": v for sub, v in value.items() if f"{key}.{sub}" not in RUN_SETTINGS}
        else:
            flat[key] = value
    if "num_heads" in m:  # a Transformer stack
        stack = vit.encoder_config(m)
        flat |= {key: getattr(stack, key) for key in ("num_kv_heads", "head_dim", "mlp_dim")}
        flat |= dict(zip(config_lib.BIAS_SWITCHES, config_lib.linear_biases(m), strict=True))
    if m.get("positions") != "rope":  # unused
        flat = {key: v for key, v in flat.items() if not key.startswith("rope_")}
    if classifier:
        flat.pop("tie_embeddings", None)
    return flat


# --------------------------------------------------------------------------------------------------
# `bigjax import`


def import_hf(hf_dir, workdir, overrides=()) -> int:
    """Write `workdir` (new or empty) as a run at step 0 of the HF model in `hf_dir`: a committed checkpoint (the
    imported parameters, a fresh optimizer state, the data iterator's start), config.json and the tokenizer. Returns
    the number of parameters. `bigjax train --config WORKDIR/config.json` then resumes it at step 0.

    Everything is read and checked before anything is written: config.json, every weights file, every tensor's
    shape, the tokenizer, the mesh, the weights themselves. A write that fails (a full disk) removes what was
    written, so a failed import leaves nothing behind."""
    from bigjax import data, paths
    from bigjax.ops import metrics
    from bigjax.run import checkpoint
    from bigjax.run import state as state_lib

    workdir = paths.check_new_output(workdir, "--workdir")  # never beside or over anything: the HF files included
    config = config_from_hf(hf_dir, overrides)
    text = families.is_text(config.model.family)
    hf = files.read_hf_config(hf_dir)
    hf_vocab = hf["vocab_size"] if text else None
    read = files.TensorReader(hf_dir)  # every weights file's header
    hf_views(read, config)  # and every tensor the model cannot do without (an untied output layer) is there
    own_tokenizer = files.tokenizer_spec(hf_dir) if text and config.data.tokenizer == "byte" else None
    if text:
        if config.data.tokenizer == "byte":  # none named: the directory's own, read in hf_dir until it is copied
            config.data.tokenizer = own_tokenizer or "byte"
            if not own_tokenizer:
                metrics.say(
                    f"import: {hf_dir} has no tokenizer (neither tokenizer.json nor tokenizer.model), so this run "
                    "has none: text would be read as bytes, which are not this model's tokens. Name the model's "
                    "tokenizer with --config.data.tokenizer=PATH (a .json or .model file) before training or "
                    "generating from text"
                )
        # A tokenizer lacking a special token bigjax needs (pad, cls, mask) gets it appended after its last id:
        # the model needs rows for those too (zero rows; export cuts back to the HF vocabulary).
        config.model.vocab_size = max(hf_vocab, data.make_tokenizer(config.data.tokenizer).vocab_size)
        config_lib.check_values(config)
    check_weights(read, config, hf_vocab)
    state = imported_state(read, config, hf_dir)
    data_state = data.state_before_any_batch()
    if own_tokenizer:  # the checkpoint and config.json name the copy beside them, written last
        config.data.tokenizer = files.moved_spec(own_tokenizer, workdir)

    with checkpoint.writing_new_workdir(workdir, "--workdir") as fence:
        checkpoint.save_only_checkpoint(workdir, state, data_state, {"nan_skips": 0}, config, fence)
        checkpoint.write_config(workdir, config, fence)
        source = {"source": str(hf_dir)}
        if text:  # the vocabulary and special ids export gives back, whatever tokenizer the run has
            special = {field: hf[field] for field in SPECIAL_ID_FIELDS if hf.get(field) is not None}
            source |= {"vocab_size": hf_vocab, "special_ids": special}
        with fence.fenced():
            if own_tokenizer:
                files.copy_tokenizer_files(hf_dir, workdir)
            (workdir / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return state_lib.count_parameters(state.params)


def imported_state(read, config, hf_dir):
    """The TrainState at step 0 of the HF weights, each parameter made straight onto its shards on the mesh of
    `config` (refused there if it does not fit the devices), with a fresh optimizer state."""
    from bigjax.ops import metrics
    from bigjax.run import state as state_lib
    from bigjax.run.setup import make_setup

    setup = make_setup(config)
    params, fresh = load_tree(read, config, setup.abstract_state.params, setup.state_shardings.params)
    model_state = {}
    for collection, arrays in setup.abstract_state.model_state.items():
        shardings = setup.state_shardings.model_state[collection]
        loaded, missing = load_tree(read, config, arrays, shardings, f"{collection}/")
        if missing:
            raise HFError(f"{hf_dir} has no weights for {collection} {', '.join(missing)}")
        model_state[collection] = nest(loaded)
    if fresh:  # the head a bare model (BertModel, ViTModel) lacks: bigjax's own initialization
        initialized = by_path(setup.init_state().params)
        params.update({path: initialized[path] for path in fresh})
        metrics.say(f"import: {hf_dir} has no {', '.join(fresh)}: initialized as a new run's")
    tx = setup.tx
    return jax.jit(
        lambda p, s: state_lib.TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=tx.init(p), model_state=s
        ),
        out_shardings=setup.state_shardings,
        donate_argnums=(0, 1),
    )(nest(params), model_state)


# --------------------------------------------------------------------------------------------------
# `bigjax export`


def export(workdir, out, step: int | None = None, max_shard_size: int | str = files.MAX_SHARD_SIZE) -> int:
    """Write `out` (config.json, the safetensors weights, the tokenizer files) from a committed checkpoint of a run
    whose model is a Hugging Face architecture; returns the step exported.

    The parameters are restored onto all devices, split over fsdp (a model too large for one device exports too),
    and gathered to the host one tensor at a time; process 0 writes."""
    from jax.experimental import multihost_utils

    from bigjax import data, paths
    from bigjax.run.setup import make_setup
    from bigjax.run.workdir import Run

    run, out = Run(workdir), paths.check_new_output(out)
    workdir, config = run.path, run.saved_config()
    refusal = Variant.of(config).float_export_refusal(workdir)
    if refusal:
        raise HFError(refusal)
    family = family_lib.for_config(config)  # or refused before anything is read
    max_shard_bytes = files.shard_bytes(max_shard_size)
    step = run.committed_step(step)

    # Parameters split over every device on fsdp. The batch size only has to divide that mesh: nothing trains here.
    config.mesh.update({**{axis: 1 for axis in MESH_AXES}, "fsdp": -1})
    config.batch_size = config.optim.grad_accum * jax.device_count()
    variables = run.restore_onto(make_setup(config), step)
    # The parameters by path, and the model state (BatchNorm statistics) as COLLECTION/path.
    restored = by_path(variables.pop("params"))
    restored |= {
        f"{collection}/{path}": leaf for collection, tree in variables.items() for path, leaf in by_path(tree).items()
    }
    params = Params(restored, fetch=lambda array: multihost_utils.process_allgather(array, tiled=True))

    text = families.is_text(config.model.family)
    source = workdir / SOURCE_FILE
    source = json.loads(source.read_text()) if source.exists() else {}
    hf_vocab = source.get("vocab_size", config.model.vocab_size) if text else None
    tensors = {
        # np.array, not ascontiguousarray: that makes a 0-d array (num_batches_tracked) 1-d
        name: np.array(array, dtype=np.float32 if np.issubdtype(array.dtype, np.floating) else None, order="C")
        for name, array in hf_tensors(params, config, hf_vocab).items()
    }
    if "special_ids" in source:  # an imported model keeps its own
        special = source["special_ids"]
    else:
        special = special_ids(data.make_tokenizer(config.data.tokenizer), hf_vocab) if text else {}
    tokenizer = tokenizer_files(config.data.tokenizer, special) if text else {}
    hf_config = family.hf_config(config, hf_vocab, special) | dict(torch_dtype="float32")
    if jax.process_index() == 0:
        with paths.writing_new_output(out):  # a failed write (a full disk) leaves nothing
            files.save_weights(tensors, out, max_shard_bytes)
            (out / "config.json").write_text(json.dumps(hf_config, indent=2))
            if config.task.name == "causal_lm":  # what generate() stops at
                (out / "generation_config.json").write_text(json.dumps(generation_config(special), indent=2))
            for name, content in tokenizer.items():
                (out / name).write_bytes(content)
            if not text:  # how transformers' image processor should prepare pixels: as bigjax's data pipeline does
                (out / files.PREPROCESSOR_FILE).write_text(json.dumps(files.image_processor_config(config), indent=2))
    return step


def hf_tensors(params: Params, config, hf_vocab: int | None) -> dict[str, np.ndarray]:
    """{HF name: array} of a run's parameters and model state (model state as COLLECTION/path), through the family's
    mapping; the vocabulary rows bigjax padded (VOCAB_AXES) cut back to the HF model's `hf_vocab`."""

    def get(path: str) -> np.ndarray:
        array = params[path]
        if path in VOCAB_AXES and hf_vocab is not None:
            array = array[(slice(None),) * VOCAB_AXES[path] + (slice(0, hf_vocab),)]
        return array

    layer_table, global_table = tables(config)
    out = {}
    for i in range(config.model.get("num_layers", 0)):
        slot = common.layer_slot(config.model, i)
        out |= mapping.arrays(layer_table(i), lambda sub, i=i, slot=slot: params.layer(i, sub, slot), lambda sub: True)
    return out | mapping.arrays(global_table, get, params.__contains__)


def special_ids(tokenizer, hf_vocab: int) -> dict:
    """bos/eos ids for config.json, where the HF vocabulary has them (ids bigjax appended are cut off: never name
    those). GPT-2's tokenizer has no separate start token: its bos is its eos (<|endoftext|>), as in the original."""
    eos, cls = tokenizer.special_ids["eos"], tokenizer.special_ids["cls"]
    if eos >= hf_vocab:
        return {}
    return dict(eos_token_id=eos, bos_token_id=cls if cls < hf_vocab else eos)


def generation_config(special: dict) -> dict:
    """generation_config.json: the special ids, and pad as eos where the model names no pad (as GPT-2's own file)."""
    eos = special.get("eos_token_id")
    generation = dict(special)
    if eos is not None:
        generation.setdefault("pad_token_id", eos[0] if isinstance(eos, list) else eos)
    return generation


def tokenizer_files(spec: str, special: dict) -> dict[str, bytes]:
    """The run's tokenizer as the files AutoTokenizer reads, by name, so that transformers tokenizes text as the run
    did: a Hugging Face tokenizer.json as it is, with the tokenizer_config.json and special_tokens_map.json that came
    beside it; a SentencePiece model as a tokenizer.json built from it (transformers' own reading of a tokenizer.model
    rebuilds a BPE from a unigram model, and encodes most lines otherwise), and the model itself. The byte tokenizer
    has no Hugging Face form. `special`: the bos/eos ids config.json names."""
    from bigjax.data import tokenizers

    kind, path = tokenizers.parse_spec(spec)
    if kind == "byte":
        return {}
    tokenizer, path = tokenizers.make_tokenizer(spec), pathlib.Path(path)
    if kind == "sentencepiece":
        written = {"tokenizer.json": tokenizer.hf_tokenizer_json().encode()}
        written[files.SENTENCEPIECE_FILE] = path.read_bytes()
    else:
        written = {"tokenizer.json": path.read_bytes()}
        if path.name == "tokenizer.json":  # an imported one: its config files too
            beside = [path.parent / name for name in files.TOKENIZER_FILES if name != "tokenizer.json"]
            written |= {file.name: file.read_bytes() for file in beside if file.is_file()}
    # Without a tokenizer_config.json, AutoTokenizer picks a class by the model's type, and a BERT's rebuilds a
    # WordPiece from the vocabulary: name the class that reads tokenizer.json as it is.
    if "tokenizer_config.json" not in written:
        fast = fast_tokenizer_config(tokenizer, json.loads(written["tokenizer.json"]), special)
        written["tokenizer_config.json"] = json.dumps(fast, indent=2).encode()
    return written


def fast_tokenizer_config(tokenizer, tokenizer_json: dict, special: dict) -> dict:
    """tokenizer_config.json for a PreTrainedTokenizerFast (tokenizer.json read as it is), naming its bos, eos and
    pad tokens where tokenizer.json has them as special tokens already (naming another would change how text that
    contains it is split)."""
    specials = {token["content"] for token in tokenizer_json.get("added_tokens", []) if token["special"]}
    ids = dict(bos_token=special.get("bos_token_id"), eos_token=special.get("eos_token_id"))
    ids["pad_token"] = tokenizer.special_ids["pad"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, i in ids.items():
        i = i[0] if isinstance(i, list) else i
        if isinstance(i, int) and 0 <= i < tokenizer.base_vocab and tokenizer.token(i) in specials:
            config[name] = tokenizer.token(i)
    return config
