"""Config loading, overrides and validation: every user error is one clear message, before any compile."""

import pytest
from conftest import REPO, TINY

from bigjax import config as config_lib


def test_overrides_are_parsed_as_the_keys_type(tiny_config):
    c = tiny_config("", "--config.optim.lr=3e-4", "config.model.num_layers=3", "--config.model.scan_layers=false")
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.model.num_layers == 3 and isinstance(c.model.num_layers, int)
    assert c.model.scan_layers is False


def test_experiment_argument_is_parsed(tiny_config):
    assert tiny_config("steps=5").total_steps == 5
    assert tiny_config("llama=True").model.positions == "rope"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.lrr=1", "did you mean config.optim.lr"),
        ("--config.modle.d_model=4", "unknown config key config.modle.d_model"),
        ("--config.model.num_layers=two", "not a valid int"),
        ("--config.model.scan_layers=maybe", "not a valid bool"),
        ("--config.optim.name=adamax", "config.optim.name='adamax' is not one of"),
        ("--config.model.num_heads=3", "not divisible by num_heads=3"),
        ("--config.data.seq_len=64", "exceeds config.model.max_len=32"),
        ("--config.optim.grad_accum=3", "not divisible by config.optim.grad_accum=3"),
        ("--config.optim", "overrides look like"),
        ("--config.optim=3", "is a group"),
        ("--config.optim.mu_dtype=float16", "config.optim.mu_dtype='float16' is not one of float32, bfloat16"),
        ("--config.quant.qat=True", "config.quant.qat=True trains through the rounding to config.quant.bits"),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(tiny_config, override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_config("", override)


def test_mu_dtype_is_refused_for_an_optimizer_without_a_first_moment(tiny_config):
    with pytest.raises(config_lib.ConfigError, match=r"applies to adamw, adam, lion, not config\.optim\.name='sgd'"):
        tiny_config("", "config.optim.name=sgd", "config.optim.mu_dtype=bfloat16")


def test_unknown_key_in_an_experiment_file_is_reported(tmp_path):
    experiment = tmp_path / "typo.py"
    experiment.write_text(
        "from bigjax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.optim.warmup = 10\n"
        "    return c\n"
    )
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.optim\.warmup; did you mean config\.optim\.warmup_steps"
    ):
        config_lib.load(str(experiment))


def test_wrong_type_in_an_experiment_file_is_reported(tmp_path):
    experiment = tmp_path / "wrong_type.py"
    experiment.write_text(
        "from bigjax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.model.num_layers = '4'\n"
        "    return c\n"
    )
    with pytest.raises(
        config_lib.ConfigError, match=r"wrong_type\.py line 4: TypeError: .*'num_layers'.*cannot be casted"
    ):
        config_lib.load(str(experiment))


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load("experiments/nope.py")


@pytest.mark.parametrize(
    "mesh, devices, message",
    [
        (dict(data=3, fsdp=1, tensor=1), 8, "does not divide the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), 8, "uses 4 of the 8 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), 8, "only one mesh axis may be -1"),
        (dict(data=0, fsdp=1, tensor=1), 8, "use a positive size"),
        (dict(data=-1, fsdp=1, tensor=1), 16, r"does not divide across data\*fsdp\*expert=16"),
    ],
)
def test_mesh_and_batch_must_fit_the_devices(tiny_config, mesh, devices, message):
    c = tiny_config()
    c.mesh.update(mesh)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_against_devices(c, devices)


def test_minus_one_takes_the_remaining_devices(tiny_config):
    c = tiny_config("", "--config.mesh.tensor=2")
    assert config_lib.check_against_devices(c, 8) == dict(data=4, fsdp=1, tensor=2, context=1, expert=1, stage=1)
    c = tiny_config("", "--config.mesh.data=1", "--config.mesh.context=-1")
    assert config_lib.check_against_devices(c, 8) == dict(data=1, fsdp=1, tensor=1, context=8, expert=1, stage=1)


def test_context_splits_the_sequence_into_equal_pieces_of_a_model_that_attends_across_them(tiny_config):
    c = tiny_config("", "--config.data.seq_len=20", "--config.mesh.data=2", "--config.mesh.context=4")
    with pytest.raises(config_lib.ConfigError, match="seq_len=20 does not split into 8 equal pieces for config.mesh"):
        config_lib.check_against_devices(c, 8)  # zig-zag order (data.context_load_balance, the default): 2 x 4 chunks
    c.data.context_load_balance = False
    assert config_lib.check_against_devices(c, 8)["context"] == 4
    c.data.seq_len = 30
    with pytest.raises(config_lib.ConfigError, match="seq_len=30 does not split into 4 equal pieces for config.mesh"):
        config_lib.check_against_devices(c, 8)
    # BERT attends both ways: nothing to balance, so its rows stay in order and cut into `context` pieces only
    bert = config_lib.load(str(REPO / "experiments" / "bert_tiny_mlm.py"), ["--config.mesh.context=4"])
    bert.data.seq_len = 12
    assert config_lib.check_against_devices(bert, 8)["context"] == 4 and not config_lib.balances_context(bert)
    vit = config_lib.load(str(REPO / "experiments" / "vit_digits.py"), ["--config.mesh.context=2"])
    with pytest.raises(config_lib.ConfigError, match="family='vit' does not support .* vit, cnn and resnet refuse"):
        config_lib.check_against_devices(vit, 8)


def test_config_round_trips_through_json(tiny_config):
    c = tiny_config("llama=True")
    again = config_lib.from_json(config_lib.to_json(c))
    assert config_lib.harmless_changes(c, again) == []


def test_an_older_config_json_gets_the_defaults_of_keys_added_since_but_unknown_keys_still_fail(tiny_config):
    import json

    saved = json.loads(config_lib.to_json(tiny_config("", "--config.optim.lr=0.123")))
    del saved["optim"]["mu_dtype"], saved["data"]["prefetch"], saved["early_stopping"]  # as written by older bigjax
    again = config_lib.from_json(json.dumps(saved))
    assert again.optim.mu_dtype == "float32" and again.data.prefetch == 2 and again.early_stopping.metric == ""
    assert again.optim.lr == 0.123  # what was saved wins
    saved["optim"]["learning_rate"] = 0.1
    with pytest.raises(config_lib.ConfigError, match="learning_rate"):
        config_lib.from_json(json.dumps(saved))


def test_resume_conflicts_list_model_changes_but_not_harmless_ones(tiny_config):
    old = tiny_config()
    new = tiny_config("", "--config.model.d_model=64", "--config.total_steps=100", "--config.optim.name=sgd")
    conflicts = config_lib.resume_conflicts(old, new)
    assert conflicts == ["model.d_model: 32 -> 64", "optim.name: 'adamw' -> 'sgd'"]
    assert "total_steps: 8 -> 100" in config_lib.harmless_changes(old, new)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optim.lrr=1"], "did you mean config.optim.lr"),
        (["--config.mesh.data=3"], "does not divide the 8 devices"),
        (["--config.batch_size=12"], "does not divide across data*fsdp*expert=8"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line_and_no_traceback(cli, tmp_path, args, message):
    result = cli("train", "--config", TINY, "--workdir", tmp_path / "w", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.family=bert", r"config\.model\.family='bert' does not serve task\.name='causal_lm'.*: gpt"),
        ("--config.model.family=transformer", r"config\.model\.family='transformer' is not a model family.*: gpt"),
    ],
)
def test_the_family_must_serve_the_task(tiny_config, override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        tiny_config("", override)


def test_every_family_validates_with_the_tasks_the_table_says_it_serves_and_no_other():
    from bigjax import families

    for name, family in families.FAMILIES.items():
        for task in config_lib.CHOICES["task.name"]:
            config = config_lib.defaults(model=name, task=task)
            if task in family.tasks:
                config_lib.check_values(config)
            else:
                with pytest.raises(config_lib.ConfigError, match=f"does not serve task.name='{task}'"):
                    config_lib.check_values(config)


def test_an_override_cannot_swap_the_family_under_another_familys_keys(tmp_path):
    experiment = tmp_path / "classify.py"
    experiment.write_text(
        "from bigjax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    return defaults(model='bert', task='classification')\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"family='gpt'.*norm_position.*defaults\(model='gpt'"):
        config_lib.load(str(experiment), ["config.model.family=gpt"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("config.data.seq_len=0", "config.data.seq_len must be a positive integer, got 0"),
        ("config.data.max_segments=0", "config.data.max_segments must be a positive integer, got 0"),
        ("config.optim.grad_accum=0", "config.optim.grad_accum must be a positive integer, got 0"),
        ("config.model.num_heads=-4", "config.model.num_heads must be a positive integer, got -4"),
        ("config.model.num_kv_heads=-1", "config.model.num_kv_heads must be >= 0 (0 = num_heads), got -1"),
        ("config.model.head_dim=-8", "config.model.head_dim must be >= 0"),
        ("config.model.mlp_dim=-1", "config.model.mlp_dim must be >= 0"),
        ("config.data.image_size=-32", "config.data.image_size must be >= 0"),
        ("config.optim.warmup_steps=-1", "config.optim.warmup_steps must be >= 0"),
    ],
)
def test_sizes_must_be_positive(tiny_config, override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config("", override)


def test_the_sizes_of_every_family_are_checked():
    for family, override, message in [
        ("cnn", "config.model.features=(8, 0)", r"config\.model\.features must be positive integers, got \(8, 0\)"),
        ("resnet", "config.model.width=0", r"config\.model\.width must be a positive integer"),
        ("vit", "config.model.patch_size=0", r"config\.model\.patch_size must be a positive integer"),
    ]:
        config = config_lib.defaults(model=family, task="classification")
        config_lib.apply_override(config, override)
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.check_values(config)


def test_an_experiment_that_raises_is_one_line_naming_the_file_and_line_then_its_own_frames(tmp_path):
    experiment = tmp_path / "broken.py"
    experiment.write_text(
        "from bigjax.config import defaults\n"
        "def model_size():\n"
        "    return foo * 2\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.model.d_model = model_size()\n"
        "    return c\n"
    )
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.load(str(experiment))
    first, *frames = str(raised.value).splitlines()
    assert first == f"{experiment} line 3: NameError: name 'foo' is not defined"
    assert "c.model.d_model = model_size()" in frames[1] and "return foo * 2" in frames[-1]
    assert all(str(experiment) in line for line in frames[::2])  # no frame of bigjax or importlib
    assert "config.py" not in str(raised.value) and "importlib" not in str(raised.value)


def test_an_experiment_with_a_syntax_error_names_the_file_and_line(tmp_path):
    experiment = tmp_path / "typo.py"
    experiment.write_text("from bigjax.config import defaults\ndef get_config(arg=None)\n    return defaults()\n")
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.load(str(experiment))
    first, *rest = str(raised.value).splitlines()
    assert first.startswith(f"{experiment} line 2: SyntaxError: ")
    assert "def get_config(arg=None)" in "\n".join(rest) and "importlib" not in str(raised.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        (b"\xff\xfe{", "is not valid JSON"),
        ("[1, 2]", "holds a list, not a config"),
        ('{"model": 5}', r"config\.model must be a group of keys"),
        ('{"model": {"family": ["gpt"]}}', r"config\.model\.family=\['gpt'\] is not a model family"),
        ('{"data": {"seq_len": 0}}', r"config\.data\.seq_len must be a positive integer"),
    ],
)
def test_a_bad_saved_config_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(config_lib.ConfigError, match=message) as raised:
        config_lib.load_saved(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(raised.value)


def test_the_saved_config_is_upgraded_validated_and_overridden(tmp_path, tiny_config):
    import json

    with pytest.raises(config_lib.ConfigError, match=r"config\.json not found.*train there first; or pass --config"):
        config_lib.load_saved(tmp_path, alternative="; or pass --config")
    saved = json.loads(config_lib.to_json(tiny_config()))
    del saved["optim"]["mu_dtype"]  # as written by an older bigjax
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_lib.load_saved(tmp_path, ["config.eval_batches=3"])
    assert config.optim.mu_dtype == "float32" and config.eval_batches == 3
    with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.seq_len=64 exceeds"):  # the override's fault
        config_lib.load_saved(tmp_path, ["config.data.seq_len=64"])


# --------------------------------------------------------------------------------------------------
# RoPE scaling and the bias switches (model.rope_scaling, model.qkv_bias / out_bias / mlp_bias)


def test_rope_scaling_and_bias_switches_are_set_by_overrides(tiny_config):
    c = tiny_config(
        "llama=True",
        "--config.model.rope_scaling.type=llama3",
        "--config.model.rope_scaling.factor=8",
        "--config.model.rope_scaling.original_max_len=16",
        "--config.model.qkv_bias=True",
        "--config.model.mlp_bias=none",
    )
    assert c.model.rope_scaling.type == "llama3" and c.model.rope_scaling.factor == 8.0
    assert (c.model.qkv_bias, c.model.out_bias, c.model.mlp_bias) == (True, None, None)
    assert config_lib.linear_biases(c.model) == (True, False, False)  # None: as use_bias (False in tiny's Llama)
    assert config_lib.linear_biases(tiny_config().model) == (True, True, True)  # GPT-2's use_bias=True
    again = config_lib.from_json(config_lib.to_json(c))
    assert config_lib.harmless_changes(c, again) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rope_scaling.type=ntk"], "config.model.rope_scaling.type='ntk' is not one of none, linear, llama3, yarn"),
        (["rope_scaling.type=linear"], "config.model.rope_scaling.factor must be > 1 for type='linear', got 1.0"),
        (["rope_scaling.type=llama3", "rope_scaling.factor=8"], "original_max_len must be the pretraining context"),
        (
            ["rope_scaling.type=llama3", "rope_scaling.factor=8", "rope_scaling.original_max_len=16",
             "rope_scaling.low_freq_factor=4"],
            "needs 0 < low_freq_factor < high_freq_factor",
        ),
        (
            ["rope_scaling.type=yarn", "rope_scaling.factor=4", "rope_scaling.original_max_len=16",
             "rope_scaling.beta_slow=64"],
            "needs 0 < beta_slow < beta_fast",
        ),
        (
            ["rope_scaling.type=yarn", "rope_scaling.factor=4", "rope_scaling.original_max_len=16",
             "rope_scaling.attention_factor=-1"],
            "attention_factor must be >= 0",
        ),
        (["positions=learned", "rope_scaling.type=linear", "rope_scaling.factor=2"], "set positions='rope'"),
        (["qkv_bias=maybe"], "config.model.qkv_bias='maybe' is not True, False or None"),
        (["rope_scaling=linear"], "is a group"),
    ],
)  # fmt: skip
def test_bad_rope_scaling_and_bias_switches_name_the_key(tiny_config, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_config("llama=True", *[f"--config.model.{o}" for o in overrides])


def test_a_bias_switch_in_an_experiment_file_must_be_a_bool_or_none(tmp_path):
    experiment = tmp_path / "switch.py"
    experiment.write_text(
        "from bigjax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.model.out_bias = 'yes'\n"
        "    return c\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.out_bias must be True, False or None"):
        config_lib.load(str(experiment))
