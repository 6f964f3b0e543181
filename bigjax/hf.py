"""Hugging Face interop: GPT2LMHeadModel and LlamaForCausalLM (MistralForCausalLM without a sliding window) in and
out of bigjax's GPT family.

    config = hf.config_from_hf(hf_dir)                    # a bigjax config from config.json (refuses what it cannot be)
    params = hf.load_params(hf_dir, config, mesh, rules)  # safetensors -> bigjax's tree, each array onto its shards
    hf.export(workdir, out_dir, step=None)                # a transformers-loadable directory from a checkpoint

Layouts. bigjax's Dense and Einsum kernels are [in, out] (attention: [d, heads, head_dim] and [heads, head_dim, d]);
torch's nn.Linear (Llama) stores [out, in], GPT-2's Conv1D already [in, out], and GPT-2 fuses q|k|v into one
c_attn. Llama's q and k need no permutation: bigjax's rotary is the same half-rotation (rotate_half) form as
transformers'. Scanned layers are stacked on a leading `layers` axis. bigjax pads the vocabulary up to
model.vocab_multiple: import appends zero rows (zero columns of an untied head), export cuts them off.

No torch here: weights are read and written with safetensors' numpy API, one tensor at a time.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np

from bigjax import config as config_lib
from bigjax.errors import UserError
from bigjax.params import by_path, nest, param_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SOURCE_FILE = "hf_source.json"  # written by `bigjax import`: the HF vocabulary size export cuts back to


class HFError(UserError):
    """A Hugging Face directory bigjax cannot read or represent: a message for the user."""


# --------------------------------------------------------------------------------------------------
# config.json -> bigjax config

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
# Qwen2ForCausalLM has biases on q/k/v but not on o: bigjax's one use_bias cannot say that (needs a model change).


def read_hf_config(hf_dir) -> dict:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{path} not found: --hf must name a Hugging Face model directory (save_pretrained's output)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise HFError(f"{path} is not valid JSON ({error})") from None


def architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        raise HFError(
            f"config.json architectures={names}: bigjax imports {', '.join(ARCHITECTURES)} only "
            "(Qwen2 needs q/k/v biases without an o bias, which bigjax's model cannot represent yet)"
        )
    return ARCHITECTURES[known[0]]


def config_from_hf(hf_dir, overrides=()):
    """A validated bigjax config (family gpt, task causal_lm) for the model in hf_dir; `overrides` after."""
    hf = read_hf_config(hf_dir)
    config = config_lib.defaults("gpt", "causal_lm")
    model = gpt2_model(hf) if architecture(hf) == "gpt2" else llama_model(hf)
    config.model.update(model)
    config.data.seq_len = min(config.data.seq_len, model["max_len"])
    for override in overrides:
        config_lib.apply_override(config, override)
    config_lib.check_values(config)
    return config


def refuse(field: str, value, why: str):
    raise HFError(f"config.json {field}={value!r}: {why}; bigjax cannot import this model")


def require(hf: dict, field: str, allowed, default, why: str):
    value = hf.get(field, default)
    if value not in allowed:
        refuse(field, value, why)


def gpt2_model(hf: dict) -> dict:
    # gelu_new and gelu_pytorch_tanh are the tanh approximation bigjax's GELU MLP uses.
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new", "bigjax's GELU is the tanh form")
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), False, "bigjax scales attention by 1/sqrt(head_dim) only")
    require(hf, "scale_attn_weights", (True,), True, "bigjax always scales attention by 1/sqrt(head_dim)")
    require(hf, "add_cross_attention", (False,), False, "bigjax's decoder has no cross-attention")
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_len=hf["n_positions"],
        num_layers=hf["n_layer"],
        d_model=d,
        num_heads=hf["n_head"],
        num_kv_heads=0,
        head_dim=0,
        mlp_dim=hf.get("n_inner") or 4 * d,
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="gelu",
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def llama_model(hf: dict) -> dict:
    require(hf, "hidden_act", ("silu",), "silu", "bigjax's SwiGLU gates with silu")
    require(hf, "attention_bias", (False,), False, "bigjax's Llama has no attention biases")
    require(hf, "mlp_bias", (False,), False, "bigjax's Llama has no MLP biases")
    require(hf, "rope_scaling", (None,), None, "bigjax has the plain RoPE only (no scaled RoPE)")
    if hf.get("sliding_window") is not None and hf["sliding_window"] < hf["max_position_embeddings"]:
        refuse("sliding_window", hf["sliding_window"], "bigjax attends to the whole context (no sliding window)")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta (and any scaling) here
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters.rope_type", rope["rope_type"], "bigjax has the plain RoPE only (no scaled RoPE)")
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------------------------------
# Reading safetensors


class TensorReader:
    """HF tensors by name, from model.safetensors or the shards a model.safetensors.index.json lists. A name is
    found with or without the `transformer.` prefix that GPT2LMHeadModel adds (the original gpt2 files lack it)."""

    def __init__(self, hf_dir):
        hf_dir = pathlib.Path(hf_dir)
        if (hf_dir / INDEX_FILE).is_file():
            weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: hf_dir / shard for name, shard in weight_map.items()}
        elif (hf_dir / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(hf_dir / SINGLE_FILE, framework="numpy") as f:
                self.files = {name: hf_dir / SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise HFError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are read)")
        self.hf_dir = hf_dir

    def has(self, name: str) -> bool:
        return self._stored_name(name) is not None

    def _stored_name(self, name: str) -> str | None:
        for candidate in (name, "transformer." + name, name.removeprefix("transformer.")):
            if candidate in self.files:
                return candidate
        return None

    def __call__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        stored = self._stored_name(name)
        if stored is None:
            raise HFError(f"{self.hf_dir} has no tensor {name} (a model of another architecture, or a damaged file?)")
        with safe_open(self.files[stored], framework="numpy") as f:
            if f.get_slice(stored).get_dtype() == "BF16":  # most released Llama weights
                return np.asarray(read_bfloat16(self.files[stored], stored), dtype=np.float32)
            return np.asarray(f.get_tensor(stored), dtype=np.float32)


def read_bfloat16(file, name: str) -> np.ndarray:
    """One bfloat16 tensor of a safetensors file. numpy has no bfloat16, so safetensors' numpy API refuses it: read
    it by the file's own layout (8 bytes of header length, a JSON header, the data) as ml_dtypes.bfloat16 (jax's)."""
    import ml_dtypes

    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(length))[name]
    start, end = entry["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + length + start, shape=(end - start,))
    return data.view(ml_dtypes.bfloat16).reshape(entry["shape"])


# --------------------------------------------------------------------------------------------------
# The name and layout maps, one layer at a time. Each entry is bigjax sub-path -> a thunk giving the array in
# bigjax's layout (unpadded), so that a parameter is read only when it is placed.


def gpt2_layer(read, i: int, m) -> dict:
    h, hd, d = m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model
    p = f"h.{i}."

    def qkv(which: int, part: str):
        fused = read(p + "attn.c_attn." + part)  # weight [d, 3d] (Conv1D is [in, out]); bias [3d]
        piece = np.split(fused, 3, axis=-1)[which]
        return piece.reshape(*piece.shape[:-1], h, hd)

    layer = {
        "attention/out/kernel": lambda: read(p + "attn.c_proj.weight").reshape(h, hd, d),
        "attention/out/bias": lambda: read(p + "attn.c_proj.bias"),
        "mlp/up/kernel": lambda: read(p + "mlp.c_fc.weight"),
        "mlp/up/bias": lambda: read(p + "mlp.c_fc.bias"),
        "mlp/down/kernel": lambda: read(p + "mlp.c_proj.weight"),
        "mlp/down/bias": lambda: read(p + "mlp.c_proj.bias"),
    }
    for which, name in enumerate(("query", "key", "value")):
        for part, leaf in (("weight", "kernel"), ("bias", "bias")):
            layer[f"attention/{name}/{leaf}"] = lambda w=which, part=part: qkv(w, part)
    for norm, hf_norm in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
        layer[f"{norm}/norm/scale"] = lambda n=hf_norm: read(f"{p}{n}.weight")
        layer[f"{norm}/norm/bias"] = lambda n=hf_norm: read(f"{p}{n}.bias")
    return layer


def gpt2_globals(read, m) -> dict:
    return {
        "embed/embedding": lambda: read("wte.weight"),
        "position_embed/embedding": lambda: read("wpe.weight"),
        "final_norm/norm/scale": lambda: read("ln_f.weight"),
        "final_norm/norm/bias": lambda: read("ln_f.bias"),
        "unembed/kernel": lambda: read("lm_head.weight").T,
    }


def llama_layer(read, i: int, m) -> dict:
    h, kv, hd, d = m.num_heads, m.num_kv_heads or m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model
    p = f"model.layers.{i}."

    def linear(name):  # torch's nn.Linear is [out, in]
        return read(p + name + ".weight").T

    return {
        "attention/query/kernel": lambda: linear("self_attn.q_proj").reshape(d, h, hd),
        "attention/key/kernel": lambda: linear("self_attn.k_proj").reshape(d, kv, hd),
        "attention/value/kernel": lambda: linear("self_attn.v_proj").reshape(d, kv, hd),
        "attention/out/kernel": lambda: linear("self_attn.o_proj").reshape(h, hd, d),
        "mlp/gate/kernel": lambda: linear("mlp.gate_proj"),
        "mlp/up/kernel": lambda: linear("mlp.up_proj"),
        "mlp/down/kernel": lambda: linear("mlp.down_proj"),
        "attention_norm/norm/scale": lambda: read(p + "input_layernorm.weight"),
        "mlp_norm/norm/scale": lambda: read(p + "post_attention_layernorm.weight"),
    }


def llama_globals(read, m) -> dict:
    return {
        "embed/embedding": lambda: read("model.embed_tokens.weight"),
        "final_norm/norm/scale": lambda: read("model.norm.weight"),
        "unembed/kernel": lambda: read("lm_head.weight").T,
    }


def family_maps(m):
    """(layer map, global map) of the model a bigjax model config describes."""
    if m.positions == "learned" and m.norm == "layernorm" and m.mlp == "gelu" and m.use_bias:
        return gpt2_layer, gpt2_globals
    if m.positions == "rope" and m.norm == "rmsnorm" and m.mlp == "swiglu" and not m.use_bias:
        return llama_layer, llama_globals
    raise HFError(
        "this model is neither GPT-2 (learned positions, layernorm, gelu, biases) nor Llama (rope, rmsnorm, "
        "swiglu, no biases); only those two map to Hugging Face"
    )


def host_array(path: str, read, m, shape, dtype) -> np.ndarray:
    """The HF weights of bigjax parameter `path` in bigjax's layout and `shape` (stacked, vocabulary padded)."""
    layer_map, global_map = family_maps(m)
    if path.startswith("layers/"):  # scanned: one array stacked over the layers
        sub = path.removeprefix("layers/")
        array = np.stack([layer_map(read, i, m)[sub]() for i in range(m.num_layers)])
    elif path.startswith("layers_"):  # unrolled: layers_I/...
        index, _, sub = path.removeprefix("layers_").partition("/")
        array = layer_map(read, int(index), m)[sub]()
    else:
        array = global_map(read, m)[path]()
    array = pad_vocab(path, array, shape)
    if array.shape != tuple(shape):
        raise HFError(f"{path}: the weights have shape {array.shape} but the model needs {tuple(shape)}")
    return array.astype(dtype)


def pad_vocab(path: str, array: np.ndarray, shape) -> np.ndarray:
    """Zero rows (embedding) or zero columns (untied head) for the ids bigjax adds up to model.vocab_multiple."""
    axis = {"embed/embedding": 0, "unembed/kernel": 1}.get(path)
    if axis is None or array.shape[axis] >= shape[axis]:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, shape[axis] - array.shape[axis])
    return np.pad(array, widths)


def load_params(hf_dir, model_config, abstract_params, param_shardings) -> dict:
    """The HF weights as bigjax's parameter tree, each array made straight onto its sharding (every device
    receives only its own slice of the host array)."""

    read = TensorReader(hf_dir)
    shardings = by_path(param_shardings)
    loaded = {}
    for path, leaf in by_path(abstract_params).items():
        array = host_array(path, read, model_config, leaf.shape, leaf.dtype)
        loaded[path] = jax.make_array_from_callback(array.shape, shardings[path], lambda index, a=array: a[index])
    return nest(loaded)


# --------------------------------------------------------------------------------------------------
# bigjax -> Hugging Face


def hf_tensors(params: dict, m, hf_vocab: int) -> dict:
    """bigjax parameters (host numpy, by "/" path) -> {HF name: array}, vocabulary cut back to `hf_vocab`."""
    gpt2 = family_maps(m)[0] is gpt2_layer
    h, hd, d = m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model

    def layer(i: int, sub: str) -> np.ndarray:
        return params[f"layers/{sub}"][i] if f"layers/{sub}" in params else params[f"layers_{i}/{sub}"]

    out = {}
    for i in range(m.num_layers):
        if gpt2:
            p = f"transformer.h.{i}."
            q, k, v = (layer(i, f"attention/{n}/kernel").reshape(d, h * hd) for n in ("query", "key", "value"))
            out[p + "attn.c_attn.weight"] = np.concatenate([q, k, v], axis=1)
            biases = (layer(i, f"attention/{n}/bias").reshape(h * hd) for n in ("query", "key", "value"))
            out[p + "attn.c_attn.bias"] = np.concatenate(list(biases))
            out[p + "attn.c_proj.weight"] = layer(i, "attention/out/kernel").reshape(h * hd, d)
            out[p + "attn.c_proj.bias"] = layer(i, "attention/out/bias")
            for name, sub in (("c_fc", "up"), ("c_proj", "down")):
                out[f"{p}mlp.{name}.weight"] = layer(i, f"mlp/{sub}/kernel")
                out[f"{p}mlp.{name}.bias"] = layer(i, f"mlp/{sub}/bias")
            for name, norm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
                out[f"{p}{name}.weight"] = layer(i, f"{norm}/norm/scale")
                out[f"{p}{name}.bias"] = layer(i, f"{norm}/norm/bias")
        else:
            p = f"model.layers.{i}."
            kv = m.num_kv_heads or m.num_heads
            out[p + "self_attn.q_proj.weight"] = layer(i, "attention/query/kernel").reshape(d, h * hd).T
            out[p + "self_attn.k_proj.weight"] = layer(i, "attention/key/kernel").reshape(d, kv * hd).T
            out[p + "self_attn.v_proj.weight"] = layer(i, "attention/value/kernel").reshape(d, kv * hd).T
            out[p + "self_attn.o_proj.weight"] = layer(i, "attention/out/kernel").reshape(h * hd, d).T
            for name in ("gate", "up", "down"):
                out[f"{p}mlp.{name}_proj.weight"] = layer(i, f"mlp/{name}/kernel").T
            out[p + "input_layernorm.weight"] = layer(i, "attention_norm/norm/scale")
            out[p + "post_attention_layernorm.weight"] = layer(i, "mlp_norm/norm/scale")
    prefix = "transformer." if gpt2 else "model."
    out[prefix + ("wte.weight" if gpt2 else "embed_tokens.weight")] = params["embed/embedding"][:hf_vocab]
    if gpt2:
        out["transformer.wpe.weight"] = params["position_embed/embedding"]
        out["transformer.ln_f.weight"] = params["final_norm/norm/scale"]
        out["transformer.ln_f.bias"] = params["final_norm/norm/bias"]
    else:
        out["model.norm.weight"] = params["final_norm/norm/scale"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["unembed/kernel"][:, :hf_vocab].T
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in out.items()}


def hf_config(m, hf_vocab: int, tokenizer) -> dict:
    """config.json for transformers: the architecture bigjax's model config is."""
    gpt2 = family_maps(m)[0] is gpt2_layer
    special = {}
    eos, cls = tokenizer.special_ids["eos"], tokenizer.special_ids["cls"]
    if eos < hf_vocab:  # ids bigjax appended beyond the HF vocabulary are cut off: never name those
        # GPT-2's tokenizer has no separate start token: its bos is its eos (<|endoftext|>), as in the original.
        special = dict(eos_token_id=eos, bos_token_id=cls if cls < hf_vocab else eos)
    if gpt2:
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            vocab_size=hf_vocab,
            n_positions=m.max_len,
            n_embd=m.d_model,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.mlp_dim or 4 * m.d_model,
            activation_function="gelu_new",
            layer_norm_epsilon=m.norm_eps,
            tie_word_embeddings=m.tie_embeddings,
            torch_dtype="float32",
            **special,
        )
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=hf_vocab,
        max_position_embeddings=m.max_len,
        hidden_size=m.d_model,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads,
        intermediate_size=m.mlp_dim,
        hidden_act="silu",
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        rope_parameters=dict(rope_type="default", rope_theta=m.rope_theta),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=m.tie_embeddings,
        torch_dtype="float32",
        **special,
    )


def copy_tokenizer_files(source_dir, dest_dir) -> bool:
    """Copy tokenizer.json (and its config files, where present); True if there was a tokenizer.json."""
    source_dir, dest_dir = pathlib.Path(source_dir), pathlib.Path(dest_dir)
    if not (source_dir / "tokenizer.json").is_file():
        return False
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, dest_dir / name)
    return True


# --------------------------------------------------------------------------------------------------
# `bigjax import` and `bigjax export`


def import_hf(hf_dir, workdir, overrides=()) -> int:
    """Write `workdir` as a run at step 0 of the HF model in `hf_dir`: a committed checkpoint (the imported
    parameters, a fresh optimizer state, the data iterator's start), config.json and the tokenizer. Returns the
    number of parameters. `bigjax train --config WORKDIR/config.json` then resumes it at step 0."""
    from bigjax import checkpoint, data, lock, metrics, paths
    from bigjax import state as state_lib
    from bigjax.setup import make_setup

    config = config_from_hf(hf_dir, overrides)  # every refusal before anything is written
    hf_vocab = read_hf_config(hf_dir)["vocab_size"]
    TensorReader(hf_dir)  # the weights are there, in a form we read
    workdir = paths.workdir(workdir)
    with lock.held(workdir, say=metrics.say):
        if checkpoint.had_checkpoints(workdir):
            raise HFError(f"{workdir} already holds checkpoints; import into a new --workdir")
        if copy_tokenizer_files(hf_dir, workdir) and config.data.tokenizer == "byte":
            config.data.tokenizer = f"hf:{pathlib.Path(workdir).resolve() / 'tokenizer.json'}"
        # A tokenizer lacking a special token bigjax needs (pad, cls, mask) gets it appended after its last id:
        # the model needs rows for those too (zero rows; export cuts back to the HF vocabulary).
        tokenizer = data.make_tokenizer(config.data.tokenizer)
        config.model.vocab_size = max(hf_vocab, tokenizer.vocab_size)
        config_lib.check_values(config)

        setup = make_setup(config)
        params = load_params(hf_dir, config.model, setup.abstract_state.params, setup.state_shardings.params)
        tx = setup.tx
        state = jax.jit(
            lambda p: state_lib.TrainState(
                step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=tx.init(p), model_state={}
            ),
            out_shardings=setup.state_shardings,
            donate_argnums=0,
        )(params)
        data_state = data.train_batches(config).get_state()

        saves = checkpoint.writer(workdir, config.keep_checkpoints)
        saves.save(0, state, data_state, {"nan_skips": 0}, config)
        saves.finish()
        checkpoint.write_config(workdir, config)
        (workdir / SOURCE_FILE).write_text(json.dumps({"source": str(hf_dir), "vocab_size": hf_vocab}, indent=2))
    return state_lib.count_parameters(params)


def export(workdir, out, step: int | None = None) -> int:
    """Write `out` (config.json, model.safetensors, the tokenizer files) from a committed checkpoint of a GPT-family
    causal LM run; returns the step exported. The parameters are restored onto one device."""
    from safetensors.numpy import save_file

    from bigjax import checkpoint, data, paths
    from bigjax.setup import make_setup

    workdir = paths.workdir(workdir)
    config = config_lib.load_saved(workdir)
    if config.model.family != "gpt" or config.task.name != "causal_lm":
        raise HFError(
            f"{workdir} trained a {config.model.family} {config.task.name} model; export takes GPT causal LMs"
        )
    m = config.model
    family_maps(m)  # GPT-2 or Llama, or refused before anything is read
    committed = checkpoint.committed_steps(workdir)
    if not committed or (step is not None and step not in committed):
        raise HFError(f"{workdir}: no committed checkpoint {step if step is not None else ''} (committed: {committed})")
    step = committed[-1] if step is None else step
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise HFError(f"--hf {out} exists and is not empty; export into a new directory")

    config.mesh.update(dict(data=1, fsdp=1, tensor=1))  # one device: the whole model goes to the host anyway
    target = make_setup(config, devices=jax.devices()[:1]).variables_target()
    mngr = checkpoint.manager(workdir, read_only=True)
    restored = checkpoint.restore_variables(mngr, step, target)["params"]
    params = {name: np.asarray(leaf) for name, leaf in by_path(restored).items()}

    source = workdir / SOURCE_FILE
    hf_vocab = json.loads(source.read_text())["vocab_size"] if source.exists() else m.vocab_size
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(params, m, hf_vocab), str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(m, hf_vocab, tokenizer), indent=2))
    kind, path = tokenizer_file(config.data.tokenizer)
    if kind == "hf" and path.name == "tokenizer.json":
        copy_tokenizer_files(path.parent, out)  # with tokenizer_config.json and special_tokens_map.json, if there
    elif kind == "hf":
        shutil.copyfile(path, out / "tokenizer.json")
    return step


def tokenizer_file(spec: str) -> tuple[str, pathlib.Path | None]:
    from bigjax.data import tokenizers

    kind, path = tokenizers.parse_spec(spec)
    return kind, pathlib.Path(path) if path else None


# --------------------------------------------------------------------------------------------------
# init_from.workdir=hf:PATH


def load_selected(params, hf_dir, selected: dict, param_shardings) -> tuple[dict, list[str]]:
    """`params` with the arrays of the "/"-paths in `selected` that the HF model has replaced by its weights (the
    HF model's own layout, from its config.json; the vocabulary padded to this run's). Returns (params, loaded)."""

    hf_model = config_from_hf(hf_dir).model
    read = TensorReader(hf_dir)
    layer_map, global_map = family_maps(hf_model)
    layer_names = set(layer_map(read, 0, hf_model))
    shardings = by_path(param_shardings)

    def available(path: str) -> bool:
        if path == "unembed/kernel" and not read.has("lm_head.weight"):
            return False  # a tied HF model has no output layer of its own
        if path.startswith("layers/") or path.startswith("layers_"):
            return path.partition("/")[2] in layer_names
        return path in global_map(read, hf_model)

    loaded = {}
    for path, leaf in by_path(params).items():
        if selected[path] and available(path):
            array = host_array(path, read, hf_model, leaf.shape, leaf.dtype)
            loaded[path] = jax.make_array_from_callback(array.shape, shardings[path], lambda index, a=array: a[index])
    merged = jax.tree_util.tree_map_with_path(lambda keypath, leaf: loaded.get(param_path(keypath), leaf), params)
    return merged, sorted(loaded)
