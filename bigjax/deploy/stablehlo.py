"""`bigjax export --format stablehlo`: a GPT's KV-cache prefill and decode step as serialized `jax.export`
functions, for serving from JAX without bigjax's model code.

    OUT/prefill.jax_exported       prefill(params, tokens [batch, width] int32, lengths [batch] int32)
                                       -> (logits [batch, vocab] float32 at each row's last token, cache)
    OUT/decode_step.jax_exported   decode_step(params, cache, tokens [batch, 1] int32, positions [batch, 1] int32)
                                       -> (logits [batch, vocab] float32, cache)
    OUT/params.npz                 the parameters, float32, one array per "/"-joined path (params.nest rebuilds
                                   the tree; the functions cast them to the model's parameter dtype)
    OUT/manifest.json              shapes, the cache's layout, the platforms, the tokenizer and its special ids
    OUT/tokenizer.*                the run's tokenizer file, when it has one

    served = load("OUT")                                        # jax + numpy; no bigjax model code
    new_ids = greedy(served, [[72, 105, 33]], max_new_tokens=20)

These are the very functions `bigjax generate` compiles (bigjax.generate: the same model in decode mode, the same
cache, the same right-padded prompts), with the cache sized to the model's whole context (max_len columns), the
batch and the prefill's width symbolic (any batch; any width up to max_len), lowered for --platforms (default cpu
and cuda). Column c of a row's cache holds its token at position c: a decode step writes each row's token at its
own position and attends to the columns before it. The parameters are an input rather than constants: the
artifacts stay small (kilobytes), and new weights of the same shapes need no new export.

`greedy` below is the reference loop a server would run: it picks the tokens `bigjax generate --temperature 0`
picks (the test checks it token for token), within max_len; bigjax generate goes on past it by prefilling again.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.params import by_path, nest

PREFILL_FILE, DECODE_STEP_FILE, PARAMS_FILE = "prefill.jax_exported", "decode_step.jax_exported", "params.npz"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_serializer() -> None:
    """`jax.export` serializes through flatbuffers, which jax leaves optional: a DeployError naming the extra that
    installs it, said before anything is read or written."""
    from bigjax.deploy.common import INSTALL_DEPLOY, DeployError

    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        raise DeployError(
            f"--format stablehlo needs flatbuffers: {INSTALL_DEPLOY} (jax.export serializes with it)"
        ) from None


def export(config, run, step: int, out: pathlib.Path, platforms=("cpu", "cuda")) -> dict:
    """Write the two functions and the parameters of checkpoint `step` into `out`; returns manifest.json's content."""
    from bigjax import data, generate
    from bigjax.data import tokenizers
    from bigjax.deploy.common import DeployError, restore_on_one_device

    platforms = tuple(platforms or ("cpu", "cuda"))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise DeployError(f"--platforms {','.join(unknown)}: choose among {', '.join(PLATFORMS)}")
    setup, variables = restore_on_one_device(config, run, step)
    params = variables["params"]
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    generator = generate.Generator(setup.task.model_config, params, tokenizer)
    columns = context = setup.task.model_config.max_len

    def in_model_dtypes(stored):
        return jax.tree.map(lambda array, like: array.astype(like.dtype), stored, params)

    # Generator's own (uncompiled) prefill and step: what `bigjax generate` runs.
    def prefill(stored, tokens, lengths):
        return generator._prefill(in_model_dtypes(stored), tokens, lengths, columns)

    def decode_step(stored, cache, tokens, positions):
        return generator._step(in_model_dtypes(stored), cache, tokens[:, 0], positions[:, 0])

    stored = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
    batch, width = jax.export.symbolic_shape("batch, width", constraints=(f"width <= {context}",))
    exported_prefill = jax.export.export(jax.jit(prefill), platforms=platforms)(
        stored, jax.ShapeDtypeStruct((batch, width), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)
    )
    batch = jax.export.symbolic_shape("batch")[0]  # a scope of its own: the step has no width
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    cache = jax.eval_shape(prefill, stored, one, jax.ShapeDtypeStruct((batch,), jnp.int32))[1]
    exported_step = jax.export.export(jax.jit(decode_step), platforms=platforms)(stored, cache, one, one)

    (out / PREFILL_FILE).write_bytes(exported_prefill.serialize())
    (out / DECODE_STEP_FILE).write_bytes(exported_step.serialize())
    np.savez(out / PARAMS_FILE, **{path: np.asarray(a, np.float32) for path, a in by_path(params).items()})
    kind, path = tokenizers.parse_spec(config.data.tokenizer)
    tokenizer_file = None
    if kind != "byte":
        tokenizer_file = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
        shutil.copyfile(path, out / tokenizer_file)

    shape = lambda array: [str(d) for d in array.shape]
    return {
        "format": "stablehlo",
        "files": {"prefill": PREFILL_FILE, "decode_step": DECODE_STEP_FILE, "params": PARAMS_FILE},
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported_prefill.calling_convention_version,
        "prefill": {
            "inputs": ["params", "tokens [batch, width] int32 (right-padded)", "lengths [batch] int32"],
            "outputs": ["logits [batch, vocab] float32, at each row's last token", "cache"],
            "width": f"1..{context}",
        },
        "decode_step": {
            "inputs": ["params", "cache", "tokens [batch, 1] int32", "positions [batch, 1] int32 (cache columns)"],
            "outputs": ["logits [batch, vocab] float32", "cache"],
        },
        "cache": {path: {"shape": shape(a), "dtype": str(a.dtype)} for path, a in by_path(cache).items()},
        "cache_columns": columns,
        "model_vocab_size": setup.task.model_config.vocab_size,  # padded; ids from samplable_vocab_size on never
        "compute_dtype": setup.task.model_config.dtype,
        "param_dtype": setup.task.model_config.param_dtype,
        "tokenizer": {
            "kind": kind,
            "file": tokenizer_file,
            "samplable_vocab_size": tokenizer.vocab_size,
            "special_ids": dict(tokenizer.special_ids),
            "never_sample": [tokenizer.special_ids[name] for name in ("pad", "cls", "mask")],
            "stop": tokenizer.special_ids["eos"],
        },
    }


# --------------------------------------------------------------------------------------------------
# Serving side: what a JAX server needs, and nothing of bigjax's models


@dataclasses.dataclass(frozen=True)
class Served:
    prefill: jax.export.Exported
    decode_step: jax.export.Exported
    params: dict
    manifest: dict


def load(directory) -> Served:
    """The exported functions, their parameters and the manifest of an `--format stablehlo` directory."""
    directory = pathlib.Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    read = lambda name: jax.export.deserialize(bytearray((directory / manifest["files"][name]).read_bytes()))
    with np.load(directory / manifest["files"]["params"]) as arrays:
        params = nest({path: arrays[path] for path in arrays.files})
    return Served(read("prefill"), read("decode_step"), params, manifest)


def greedy(served: Served, prompts, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's new token ids, greedily, until its stop token (left out) or max_new_tokens; a row stops too
    once its text fills the cache (manifest cache_columns)."""
    m = served.manifest
    columns, tokenizer = m["cache_columns"], m["tokenizer"]
    samplable = np.arange(m["model_vocab_size"]) < tokenizer["samplable_vocab_size"]
    samplable[tokenizer["never_sample"]] = False
    prefill, step = jax.jit(served.prefill.call), jax.jit(served.decode_step.call)

    lengths = np.array([len(prompt) for prompt in prompts], np.int32)
    # Any width up to the columns works; the one `bigjax generate` pads to gives the same sums, so the same tokens.
    width = min(columns, max(16, 1 << (int(lengths.max()) - 1).bit_length()))
    tokens = np.full((len(prompts), width), tokenizer["special_ids"]["pad"], np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    logits, cache = prefill(served.params, tokens, lengths)

    new_ids = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    positions = lengths.copy()  # where each row's next token goes in
    for i in range(max_new_tokens):
        new = np.asarray(jnp.argmax(jnp.where(samplable, logits, -jnp.inf), axis=-1), np.int32)
        for row, token in enumerate(new.tolist()):
            if not done[row]:
                done[row] = token == tokenizer["stop"]
                if not done[row]:
                    new_ids[row].append(token)
                    done[row] = positions[row] + 1 > columns  # its newest token has no column left
        if done.all() or i + 1 == max_new_tokens:
            break
        at = np.minimum(positions, columns - 1)  # a finished row stands still, at a column that exists
        logits, cache = step(served.params, cache, new[:, None], at[:, None])
        positions = np.where(done, positions, positions + 1)
    return new_ids
