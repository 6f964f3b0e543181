"""Experiment configs: load `experiments/NAME.py[:ARG]`, apply `--config.a.b=VALUE`, validate, dump.

Every experiment starts from `defaults()`, the one schema of every key bigjax knows. Anything that is not
in the schema — in an experiment file or on the command line — is a typo, and is reported as one before
anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
import re
import traceback
from typing import Any

import ml_collections

from bigjax import families, paths
from bigjax.errors import UserError


class ConfigError(UserError):
    """A user error in an experiment or its overrides: printed as one line, no traceback."""


# Logical axis name -> mesh axes. Parameters use the short names, activations the `activation_*` ones,
# so a mesh axis (fsdp) can shard a weight's embed dim and, at the same time, an activation's batch dim.
DEFAULT_SHARDING_RULES = (
    ("activation_batch", ("data", "fsdp", "expert")),  # expert parallelism is data parallelism outside the experts
    ("activation_length", "context"),  # the sequence, split over context (bigjax.parallel.context)
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    # The stacked layers of a scanned stack, in consecutive blocks over the pipeline's stages (bigjax.parallel.pipeline)
    ("layers", "stage"),
    ("experts", "expert"),  # a MoE layer's experts, split over the expert axis (bigjax.models.moe)
    ("positions", None),
    ("classes", None),  # classifier heads are small: kept whole
    # Convolutions (see bigjax/models/layers.py): FSDP splits kernels by output channel; activations keep channels
    # whole, so convolutions run data-parallel.
    ("activation_conv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def defaults(model: str = families.DEFAULT_FAMILY, task: str = families.DEFAULT_TASK) -> ml_collections.ConfigDict:
    """Every key an experiment may set, with its default. Experiments start from here."""
    if model not in families.FAMILIES:
        raise ConfigError(f"unknown model family {model!r}; known: {', '.join(families.FAMILIES)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 32  # global, across all devices and hosts
    c.log_every = 50
    c.checkpoint_every = 500  # 0 = only at the end
    c.keep_checkpoints = 3
    c.eval_every = 0  # 0 = no inline eval (the separate `bigjax eval` job still works)
    c.eval_batches = 8
    c.nan_policy = "stop"  # stop | skip: a NaN/Inf loss or gradient norm stops the run, or skips that update
    c.max_nan_skips = 10  # nan_policy=skip: stop once more steps than this were skipped in the whole run
    # JAX's persistent compilation cache (bigjax.run.compilation_cache): "" = JAX_COMPILATION_CACHE_DIR if set, else
    # WORKDIR/compilation_cache (generate: ~/.cache/bigjax/jax); "off"; or a directory (a bucket URL too)
    c.compilation_cache = ""
    # Where metrics go besides metrics.jsonl (always written), several at once (bigjax.ops.trackers, docs/tracking.md):
    # "tensorboard" (events in the workdir), "wandb" (pip install 'bigjax[wandb]'), "mlflow" ('bigjax[mlflow]')
    c.trackers = ("tensorboard",)
    c.wandb = ml_collections.ConfigDict(
        dict(
            project="bigjax",
            entity="",  # "" = your default entity
            name="",  # the run's name; "" = the workdir's
            mode="",  # online | offline | shared (several processes writing at once); "" = $WANDB_MODE, else online
        )
    )
    c.mlflow = ml_collections.ConfigDict(
        dict(
            tracking_uri="",  # "" = a local store in the workdir, sqlite:///WORKDIR/mlflow.db; or a tracking server
            experiment="bigjax",
            name="",  # the run's name; "" = the workdir's
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1, expert=1, stage=1))
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.task = ml_collections.ConfigDict(
        dict(
            name=task,  # causal_lm | masked_lm | classification
            num_classes=0,  # classification
            label_smoothing=0.0,  # classification
            mask_rate=0.15,  # masked_lm: fraction of tokens chosen for prediction (80% masked, 10% random, 10% kept)
            # causal_lm: the loss over this many positions at a time, so that the full [batch, length, vocab] logits
            # are never made (less memory, one more output matmul); must divide data.seq_len; 0 = all at once
            loss_chunk=0,
        )
    )
    c.model = ml_collections.ConfigDict(families.FAMILIES[model].defaults())

    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | adam | sgd | adagrad | rmsprop | adafactor | lion
            lr=1e-3,
            schedule="cosine",  # constant | cosine | linear | wsd
            warmup_steps=100,
            min_lr_ratio=0.1,
            decay_fraction=0.2,  # wsd: the last fraction of the run decays
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.1,
            decay_embeddings=False,
            clip=1.0,  # global-norm clipping; 0 = off
            grad_accum=1,  # microbatches per step, accumulated inside the jitted step
            l1_penalty=0.0,  # adds l1 * sum|w| to the loss of the decayed (kernel) weights; 0 = off
            l2_penalty=0.0,  # adds l2/2 * sum w^2 likewise (a loss term, unlike adamw's decoupled weight_decay)
            mu_dtype="float32",  # adamw | adam | lion: dtype of the first moment; bfloat16 saves 2 bytes/parameter
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            # shakespeare | shakespeare_genre | digits | synthetic (bundled) | text:PATH | jsonl:PATH |
            # parquet:PATH | arrow:PATH | imagefolder:PATH | tfds:NAME[/CONFIG]  (see bigjax.data.sources)
            source="shakespeare",
            train_split="train",  # tfds split syntax for tfds sources, e.g. "train[:95%]"; a DatasetDict's split
            eval_split="",  # "" = the source's own: "eval" (bundled, local), "validation" or "test" (tfds, arrow:)
            data_dir="",  # tfds: where prepared datasets live ("" = tfds's default, ~/tensorflow_datasets)
            cache_dir="",  # tokenized caches of `bigjax data prepare` ("" = ~/.cache/bigjax/tokenized)
            tokenizer="byte",  # byte | sentencepiece:PATH | hf:PATH (or a PATH ending in .model / .json)
            seq_len=128,
            prefetch=2,  # training batches copied to the devices this many steps ahead (0 = just in time)
            eval_fraction=0.1,  # bundled and local sources: the last fraction of every play/file/class is eval
            text_field="text",  # JSONL, Parquet, Arrow and tfds: the field/column/feature that holds the text
            label_field="label",  # JSONL, Parquet, Arrow and tfds: the one that holds the class
            image_field="image",  # tfds: the feature that holds the image
            text_records="auto",  # auto | document | paragraph | line: what one text example is
            skip_bad=False,  # skip (and count) undecodable images and bad JSONL lines instead of stopping
            max_segments=8,  # text classification: most examples packed into one row
            # causal LM with mesh.context > 1: each sequence in zig-zag order, so that every device of the context
            # axis has as much causal attention to do (bigjax.parallel.context); positions travel with the tokens
            context_load_balance=True,
            image_size=0,  # images: height = width after resizing; 0 = as stored
            channels=3,  # images: 1 (grey) or 3 (RGB)
            crop_padding=0,  # images, training: reflect-pad by this many pixels, then crop at random; 0 = off
            random_flip=False,  # images, training: flip left-right with probability 1/2
            image_mean=(0.5,),  # images: (x / 255 - mean) / std, one value or one per channel
            image_std=(0.5,),
        )
    )

    # Fine-tuning and transfer (bigjax.run.finetune).
    c.init_from = ml_collections.ConfigDict(
        dict(
            workdir="",  # another run's workdir whose parameters start this run; "" = train from scratch
            step=0,  # its checkpoint to load; 0 = the newest
            include=".*",  # regex (re.search) over "/"-joined parameter paths, e.g. "layers/attention/query/kernel"
            exclude="",  # regex of paths not to load (they keep their fresh initialization); "" = none
        )
    )
    # Distillation (bigjax.compress.distill): a teacher run's soft targets besides the data's hard ones.
    c.distill = ml_collections.ConfigDict(
        dict(
            teacher="",  # another run's workdir whose model teaches this one (same task and vocabulary); "" = off
            step=0,  # its checkpoint; 0 = its newest when this run starts (then kept: a resume uses the same one)
            temperature=1.0,  # T: both distributions are softmax(logits / T); the soft loss is scaled by T^2
            alpha=0.5,  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * the task's own loss
        )
    )
    c.freeze = ""  # regex over parameter paths: those stay bit-identical and get no optimizer state; "" = none
    # Magnitude pruning during training (bigjax.compress.prune): unstructured to a sparsity target on Zhu & Gupta's
    # schedule,
    # or 2:4 for sparse tensor cores. Steps count optimizer updates; masks are kept in the optimizer state.
    c.prune = ml_collections.ConfigDict(
        dict(
            kind="none",  # none | unstructured | 2:4
            sparsity=0.5,  # unstructured: the fraction of each pruned kernel (each layer of it) that is zero at the end
            start_step=0,  # the first mask update (2:4: the one pruning)
            end_step=0,  # the last: the sparsity reaches its target here (cubic ramp from start_step); < total_steps
            every=100,  # masks are recomputed every this many steps between start_step and end_step
            include="kernel$",  # regex (re.search) over parameter paths: the kernels of every Dense/Einsum/Conv
            exclude="",  # regex of paths never pruned, e.g. "unembed|head"; "" = none
        )
    )
    # The eval job (`bigjax eval`) scores the checkpoints it evaluates on EleutherAI lm-evaluation-harness tasks too
    # (bigjax.eval.harness; causal LMs, with the [eval] extra), logged beside the loss as harness/TASK/METRIC.
    c.eval = ml_collections.ConfigDict(
        dict(
            harness=ml_collections.ConfigDict(
                dict(
                    tasks="",  # "T1,T2": lm-eval's task names, or those of your YAMLs (include_path); "" = off
                    include_path="",  # a directory of task YAML files of your own; "" = none
                    limit=0,  # at most this many documents a task; 0 = all of them
                    num_fewshot=-1,  # examples in each prompt; -1 = each task's own
                    every=0,  # score the checkpoints whose step is a multiple of this, and the final one; 0 = all
                    batch_size=16,  # rows scored in one step (rounded up to a multiple of the data-parallel devices)
                )
            )
        )
    )
    c.early_stopping = ml_collections.ConfigDict(
        dict(
            metric="",  # an inline-eval metric, e.g. "accuracy" or "loss"; "" = off (needs eval_every > 0)
            mode="max",  # max | min: which way is better
            patience=5,  # stop after this many evaluations without improvement
        )
    )
    # Quantized weights (bigjax.compress.quantized, through Qwix). `bigjax quantize` writes a workdir with bits set;
    # eval, generate and bench then run its integer weights. 0 = off: float weights, the model as it always was.
    c.quant = ml_collections.ConfigDict(
        dict(
            bits=0,  # 0 (off) | 8: int8 kernels, one scale per output channel | 4: int4 kernels, sub-channel scales
            mode="weight_only",  # weight_only | dynamic: also the activations into int8, per token, at run time
            sub_channel=32,  # bits=4: one scale per this many input channels of a kernel; must divide them
            qat=False,  # True: quantization-aware training: float weights trained through the integer rounding
        )
    )
    # Low-rank adapters (bigjax.compress.lora, through Qwix): the base weights frozen, a trained rank-r update
    # beside each
    # targeted kernel. With quant.bits as well, the base is held as integers (QLoRA). rank 0 = off.
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=0,  # r: the adapters' inner size; 0 = off
            alpha=16.0,  # the update is (alpha / rank) * x A B
            targets=".*",  # regex (re.search) over quantizable matmuls' module paths, e.g. "attention/(query|value)"
            dropout=0.0,  # on the adapters' input, in training
            train="^(classifier|head|pooler)/",  # regex over parameter paths trained whole besides the adapters
            adapters="",  # a directory of `bigjax lora save`: a run starting from scratch starts from these adapters
        )
    )
    return c


NAN_POLICIES = ("stop", "skip")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # config.trackers: what each is, in bigjax.ops.trackers
# Meant as a switch, not a directory: config.compilation_cache takes "off" ("" is the default).
SWITCH_WORDS = ("on", "true", "yes", "1", "false", "no", "none", "0", "disable", "disabled")
# Switches whose default None means "as model.use_bias": True, False or None.
BIAS_SWITCHES = ("qkv_bias", "out_bias", "mlp_bias")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
FIRST_MOMENT_OPTIMIZERS = ("adamw", "adam", "lion")  # the optax optimizers with a `mu_dtype`

# Keys with a closed set of values. A model key is checked only where the family has it.
CHOICES = {
    "task.name": ("causal_lm", "masked_lm", "classification"),
    "model.positions": ("learned", "rope"),
    "model.norm_position": ("post", "pre"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu"),
    "model.norm_variance": ("one_pass", "two_pass"),
    "model.conv_padding": ("same", "symmetric"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn", "auto"),
    "model.context_parallel": ("all_gather", "ring"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.pooling": ("cls", "gap"),
    "model.position_embedding": ("learned", "sincos2d"),
    "model.normalization": ("batchnorm", "groupnorm", "none"),
    "model.stem": ("imagenet", "cifar"),
    "model.depth": (10, 18, 34, 50, 101, 152),
    "optim.name": ("adamw", "adam", "sgd", "adagrad", "rmsprop", "adafactor", "lion"),
    "optim.schedule": ("constant", "cosine", "linear", "wsd"),
    "optim.mu_dtype": ("float32", "bfloat16"),
    "data.text_records": ("auto", "document", "paragraph", "line"),
    "early_stopping.mode": ("max", "min"),
    "prune.kind": ("none", "unstructured", "2:4"),
    "quant.bits": (0, 8, 4),
    "quant.mode": ("weight_only", "dynamic"),
    "wandb.mode": ("", "online", "offline", "shared"),
}


# --------------------------------------------------------------------------------------------------
# Loading


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """`experiments/x.py[:arg]` + `--config.a.b=v` overrides -> a validated config."""
    config = load_experiment(spec)
    check_schema(config, schema_for(config))
    for override in overrides:
        apply_override(config, override)
    check_values(config)
    return config


def load_experiment(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found; pass --config experiments/NAME.py[:ARG]")
    if file.suffix == ".json":  # a config a workdir saved (e.g. one `bigjax import` wrote): train on from it
        try:
            return from_json(file.read_text())
        except ValueError as error:
            raise ConfigError(f"{path} is not valid JSON ({error})") from None
    module_spec = importlib.util.spec_from_file_location(f"bigjax_experiment_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    _run_experiment_code(path, lambda: module_spec.loader.exec_module(module))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg=None) function")
    config = _run_experiment_code(path, lambda: module.get_config(arg or None))
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def _run_experiment_code(path: str, run):
    """run(), with a mistake in the experiment file turned into a ConfigError: which file and line, then the
    traceback frames inside that file alone (bigjax's and importlib's say nothing about the mistake)."""
    try:
        return run()
    except ConfigError:
        raise  # already a message for the user (from parse_arg, defaults, a nested load_experiment)
    except SyntaxError as error:
        where = error.filename or path
        code = (error.text or "").strip()
        raise ConfigError(
            f'{where} line {error.lineno}: SyntaxError: {error.msg}\n  File "{where}", line {error.lineno}\n    {code}'
        ) from None
    except Exception as error:
        own = [frame for frame in traceback.extract_tb(error.__traceback__) if _same_file(frame.filename, path)]
        line = own[-1].lineno if own else "?"
        frames = [
            f'  File "{path}", line {frame.lineno}, in {frame.name}\n    {(frame.line or "").strip()}' for frame in own
        ]
        raise ConfigError("\n".join([f"{path} line {line}: {type(error).__name__}: {error}", *frames])) from None


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


CONFIG_FILE = "config.json"  # WORKDIR/config.json: the resolved config of the run there (bigjax.run.workdir)


def load_saved(workdir, overrides: list[str] = (), alternative: str = "") -> ml_collections.ConfigDict:
    """The config a run saved in WORKDIR/config.json: read, parsed, upgraded (see `from_dict`) and validated, then
    `overrides` applied and checked. `alternative` is appended to the fix a missing or bad file's error names.
    The file is only read: a bad one is reported, never replaced."""
    path = paths.workdir(workdir) / CONFIG_FILE
    rewrite = f"`bigjax train --config EXPERIMENT --workdir {workdir}` writes it again when it resumes{alternative}"
    if not path.exists():
        raise ConfigError(f"{path} not found: no run has saved its config in {workdir}; train there first{alternative}")
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error})") from None
    try:
        saved = json.loads(text)  # bytes: text that is not UTF-8 is a ValueError here too
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); {rewrite}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds a {type(saved).__name__}, not a config object; {rewrite}")
    try:
        config = from_dict(saved)
        check_values(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}; {rewrite}") from None
    for override in overrides:
        apply_override(config, override)
    check_values(config)
    return config


def from_json(text: str) -> ml_collections.ConfigDict:
    """The inverse of `to_json`: rebuild a config written to a workdir."""
    return from_dict(json.loads(text))


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """A config from its dict form. Keys added to bigjax since it was written take their defaults, so that the
    workdirs of older runs still evaluate and generate; a key bigjax does not know is still an error."""
    family, task_name = families.family_and_task(d.get("model"), d.get("task"))
    base = defaults(model=family, task=task_name).to_dict() if _is_family(family) else {}
    config = ml_collections.ConfigDict(_merged(base, d))
    check_schema(config, schema_for(config))
    return config


def _merged(base: dict, saved: dict) -> dict:
    """`saved` over `base`, recursively: saved values win, keys only in `base` are filled in."""
    out = dict(base)
    for key, value in saved.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if both_dicts else value
    return out


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def parse_arg(arg: str | None, **defaults_) -> dict:
    """Experiment-file helper: "seq=2048,layers=24" -> dict, values parsed as Python literals."""
    result = dict(defaults_)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config argument {item!r} is not KEY=VALUE")
        if key not in result:
            raise ConfigError(f"unknown config argument {key!r}; known: {', '.join(sorted(result))}")
        result[key] = _literal(value)
    return result


# --------------------------------------------------------------------------------------------------
# Overrides


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply `--config.a.b=VALUE` (or `config.a.b=VALUE`), parsing VALUE as the key's type."""
    text = override.removeprefix("--")
    if not text.startswith("config.") or "=" not in text:
        raise ConfigError(f"cannot parse {override!r}; overrides look like --config.optim.lr=3e-4")
    dotted, value = text[len("config.") :].split("=", 1)
    parent, leaf = _lookup_parent(config, dotted)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"config.{dotted} is a group; set one of its keys, e.g. config.{dotted}.{next(iter(current.keys()))}"
        )
    if leaf in BIAS_SWITCHES and dotted.startswith("model."):
        parent[leaf] = _parse_switch(value, dotted)
    else:
        parent[leaf] = _parse_as(value, current, dotted)


def _parse_switch(value: str, dotted: str) -> bool | None:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "none": None, "null": None}
    if value.lower() not in words:
        raise ConfigError(f"config.{dotted}={value!r} is not True, False or None (None = as model.use_bias)")
    return words[value.lower()]


def _lookup_parent(config, dotted: str):
    keys = dotted.split(".")
    node = config
    for depth, key in enumerate(keys):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            prefix = ".".join(keys[:depth])
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key config.{dotted}{_did_you_mean(key, known, prefix)}")
        if depth == len(keys) - 1:
            return node, key
        node = node[key]


def _parse_as(value: str, current: Any, dotted: str):
    expected = type(current)
    try:
        if isinstance(current, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, str):
            return value
        parsed = _literal(value)
        if isinstance(parsed, str) and isinstance(current, (list, tuple)) and all(isinstance(x, str) for x in current):
            return [word.strip() for word in parsed.split(",") if word.strip()]  # a list of names: a,b,c
        if current is not None and not isinstance(
            parsed, (list, tuple) if isinstance(current, (list, tuple)) else expected
        ):
            raise ValueError
        return parsed
    except ValueError:
        raise ConfigError(
            f"config.{dotted}={value!r} is not a valid {expected.__name__} (the current value is {current!r})"
        ) from None


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _did_you_mean(key: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    where = f"config.{prefix}." if prefix else "config."
    if close:
        return f"; did you mean {where}{close[0]}?"
    return f"; known keys here: {', '.join(sorted(known))}"


# --------------------------------------------------------------------------------------------------
# Validation


def schema_for(config) -> ml_collections.ConfigDict:
    """The defaults of the config's model family: the keys it may and must have."""
    family, task_name = families.family_and_task(config.get("model"), config.get("task"))
    return defaults(model=known_family(family, task_name).name)


def known_family(name: str, task: str) -> families.Family:
    """The family of that name from the table, or an error saying which families the task can use."""
    if not _is_family(name):
        raise ConfigError(
            f"config.model.family={name!r} is not a model family (known: {', '.join(families.FAMILIES)}); "
            f"for task.name={task!r} use: {', '.join(families.serving(task)) or 'none'}"
        )
    return families.FAMILIES[name]


def _is_family(name) -> bool:
    return isinstance(name, str) and name in families.FAMILIES


def check_family(config) -> None:
    """The family serves the task, and config.model holds that family's keys (an override of model.family alone
    would leave the other family's keys behind)."""
    name, task = config.model.get("family", families.DEFAULT_FAMILY), config.task.name
    family = known_family(name, task)
    if task not in family.tasks:
        raise ConfigError(
            f"config.model.family={name!r} does not serve task.name={task!r} ({name} serves "
            f"{', '.join(family.tasks)}); families for {task}: {', '.join(families.serving(task))}"
        )
    differ = sorted(set(config.model.keys()) ^ set(family.defaults()))
    if differ:
        raise ConfigError(
            f"config.model.family={name!r}, but config.model has another family's keys ({', '.join(differ)}); "
            f"a family's keys come from defaults(model={name!r}, task=...) in the experiment file, not from an override"
        )


def check_schema(config, schema, prefix: str = "") -> None:
    """Every key in `config` must exist in `schema` with a compatible type."""
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config key config.{dotted}{_did_you_mean(key, schema.keys(), prefix.rstrip('.'))}"
            )
        expected = schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{dotted} must be a group of keys, got {value!r}")
            check_schema(value, expected, f"{dotted}.")
        elif not _same_kind(value, expected):
            kind = "True, False or None" if expected is None else type(expected).__name__
            raise ConfigError(f"config.{dotted} must be {kind} (like the default {expected!r}), got {value!r}")
    for key in schema.keys():
        if key not in config:
            raise ConfigError(
                f"config.{prefix}{key} is missing; start experiments from bigjax.config.defaults(model=...)"
            )


def _same_kind(value, expected) -> bool:
    if expected is None:  # a switch whose None means "derived from another key" (BIAS_SWITCHES)
        return value is None or isinstance(value, bool)
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    if isinstance(expected, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(expected))


def check_values(config) -> None:
    """Values that are well typed but cannot work: one message each, naming the key and the fix."""
    for dotted, allowed in CHOICES.items():
        group, key = dotted.split(".")
        if key in config[group] and config[group][key] not in allowed:
            raise ConfigError(f"config.{dotted}={config[group][key]!r} is not one of {', '.join(map(str, allowed))}")
    check_family(config)
    check_sizes(config)
    if config.compilation_cache.lower() in SWITCH_WORDS:
        raise ConfigError(
            f"config.compilation_cache={config.compilation_cache!r} would be a directory of that name; use 'off' for "
            "no cache, '' for the default place, or a directory"
        )
    check_trackers(config.trackers)
    if config.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"config.nan_policy={config.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
    check_model(config)
    if config.batch_size % config.optim.grad_accum:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by config.optim.grad_accum="
            f"{config.optim.grad_accum}; each microbatch must be the same size"
        )
    if config.optim.mu_dtype != "float32" and config.optim.name not in FIRST_MOMENT_OPTIMIZERS:
        raise ConfigError(
            f"config.optim.mu_dtype={config.optim.mu_dtype!r} applies to {', '.join(FIRST_MOMENT_OPTIMIZERS)}, not "
            f"config.optim.name={config.optim.name!r}; leave mu_dtype at 'float32' or change the optimizer"
        )
    if not 0 < config.data.eval_fraction < 1:
        raise ConfigError(f"config.data.eval_fraction must be in (0, 1), got {config.data.eval_fraction}")
    if not 0 < config.task.mask_rate < 1:
        raise ConfigError(f"config.task.mask_rate must be in (0, 1), got {config.task.mask_rate}")
    check_loss_chunk(config)
    check_finetuning(config)
    check_pruning(config.prune)
    check_distill(config)
    check_quantization(config.quant)
    check_lora(config)
    check_moe_compressions(config)


def check_trackers(trackers) -> None:
    unknown = [name for name in trackers if name not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"config.trackers has {', '.join(map(repr, unknown))}, which bigjax does not know; the trackers are "
            f"{', '.join(TRACKERS)} (several at once, e.g. --config.trackers=tensorboard,wandb; metrics.jsonl is "
            "always written)"
        )


# Sizes and counts, checked before anything divides by them or builds an array of them. A model key is checked
# only where the family has it.
POSITIVE_SIZES = (
    "total_steps",
    "batch_size",
    "log_every",
    "eval_batches",
    "keep_checkpoints",
    "data.seq_len",
    "data.max_segments",
    "optim.grad_accum",
    "early_stopping.patience",
    "model.num_layers",
    "model.d_model",
    "model.num_heads",
    "model.vocab_size",
    "model.max_len",
    "model.vocab_multiple",
    "model.patch_size",
    "model.width",
    "model.hidden_dim",
    "model.norm_groups",
    "quant.sub_channel",
    "eval.harness.batch_size",
)
# The sizes for which 0 means something (said in the message), and a negative number nothing.
NON_NEGATIVE_SIZES = {
    "checkpoint_every": "only at the end",
    "eval_every": "no inline eval",
    "max_nan_skips": "stop at the first skipped step",
    "data.prefetch": "just in time",
    "data.image_size": "as stored",
    "data.crop_padding": "no random crops",
    "task.loss_chunk": "no chunking",
    "optim.warmup_steps": "no warmup",
    "init_from.step": "the newest",
    "eval.harness.limit": "every document",
    "eval.harness.every": "every checkpoint evaluated",
    "distill.step": "the newest",
    "model.num_kv_heads": "num_heads",
    "model.head_dim": "d_model // num_heads",
    "model.mlp_dim": "derived from d_model",
    "model.type_vocab_size": "no token types",
}


def check_sizes(config) -> None:
    for dotted in POSITIVE_SIZES:
        value = _get(config, dotted)
        if value is not None and value <= 0:
            raise ConfigError(f"config.{dotted} must be a positive integer, got {value}")
    for dotted, zero_means in NON_NEGATIVE_SIZES.items():
        value = _get(config, dotted)
        if value is not None and value < 0:
            raise ConfigError(f"config.{dotted} must be >= 0 (0 = {zero_means}), got {value}")
    features = config.model.get("features")
    if features is not None and not all(isinstance(f, int) and f > 0 for f in features):
        raise ConfigError(f"config.model.features must be positive integers, got {tuple(features)}")


def _get(config, dotted: str):
    """The value at `dotted`, or None where the config has no such key (a model key of another family)."""
    group, _, key = dotted.rpartition(".")
    node = config[group] if group else config
    return node.get(key)


def check_loss_chunk(config) -> None:
    """The chunked cross-entropy cuts the causal LM's sequence into equal pieces."""
    chunk, seq_len = config.task.loss_chunk, config.data.seq_len
    if chunk and config.task.name != "causal_lm":
        raise ConfigError(
            f"config.task.loss_chunk={chunk} applies to task.name='causal_lm', not {config.task.name!r}; set it to 0"
        )
    if chunk and seq_len % chunk:
        divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0 and d < seq_len][-3:]
        raise ConfigError(
            f"config.task.loss_chunk={chunk} does not divide config.data.seq_len={seq_len}; the loss is taken in "
            f"equal pieces of the sequence: use a divisor of {seq_len} (e.g. {', '.join(map(str, divisors))}) or 0"
        )


def check_finetuning(config) -> None:
    """Fine-tuning keys: patterns that compile, early stopping that has evaluations to watch."""
    for dotted in ("init_from.include", "init_from.exclude", "freeze"):
        group, _, key = dotted.rpartition(".")
        pattern = config[group][key] if group else config[key]
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"config.{dotted}={pattern!r} is not a valid regular expression: {error}") from None
    stopping = config.early_stopping
    if stopping.metric and not config.eval_every:
        raise ConfigError(
            f"config.early_stopping.metric={stopping.metric!r} watches the inline evaluation, which is off; "
            "set config.eval_every"
        )
    for key in ("l1_penalty", "l2_penalty"):
        if config.optim[key] < 0:
            raise ConfigError(f"config.optim.{key} must be >= 0 (0 turns it off), got {config.optim[key]}")


def check_pruning(p) -> None:
    """What is wrong with config.prune on its own; bigjax.compress.prune checks it against the model's parameters."""
    for key in ("include", "exclude"):
        try:
            re.compile(p[key])
        except re.error as error:
            raise ConfigError(f"config.prune.{key}={p[key]!r} is not a valid regular expression: {error}") from None
    if not 0 <= p.sparsity < 1:
        raise ConfigError(f"config.prune.sparsity must be in [0, 1), got {p.sparsity}")
    if p.kind == "2:4" and p.sparsity != 0.5:
        raise ConfigError(
            f"config.prune.kind='2:4' keeps 2 of every 4 weights, a sparsity of 0.5, but config.prune.sparsity="
            f"{p.sparsity}; set sparsity=0.5 or use kind='unstructured'"
        )
    if p.every < 1:
        raise ConfigError(f"config.prune.every must be a positive number of steps, got {p.every}")
    if p.start_step < 0 or p.end_step < p.start_step:
        raise ConfigError(
            f"config.prune needs 0 <= start_step <= end_step, got start_step={p.start_step}, end_step={p.end_step}"
        )


def check_distill(config) -> None:
    """The distillation knobs that cannot work whatever the teacher (the teacher itself is checked against this
    run by bigjax.compress.distill, when the run's setup is made)."""
    d = config.distill
    if not d.temperature > 0:
        raise ConfigError(f"config.distill.temperature must be > 0 (1 = the plain softmax), got {d.temperature}")
    if not 0 <= d.alpha <= 1:
        raise ConfigError(
            f"config.distill.alpha must be in [0, 1] (the weight of the teacher's soft targets), got {d.alpha}"
        )


def check_quantization(quant) -> None:
    """Without bits, QAT would train plain float weights that no integer grid was ever learned for."""
    if quant.qat and not quant.bits:
        raise ConfigError(
            "config.quant.qat=True trains through the rounding to config.quant.bits, which is 0 (off): set "
            "config.quant.bits=8 (or 4) for quantization-aware training, or config.quant.qat=False"
        )


def check_lora(config) -> None:
    """LoRA settings that cannot work whatever the model (bigjax.compress.lora checks the targets against its
    layers)."""
    lora, quant = config.lora, config.quant
    if lora.rank < 0:
        raise ConfigError(f"config.lora.rank must be >= 0 (0 turns LoRA off), got {lora.rank}")
    for key in ("targets", "train"):
        try:
            re.compile(lora[key])
        except re.error as error:
            raise ConfigError(f"config.lora.{key}={lora[key]!r} is not a valid regular expression: {error}") from None
    if not lora.rank:
        return
    if not lora.alpha > 0:
        raise ConfigError(f"config.lora.alpha must be > 0 (the update is scaled by alpha / rank), got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"config.lora.dropout must be in [0, 1), got {lora.dropout}")
    if quant.bits and quant.qat:
        raise ConfigError(
            "config.lora with config.quant.qat=True: QLoRA holds its frozen base as integers; set quant.qat=False "
            "for QLoRA, or lora.rank=0 for quantization-aware training of the whole model"
        )


def check_model(config) -> None:
    """Model values that cannot work. Each check applies to the families that have its keys."""
    m = config.model
    if "num_heads" in m:
        check_attention_shape(m)
    if "max_len" in m and config.data.seq_len > m.max_len:
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len={m.max_len}; "
            "raise model.max_len or shorten the sequences"
        )
    if "rope_scaling" in m:
        check_rope_scaling(m)
    for key in BIAS_SWITCHES:
        if key in m and m[key] is not None and not isinstance(m[key], bool):
            raise ConfigError(f"config.model.{key} must be True, False or None (None = as use_bias), got {m[key]!r}")
    if "patch_size" in m:
        check_patches(m, config.data.image_size)
    if m.get("normalization") == "groupnorm":
        check_groups(m)
    if "moe" in m:
        check_moe(m)


def check_moe_compressions(config) -> None:
    """Qwix quantizes and adapts dot_general and einsum; a MoE layer's experts multiply with ragged_dot, so a
    quantized or LoRA model would leave its largest weights float and frozen without saying so: refused instead."""
    if not config.model.get("moe", {}).get("num_experts"):
        return
    for key, value in (("quant.bits", config.quant.bits), ("lora.rank", config.lora.rank)):
        if value:
            raise ConfigError(
                f"config.{key}={value} does not cover the experts of a mixture of experts (config.model.moe."
                f"num_experts={config.model.moe.num_experts}): their grouped matmuls stay float; set {key}=0"
            )


def check_moe(m) -> None:
    moe, where = m.moe, "config.model.moe"
    for key in ("num_experts", "experts_per_token", "expert_mlp_dim", "num_shared_experts", "first_dense_layers"):
        if moe[key] < 0:
            raise ConfigError(f"{where}.{key} must be >= 0, got {moe[key]}")
    if moe.capacity_factor < 0:
        raise ConfigError(f"{where}.capacity_factor must be >= 0 (0 = dropless), got {moe.capacity_factor}")
    if not moe.num_experts:
        return
    if not 0 < moe.experts_per_token <= moe.num_experts:
        raise ConfigError(
            f"{where}.experts_per_token={moe.experts_per_token} must be between 1 and num_experts={moe.num_experts}; "
            "lower experts_per_token or add experts"
        )
    if moe.shared_expert_gate and not moe.num_shared_experts:
        raise ConfigError(
            f"{where}.shared_expert_gate=True gates no shared expert (num_shared_experts=0); set num_shared_experts "
            "or shared_expert_gate=False"
        )
    if moe.first_dense_layers > m.num_layers:
        raise ConfigError(
            f"{where}.first_dense_layers={moe.first_dense_layers} exceeds model.num_layers={m.num_layers}; "
            "keep at most num_layers dense (num_experts=0 for no MoE)"
        )


def linear_biases(m) -> tuple[bool, bool, bool]:
    """Whether the (query/key/value, attention output, MLP) projections of a Transformer config have biases."""
    return tuple(m.use_bias if m[key] is None else m[key] for key in BIAS_SWITCHES)


def check_rope_scaling(m) -> None:
    s, where = m.rope_scaling, "config.model.rope_scaling"
    if s.type not in ROPE_SCALINGS:
        raise ConfigError(f"{where}.type={s.type!r} is not one of {', '.join(ROPE_SCALINGS)}")
    if s.type == "none":
        return
    if m.positions != "rope":
        raise ConfigError(
            f"{where}.type={s.type!r} stretches rotary positions, but config.model.positions={m.positions!r}; "
            "set positions='rope' or rope_scaling.type='none'"
        )
    if not s.factor > 1:
        raise ConfigError(f"{where}.factor must be > 1 for type={s.type!r}, got {s.factor} (no scaling: type='none')")
    if s.type in ("llama3", "yarn") and s.original_max_len <= 0:
        raise ConfigError(
            f"{where}.original_max_len must be the pretraining context length (> 0) for type={s.type!r}, "
            f"got {s.original_max_len}"
        )
    if s.type == "llama3" and not 0 < s.low_freq_factor < s.high_freq_factor:
        raise ConfigError(
            f"{where} needs 0 < low_freq_factor < high_freq_factor for type='llama3', got "
            f"{s.low_freq_factor} and {s.high_freq_factor} (Llama 3.1: 1 and 4)"
        )
    if s.type == "yarn" and not 0 < s.beta_slow < s.beta_fast:
        raise ConfigError(
            f"{where} needs 0 < beta_slow < beta_fast for type='yarn', got {s.beta_slow} and {s.beta_fast} "
            "(YaRN's: 1 and 32)"
        )
    if s.attention_factor < 0:
        raise ConfigError(f"{where}.attention_factor must be >= 0 (0 = 0.1 ln(factor) + 1), got {s.attention_factor}")


def check_patches(m, image_size: int) -> None:
    if image_size % m.patch_size:
        raise ConfigError(
            f"config.data.image_size={image_size} is not a multiple of config.model.patch_size={m.patch_size}; "
            "the image must cut into whole patches"
        )
    if m.position_embedding == "sincos2d" and m.d_model % 4:
        raise ConfigError(
            f"config.model.position_embedding='sincos2d' needs d_model divisible by 4, got {m.d_model}; "
            "use 'learned' or change d_model"
        )


def check_groups(m) -> None:
    """GroupNorm splits every layer's channels into norm_groups groups: each width must divide evenly."""
    widths = list(m.features) if "features" in m else [m.width]  # ResNet's later stages are multiples of width
    uneven = [w for w in widths if w % m.norm_groups]
    if uneven:
        raise ConfigError(
            f"config.model.norm_groups={m.norm_groups} does not divide the channels {uneven}; "
            "pick a norm_groups that divides every layer's width"
        )


def check_attention_shape(m) -> None:
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"config.model.d_model={m.d_model} is not divisible by num_heads={m.num_heads}; "
            "change one of them or set config.model.head_dim"
        )
    kv_heads = m.get("num_kv_heads") or m.num_heads
    if m.num_heads % kv_heads:
        raise ConfigError(
            f"config.model.num_heads={m.num_heads} is not a multiple of num_kv_heads={kv_heads}; "
            "grouped-query attention needs whole groups"
        )
    if m.get("positions") == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("rotary positions need an even head dimension; change config.model.head_dim")


def check_against_devices(config, num_devices: int) -> dict[str, int]:
    """Resolve -1 in the mesh and check the mesh and the batch fit the devices. Returns the mesh shape."""
    shape = dict(config.mesh)
    fixed = 1
    free = [axis for axis, size in shape.items() if size == -1]
    for axis, size in shape.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}={size}: use a positive size, or -1 for all remaining devices")
        if size > 0:
            fixed *= size
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('config.mesh.' + a for a in free)}")
    if num_devices % fixed:
        raise ConfigError(
            f"the mesh {_mesh_str(shape)} does not divide the {num_devices} devices; "
            f"make data*fsdp*tensor*context*expert*stage divide {num_devices} (or set one axis to -1)"
        )
    if free:
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"the mesh {_mesh_str(shape)} uses {fixed} of the {num_devices} devices; "
            f"make data*fsdp*tensor*context*expert*stage equal {num_devices} or set one axis to -1"
        )
    check_context(config, shape["context"])
    check_expert(config, shape["expert"])
    data_parallel = shape["data"] * shape["fsdp"] * shape["expert"]
    micro = config.batch_size // config.optim.grad_accum
    if micro % data_parallel:
        raise ConfigError(
            f"the (micro)batch of {micro} examples does not divide across data*fsdp*expert={data_parallel} devices; "
            f"set config.batch_size to a multiple of {data_parallel * config.optim.grad_accum}"
        )
    check_pipeline(config, shape["stage"])
    return shape


def check_context(config, context: int) -> None:
    """A sequence split over `context` devices: a model that attends across the split (the text Transformers; a
    ViT's few patches need no split, a CNN has no sequence), and equal pieces (twice as many in zig-zag order)."""
    if context == 1:
        return
    if "context_parallel" not in config.model:
        raise ConfigError(
            f"config.mesh.context={context} splits the sequence, which config.model.family="
            f"{config.model.family!r} does not support (only 'gpt' and 'bert' do: vit, cnn and resnet refuse it); "
            "set config.mesh.context=1"
        )
    pieces = 2 * context if balances_context(config) else context
    if config.data.seq_len % pieces:
        balanced = " (config.data.context_load_balance cuts it into 2 x context chunks)" if pieces > context else ""
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len} does not split into {pieces} equal pieces for "
            f"config.mesh.context={context}{balanced}; make seq_len a multiple of {pieces}"
        )


PIPELINE_SCHEDULES = ("gpipe", "circular")


def stacked_layers(m) -> dict:
    """The scanned stacks of layers of config.model `m` and their lengths, as the setting that decides each says it:
    one stack, or a mixture of experts' dense first layers and its MoE layers (each pipelined in turn)."""
    dense = m.moe.first_dense_layers if m.get("moe", {}).get("num_experts") else m.num_layers
    if dense == m.num_layers:
        return {"config.model.num_layers": m.num_layers}
    stacks = {"config.model.moe.first_dense_layers": dense}
    stacks["the MoE layers (config.model.num_layers - moe.first_dense_layers)"] = m.num_layers - dense
    return {what: layers for what, layers in stacks.items() if layers}


def check_pipeline(config, stages: int) -> None:
    """Layers cut into `stages` x repeats equal groups, and a (micro)batch into equal micro-batches
    (bigjax.parallel.pipeline). Micro-batches too small to split over data x fsdp are split unevenly by XLA (padded):
    correct, but keep microbatches x data x fsdp dividing the batch so that every device has rows of each."""
    if stages == 1:
        return
    m = config.model
    if "pipeline" not in m or not m.scan_layers:
        raise ConfigError(
            f"config.mesh.stage={stages} pipelines the stacked layers of config.model.family='gpt' with "
            f"scan_layers=True, not family={m.family!r} scan_layers={m.scan_layers}; set config.mesh.stage=1"
        )
    p = m.pipeline
    if p.schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(
            f"config.model.pipeline.schedule={p.schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}"
        )
    if p.repeats < 1 or p.microbatches < 0:
        raise ConfigError("config.model.pipeline.repeats must be >= 1 and microbatches >= 0 (0 = one per stage)")
    if p.schedule == "gpipe" and p.repeats != 1:
        raise ConfigError(
            f"config.model.pipeline.repeats={p.repeats} needs schedule='circular' (gpipe makes one pass); set it to 1"
        )
    for what, layers in stacked_layers(m).items():
        if layers % (stages * p.repeats):
            raise ConfigError(
                f"{what}={layers} does not split into config.mesh.stage={stages} x config.model.pipeline.repeats="
                f"{p.repeats} equal groups of layers; change it, stage or repeats"
            )
    microbatches = p.microbatches or stages
    if p.schedule == "circular" and microbatches < stages:
        raise ConfigError(
            f"the circular schedule needs config.model.pipeline.microbatches >= config.mesh.stage={stages} (a "
            f"micro-batch is back at stage 0 after {stages} iterations), got {microbatches}"
        )
    rows = config.batch_size // config.optim.grad_accum
    if rows % microbatches:
        raise ConfigError(
            f"the (micro)batch of {rows} examples does not split into config.model.pipeline.microbatches="
            f"{microbatches} equal micro-batches; set config.batch_size to a multiple of "
            f"{microbatches * config.optim.grad_accum}"
        )


def balances_context(config) -> bool:
    """Whether each sequence goes in zig-zag order (bigjax.parallel.context), its positions beside it: a causal LM
    whose sequence config.mesh.context splits (-1 too, which may come to 1 device: then the order stays) and
    config.data.context_load_balance on. The data reorders, and the task's batch carries the positions."""
    return (
        config.data.context_load_balance
        and config.mesh.context != 1
        and config.task.name == "causal_lm"
        and "context_parallel" in config.model
    )


def check_expert(config, expert: int) -> None:
    """Experts split over `expert` devices: a MoE model whose experts split evenly."""
    if expert == 1:
        return
    experts = config.model.moe.num_experts if "moe" in config.model else 0
    if not experts:
        raise ConfigError(
            f"config.mesh.expert={expert} splits a mixture of experts, but config.model has none "
            "(model.moe.num_experts=0, or a family without MoE); set config.mesh.expert=1"
        )
    if experts % expert:
        raise ConfigError(
            f"config.mesh.expert={expert} does not divide config.model.moe.num_experts={experts}; "
            "use an expert axis that divides the number of experts"
        )


def _mesh_str(shape) -> str:
    return "x".join(f"{axis}={size}" for axis, size in shape.items())


# Changing these on resume would load weights or optimizer moments into a model they do not fit.
# Which parameters are pruned, and how, shape the optimizer state (its masks): those must match too; so do the
# quantization (integer or float kernels, and the rounding trained through) and the adapters (which train).
RESUME_MUST_MATCH = (
    "model",
    "optim.name",
    "data.tokenizer",
    "data.seq_len",
    "task.name",
    "task.num_classes",
    "freeze",
    "prune.kind",
    "prune.include",
    "prune.exclude",
    "quant",
    "lora.rank",
    "lora.alpha",
    "lora.targets",
    "lora.train",
)


# Within RESUME_MUST_MATCH but free to change: how the same weights compute, not what they are.
RESUME_MAY_CHANGE = ("model.context_parallel",)


def resume_conflicts(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
    """The differences between a saved and a new config that forbid resuming, as `key: old -> new`."""
    old_flat, new_flat = _flatten(saved.to_dict()), _flatten(new.to_dict())
    return [
        f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}"
        for key in sorted(set(old_flat) | set(new_flat))
        if any(key == p or key.startswith(p + ".") for p in RESUME_MUST_MATCH)
        and key not in RESUME_MAY_CHANGE
        and not key.startswith("model.pipeline.")  # how the step runs the layers, not what they are
        and _normalize(old_flat.get(key)) != _normalize(new_flat.get(key))
    ]


def harmless_changes(saved, new) -> list[str]:
    old_flat, new_flat = _flatten(saved.to_dict()), _flatten(new.to_dict())
    return [
        f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}"
        for key in sorted(set(old_flat) | set(new_flat))
        if _normalize(old_flat.get(key)) != _normalize(new_flat.get(key))
    ]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _normalize(value):
    # JSON turns tuples into lists; compare them as the same thing.
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value
