"""Closed sets of choices: config.CHOICES is the one list of their names (config.check_values refuses any other), and
the modules that implement a choice look it up by those names. Every name has an implementation, and every
implementation a name."""

import importlib
import pkgutil

import pytest

import bigjax.models
from bigjax import config as config_lib
from bigjax import families, plan, tasks
from bigjax.config import CHOICES
from bigjax.data import sources
from bigjax.data.split import Split
from bigjax.run import optim


def test_every_optimizer_name_has_an_implementation_and_every_implementation_a_name():
    assert set(optim.DECOUPLED_DECAY) | set(optim.L2_DECAY) == set(CHOICES["optim.name"])
    assert not set(optim.DECOUPLED_DECAY) & set(optim.L2_DECAY), "an optimizer decays weights one way"


def test_every_schedule_name_has_an_implementation_and_every_implementation_a_name():
    assert set(optim.SCHEDULES_AFTER_WARMUP) == set(CHOICES["optim.schedule"])


def test_every_text_record_unit_has_a_separator_and_every_separator_a_name():
    assert set(sources.RECORD_SEPARATORS) | {"auto"} == set(CHOICES["data.text_records"])


@pytest.mark.parametrize("unit", CHOICES["data.text_records"])
def test_every_text_record_unit_cuts_the_text(tiny_config, unit):
    config = tiny_config("", f"config.data.text_records={unit}", "config.task.name=causal_lm")
    document = {"text": "Enter ROMEO.\nROMEO: Ay me.\n\nEnter JULIET.\nJULIET: Romeo!"}
    split = Split("text", "test", "one document", lambda: [document])
    records = sources.split_text_records(split, sources.text_unit(config)).records
    expected = {"auto": 1, "document": 1, "paragraph": 2, "line": 4}[unit]  # auto: whole documents for causal LM
    assert len(records) == expected


def remat_policy_tables() -> list[dict]:
    """Every REMAT_POLICIES table of bigjax.models (whichever module holds it), each once."""
    modules = [importlib.import_module(m.name) for m in pkgutil.iter_modules(bigjax.models.__path__, "bigjax.models.")]
    tables = {id(m.REMAT_POLICIES): m.REMAT_POLICIES for m in modules if hasattr(m, "REMAT_POLICIES")}
    return list(tables.values())


def test_every_remat_name_has_a_policy_and_every_policy_a_name():
    tables = remat_policy_tables()
    assert tables, "no REMAT_POLICIES table found in bigjax.models"
    for table in tables:
        assert set(table) | {"none"} == set(CHOICES["model.remat"])


@pytest.mark.parametrize("remat", CHOICES["model.remat"])
def test_the_plan_models_the_activations_of_every_remat_name(tiny_config, remat):
    config = tiny_config("", f"config.model.remat={remat}")
    kept = plan.activation_bytes(tasks.make_task(config), config, dict(data=8, fsdp=1, tensor=1), "xla")
    assert isinstance(kept, int) and kept > 0


@pytest.mark.parametrize("task", CHOICES["task.name"])
def test_every_task_name_makes_a_task(task):
    family = next(name for name, family in families.FAMILIES.items() if task in family.tasks)
    config = config_lib.defaults(model=family, task=task)
    config.task.num_classes = 2  # a classifier needs classes; the others ignore it
    made = tasks.make_task(config)
    assert type(made).__module__ == f"bigjax.tasks.{task}"
