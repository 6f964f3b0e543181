"""Which model a run is, as one value: float, quantization-aware training (QAT), post-training quantized (PTQ,
int8 or int4), LoRA, or QLoRA (LoRA over an integer base), with its settings.

    variant = Variant.of(config)      # once, where the config becomes a run (tasks.make_task; Setup.variant)
    variant.kind                      # "float" | "qat" | "ptq" | "lora" | "qlora"
    variant.holds_integers            # a question asked of the variant, never of config.quant / config.lora

`config.quant` and `config.lora` (bigjax.config.defaults) stay what a user writes and what a run's config.json
records; this module alone reads them (`of`) and writes them (`write_into`, for the commands that turn one variant
into another: `bigjax quantize`, `bigjax lora merge`). bigjax.compress.quantized builds the model a variant says.
"""

from __future__ import annotations

import dataclasses

import jax

from bigjax import params as params_lib


@dataclasses.dataclass(frozen=True)
class Quant:
    """Integer kernels: `bits` 8 (one scale per output channel) or 4 (one per `sub_channel` input channels);
    `mode` weight_only or dynamic (activations to int8 too); `qat`: float kernels trained through the rounding."""

    bits: int
    mode: str
    sub_channel: int
    qat: bool


@dataclasses.dataclass(frozen=True)
class Lora:
    """Low-rank adapters of `rank` on the matmuls `targets` finds, scaled by alpha / rank; `train` names the
    parameters trained whole besides them. (config.lora.adapters, the adapters a run starts from, is where it
    starts, as config.init_from is, not which model it is: it stays in the config.)"""

    rank: int
    alpha: float
    targets: str
    dropout: float
    train: str


@dataclasses.dataclass(frozen=True)
class Variant:
    quant: Quant | None = None  # None: float kernels
    lora: Lora | None = None  # None: no adapters

    @classmethod
    def of(cls, config) -> Variant:
        """The variant `config` describes (a config without the sections, e.g. a teacher's older one: float)."""
        quant, lora = config.get("quant"), config.get("lora")
        return cls(
            Quant(**quant.to_dict()) if quant is not None and quant.bits else None,
            Lora(**{f.name: lora[f.name] for f in dataclasses.fields(Lora)})
            if lora is not None and lora.rank
            else None,
        )

    @property
    def kind(self) -> str:
        if self.lora:
            return "qlora" if self.quant else "lora"
        if self.quant:
            return "qat" if self.quant.qat else "ptq"
        return "float"

    @property
    def bits(self) -> int:
        return self.quant.bits if self.quant else 0

    @property
    def holds_integers(self) -> bool:
        """Are the quantized kernels integer arrays (PTQ, QLoRA's base), rather than QAT's float kernels?"""
        return bool(self.quant and not self.quant.qat)

    @property
    def inference_only(self) -> bool:
        """A workdir of `bigjax quantize`: integer weights with nothing to train (QLoRA trains its adapters)."""
        return self.holds_integers and not self.lora

    def freezes_any(self, freeze: str) -> bool:
        """Does the run keep any parameter fixed (config.freeze, or LoRA's base)?"""
        return bool(freeze or self.lora)

    def frozen(self, params, freeze: str):
        """A tree like `params` of bools: is the parameter kept fixed? Those `freeze` (config.freeze) matches, and
        in a LoRA run all but the adapters and `lora.train`'s: they get no gradient, no optimizer state and no
        update."""
        fixed = params_lib.matches(params, freeze)
        if not self.lora:
            return fixed
        trained = params_lib.matches(params, params_lib.ADAPTERS + (f"|{self.lora.train}" if self.lora.train else ""))
        return jax.tree.map(lambda fixed, trained: fixed or not trained, fixed, trained)

    def trained_whole(self, params) -> list[str]:
        """The "/"-names of the parameters `lora.train` names (besides the adapters)."""
        if not self.lora or not self.lora.train:
            return []
        return [
            name for name, named in params_lib.by_path(params_lib.matches(params, self.lora.train)).items() if named
        ]

    def float_export_refusal(self, where) -> str | None:
        """Why a float exporter (Hugging Face, ONNX, StableHLO) cannot take this run as it is, with the way out;
        None when it can (a float run, or a QAT one: its weights are float)."""
        if self.lora:
            return (
                f"{where} is a LoRA run (config.lora.rank={self.lora.rank}): merge its adapters into the base first, "
                f"`bigjax lora merge --workdir RUN --out MERGED`, and export MERGED"
            )
        if self.holds_integers:
            return (
                f"{where} is a quantized run (config.quant.bits={self.bits}) whose weights are integers; export "
                "writes float weights: export the float run it was quantized from"
            )
        return None

    def write_into(self, config) -> None:
        """Set config.quant and config.lora to say this variant: the settings of an absent part, and those given as
        None (a sub_channel left to the config's), kept as they are, the part off."""
        quant = dataclasses.asdict(self.quant) if self.quant else dict(bits=0, qat=False)
        config.quant.update({key: value for key, value in quant.items() if value is not None})
        config.lora.update(dataclasses.asdict(self.lora) if self.lora else dict(rank=0, adapters=""))
