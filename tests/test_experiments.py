"""Every experiment file in experiments/ loads and validates, shows its run command, and builds its model at full
size with the parameter count of the published model (shapes only: nothing is allocated or compiled).

The full-size experiments need TFDS downloads or a GPU to run; this is what proves their files are not stale.
"""

import ast

import flax.linen as nn
import jax
import pytest
from conftest import REPO

from bigjax import config as config_lib
from bigjax import tasks
from bigjax.run import state as state_lib

EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))

# Published sizes: GPT-2 small with its vocabulary padded to 50304; ResNets and the Flax-tutorial CNN as in
# their papers/tutorial; ViT-B/16 without class token or learned positions (big_vision's plain-ViT recipe); a
# ResNet-50 backbone under a 37-way head for the pets transfer.
PARAMETERS = {
    "gpt2_124m": 124_475_904,
    "llama_1b": 1_100_048_384,
    "mixtral_8x7b": 46_702_792_704,
    "cnn_mnist": 824_458,
    "resnet18_cifar10": 11_173_962,
    "resnet50_imagenet": 25_557_032,
    "resnet50_transfer": 23_508_032 + 2048 * 37 + 37,
    "vit_b16_imagenet": 86_415_592,
}
# Needs a tokenizer trained first (`bigjax tokenizer train`); its model is checked in test_text_experiments.py.
NEEDS_FILES = {"bert_base_mlm": ["config.data.tokenizer=byte"]}


def parameter_count(config) -> int:
    task = tasks.make_task(config)
    variables = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))))
    return state_lib.count_parameters(variables["params"])


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_loads_validates_and_builds_its_model(path):
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"--config experiments/{path.name}" in docstring, f"{path.name}: its docstring shows no run command"

    config = config_lib.load(str(path), NEEDS_FILES.get(path.stem, []))
    count = parameter_count(config)
    if path.stem in PARAMETERS:
        assert count == PARAMETERS[path.stem]
    else:
        assert count > 0
