"""Each Hugging Face family's mapping (bigjax.hf.mapping: one table read by import and by export) round-trips: a
run's parameters exported and imported again are the same parameters, bit for bit, and export writes exactly the
tensors transformers' own files have. Tiny random transformers models give the shapes and values; nothing is run."""

import numpy as np
import pytest
import test_hf
import test_hf_encoders
import test_hf_moe
import transformers

from bigjax.hf import convert, files
from bigjax.hf.common import Params


def llama_with_every_bias():
    config = transformers.LlamaConfig(**test_hf.SMALL_CONTEXT, attention_bias=True, mlp_bias=True)
    return test_hf.randomized(transformers.LlamaForCausalLM(config))


def resnet(layer_type):
    return transformers.ResNetForImageClassification(test_hf_encoders.resnet_config(layer_type))


MODELS = {
    "gpt2": test_hf.gpt2_model,
    "llama_untied": test_hf.llama_model,
    "llama_every_bias": llama_with_every_bias,
    "qwen2": test_hf.qwen2_model,
    "mixtral": test_hf_moe.mixtral_model,  # the experts: one HF tensor each, stacked into one array per kernel
    "qwen2_moe": test_hf_moe.qwen2_moe_model,  # a dense first layer, a gated shared expert
    "bert_mlm": lambda: transformers.BertForMaskedLM(test_hf_encoders.bert_config(100)),
    "bert_classifier": lambda: transformers.BertForSequenceClassification(test_hf_encoders.bert_config(100)),
    "vit": lambda: test_hf_encoders.randomize(transformers.ViTForImageClassification(test_hf_encoders.vit_config())),
    "resnet_basic": lambda: resnet("basic"),
    "resnet_bottleneck": lambda: resnet("bottleneck"),  # scanned: a stage's later blocks stacked into one array
}


def imported(hf_dir, config) -> dict:
    """{bigjax path: array} the mapping reads from hf_dir, the layers unrolled (layers_I/...)."""
    read = files.TensorReader(hf_dir)
    layer = {
        f"layers_{i}/{sub}": view.full()
        for i in range(config.model.get("num_layers", 0))
        for sub, view in convert.layer_views(read, config, i).items()
    }
    return layer | {path: view.full() for path, view in convert.hf_views(read, config)[1].items()}


def stored_names(hf_dir) -> set:
    from safetensors import safe_open

    with safe_open(hf_dir / files.SINGLE_FILE, framework="numpy") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", list(MODELS))
def test_each_family_table_round_trips(name, tmp_path):
    """export then import is the identity on the parameters (every path, every value exactly), and export writes the
    HF model's own tensor names, no more and no fewer."""
    MODELS[name]().save_pretrained(tmp_path / "hf")
    config = convert.config_from_hf(tmp_path / "hf")
    params = imported(tmp_path / "hf", config)
    hf_vocab = config.model.get("vocab_size")

    exported = convert.hf_tensors(Params(params), config, hf_vocab)
    assert set(exported) == stored_names(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    files.save_safetensors(exported, tmp_path / "out" / files.SINGLE_FILE)
    again = imported(tmp_path / "out", config)

    assert sorted(again) == sorted(params)
    for path, array in params.items():
        assert again[path].shape == array.shape and np.array_equal(again[path], array), path
