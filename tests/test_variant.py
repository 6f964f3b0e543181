"""bigjax.compress.variant: which model a run is, as one value made from config.quant and config.lora."""

import pytest

from bigjax import config as config_lib
from bigjax.compress.variant import Variant

# kind: (overrides, holds integers, inference only)
KINDS = {
    "float": ([], False, False),
    "qat": (["config.quant.bits=8", "config.quant.qat=True"], False, False),
    "ptq": (["config.quant.bits=4", "config.quant.mode=dynamic"], True, True),
    "lora": (["config.lora.rank=4"], False, False),
    "qlora": (["config.lora.rank=4", "config.quant.bits=8"], True, False),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_variant_is_what_its_config_says_and_writes_back_the_same(kind, tiny_config):
    overrides, integers, inference_only = KINDS[kind]
    config = tiny_config("", *overrides)
    variant = Variant.of(config)
    assert (variant.kind, variant.holds_integers, variant.inference_only) == (kind, integers, inference_only)
    assert (variant.float_export_refusal("RUN") is None) == (kind in ("float", "qat"))

    blank = config_lib.from_dict(tiny_config().to_dict())
    variant.write_into(blank)
    assert Variant.of(blank) == variant
    Variant().write_into(blank)  # and back to float
    assert Variant.of(blank) == Variant() and Variant().kind == "float"
