"""Fine-tuning and transfer: start from another run's parameters, keep a backbone fixed, stop early.

    config.init_from = dict(workdir=..., step=0, include=".*", exclude="")
    config.freeze = "regex"                                   # e.g. "^(?!classifier)" freezes all but the head
    config.early_stopping = dict(metric="accuracy", mode="max", patience=5)

Parameters are named by their "/"-joined paths (bigjax.params), e.g. `layers/attention/query/kernel` or
`classifier/bias` (scanned layers are one stacked array each); every pattern is a `re.search` over those names.

- `init_from` loads, when a run starts from scratch, the parameters of another run's checkpoint, and its
  model state (BatchNorm statistics) where both runs have one (no optimizer state, no step, no data position),
  onto this run's mesh. Model-state arrays are matched by their path inside their collection, e.g.
  `stage1/norm1/mean`, so one pattern selects a layer's parameters and its statistics alike. An array is loaded
  when its name matches `include`, does not match `exclude`, and the checkpoint has it; the others (a new head)
  keep their fresh initialization. A name that matches but has another shape in the checkpoint is an error: exclude it.
  `init_from.workdir=hf:PATH` loads a Hugging Face model directory instead (GPT-2, Llama, BERT, ViT, ResNet with
  its BatchNorm statistics; bigjax.hf), with the same include/exclude, into a model of the checkpoint's
  architecture: one whose settings differ (a pre-LN model for a post-LN BERT, another rope_theta) is refused,
  listing each difference (bigjax.hf.check_architecture).
- `freeze` (see bigjax.run.optim) keeps the matching parameters bit-identical: they get no gradient computation,
  no optimizer state and no update.
- Early stopping watches one inline-eval metric: each evaluation saves a checkpoint carrying its metrics, Orbax
  keeps the best one besides the newest `keep_checkpoints`, and training stops after `patience` evaluations
  without improvement.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from bigjax.errors import UserError
from bigjax.ops import metrics
from bigjax.params import by_path, matches, nest, param_path
from bigjax.run import checkpoint
from bigjax.run.workdir import Run

HF_PREFIX = "hf:"  # init_from.workdir=hf:PATH loads a Hugging Face model directory (bigjax.hf)


class FinetuneError(UserError):
    """A fine-tuning setting that cannot work: a message for the user."""


# --------------------------------------------------------------------------------------------------
# init_from


def load_pretrained_state(state, init_from, shardings):
    """A new TrainState with its parameters (and model state) loaded from `init_from` as configured."""
    if init_from.workdir.startswith(HF_PREFIX):
        state = state.replace(params=load_from_hf(state.params, init_from, shardings.params))
        if state.model_state:  # a ResNet's BatchNorm statistics
            loaded = {
                collection: load_from_hf(arrays, init_from, shardings.model_state[collection], collection)
                for collection, arrays in state.model_state.items()
            }
            state = state.replace(model_state=loaded)
        return state
    step = newest_or_given_step(init_from)
    state = state.replace(params=load_pretrained(state.params, init_from, shardings.params, step))
    if state.model_state:
        loaded = {
            collection: load_pretrained(
                arrays, init_from, shardings.model_state[collection], step, f"model_state/{collection}"
            )
            for collection, arrays in state.model_state.items()
        }
        state = state.replace(model_state=loaded)
    return state


def load_pretrained_into(setup, state):
    """`state`, a run's fresh one, with init_from's parameters loaded as `load_pretrained_state` does. A QLoRA run's
    integer kernels are loaded as the float kernels they stand for, then quantized again (bigjax.compress.quantized):
    the float base exists whole on the mesh for that moment, as in a float fine-tune."""
    from bigjax import hf
    from bigjax.compress import quantized

    config, shardings = setup.config, setup.state_shardings
    if config.init_from.workdir.startswith(HF_PREFIX):  # the weights only mean anything in their own architecture
        hf.check_architecture(config, config.init_from.workdir.removeprefix(HF_PREFIX))
    if not setup.variant.holds_integers:
        return load_pretrained_state(state, config.init_from, shardings)
    boxed = setup.boxed_params()
    float_shardings = quantized.float_shardings(shardings.params)
    with setup.sharding.activate():
        floats = jax.jit(lambda p: quantized.dequantize_params(p, boxed), out_shardings=float_shardings)(state.params)
    float_state = load_pretrained_state(
        state.replace(params=floats), config.init_from, shardings.replace(params=float_shardings)
    )
    with setup.sharding.activate():
        params = jax.jit(lambda p: quantized.quantize_params(p, boxed), out_shardings=shardings.params)(
            float_state.params
        )
    return float_state.replace(params=params)


def load_from_hf(tree, init_from, shardings, collection: str = ""):
    """`tree` (the parameters, or the model-state `collection`, e.g. batch_stats) with the selected arrays replaced
    by a Hugging Face model's (init_from.workdir=hf:PATH)."""
    from bigjax import hf

    hf_dir = init_from.workdir.removeprefix(HF_PREFIX)
    wanted, unwanted = by_path(matches(tree, init_from.include)), by_path(matches(tree, init_from.exclude))
    selected = {name: wanted[name] and not unwanted[name] for name in wanted}
    prefix = f"{collection}/" if collection else ""
    tree, loaded = hf.load_selected(tree, hf_dir, selected, shardings, prefix)
    what = collection or "parameters"
    if not loaded and not collection:
        raise FinetuneError(
            f"config.init_from: no parameter of the Hugging Face model {hf_dir} matches this model "
            f"(include={init_from.include!r}, exclude={init_from.exclude!r})"
        )
    fresh = [name for name in by_path(tree) if name not in loaded]
    metrics.say(
        f"init_from: loaded {len(loaded)} {what} from {hf_dir}; "
        f"freshly initialized: {', '.join(fresh) if fresh else 'none'}"
    )
    return tree


def newest_or_given_step(init_from) -> int:
    """init_from.step if that run committed it, its newest committed step for 0."""
    try:
        return Run(init_from.workdir).committed_step(init_from.step or None)
    except checkpoint.CheckpointError as error:
        raise FinetuneError(
            f"config.init_from: {error}; train that run first or fix config.init_from.workdir / step"
        ) from None


def load_pretrained(params, init_from, param_shardings, step: int | None = None, item: str = "params"):
    """`params` (or one collection of the model state: `item="model_state/batch_stats"`) with the selected
    arrays replaced by those of `init_from.workdir`'s checkpoint, restored onto `param_shardings` (this run's
    mesh). Says what it loaded and what it left fresh."""
    step = step or newest_or_given_step(init_from)
    mngr = Run(init_from.workdir).reader()
    item, _, collection = item.partition("/")
    saved = checkpoint.saved_tree(mngr, step, item)
    saved = by_path(saved.get(collection, {}) if collection else saved)
    if collection and not saved:
        metrics.say(f"init_from: {init_from.workdir} step {step} has no {collection}; they start fresh")
        return params
    what = collection or "parameters"
    wanted, unwanted = by_path(matches(params, init_from.include)), by_path(matches(params, init_from.exclude))
    shardings = by_path(param_shardings)
    load = {}
    for name, leaf in by_path(params).items():
        if not wanted[name] or unwanted[name] or name not in saved:
            continue
        if tuple(saved[name].shape) != tuple(leaf.shape):
            raise FinetuneError(
                f"config.init_from: {what} {name} has shape {tuple(saved[name].shape)} in "
                f"{init_from.workdir} but {tuple(leaf.shape)} here; make the models match or leave it out with "
                f"config.init_from.exclude"
            )
        load[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[name])
    if not load:
        raise FinetuneError(
            f"config.init_from: no {what} of {init_from.workdir} step {step} matches this model "
            f"(include={init_from.include!r}, exclude={init_from.exclude!r}); its {what} are "
            f"{', '.join(sorted(saved)[:8])}{', ...' if len(saved) > 8 else ''}"
        )

    target = {collection: nest(load)} if collection else nest(load)
    restored = checkpoint.restore_subset(mngr, step, target, item)
    restored = by_path(restored[collection] if collection else restored)
    fresh = [name for name in by_path(params) if name not in restored]
    metrics.say(
        f"init_from: loaded {len(restored)} {what} from {init_from.workdir} step {step}; "
        f"freshly initialized: {', '.join(fresh) if fresh else 'none'}"
    )
    return jax.tree_util.tree_map_with_path(lambda path, leaf: restored.get(param_path(path), leaf), params)


# --------------------------------------------------------------------------------------------------
# Early stopping


@dataclasses.dataclass
class EarlyStopping:
    """Tracks one eval metric: the best value so far, and the evaluations since it was reached."""

    metric: str
    mode: str  # "max" | "min"
    patience: int
    best: float = math.nan
    best_step: int | None = None
    since_best: int = 0

    @classmethod
    def from_config(cls, config):
        s = config.early_stopping
        return cls(s.metric, s.mode, s.patience) if s.metric else None

    def resume(self, best_step: int | None, best_metrics: dict | None, step: int, eval_every: int) -> None:
        """Rebuild the state of a resumed run from its best checkpoint: evaluations run at multiples of
        eval_every, so those after the best one up to `step` are the evaluations without improvement."""
        if best_step is None or not best_metrics or self.metric not in best_metrics:
            return
        self.best, self.best_step = float(best_metrics[self.metric]), best_step
        self.since_best = step // eval_every - best_step // eval_every

    def update(self, step: int, eval_metrics: dict) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if self.metric not in eval_metrics:
            raise FinetuneError(
                f"config.early_stopping.metric={self.metric!r} is not an eval metric; "
                f"the evaluation gives {', '.join(sorted(eval_metrics))}"
            )
        value = float(eval_metrics[self.metric])
        better = value > self.best if self.mode == "max" else value < self.best
        if math.isnan(self.best) or better:
            self.best, self.best_step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.patience

    def describe(self) -> str:
        return f"best {self.metric}={self.best:.6g} at step {self.best_step}"
