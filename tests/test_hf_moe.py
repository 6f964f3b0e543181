"""Hugging Face mixtures of experts (Mixtral, Qwen2-MoE) in and out of bigjax, against transformers itself in float32
on the CPU: tiny random models saved with save_pretrained (nothing is downloaded), imported, compared logit for logit
and token for token (greedy decoding through bigjax's KV cache), exported back and loaded by transformers again; and
loaded by a run's init_from.workdir=hf:PATH onto a mesh that splits the experts."""

import json

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors import safe_open
from test_hf import HF_VOCAB, PROMPT, assert_logits_match, bigjax_logits, randomized, save, tokenizer_file, torch_logits

from bigjax import config as config_lib
from bigjax import generate, hf
from bigjax.hf import family
from bigjax.params import by_path
from bigjax.run import finetune
from bigjax.run.setup import make_setup

__all__ = ["tokenizer_file"]  # the fixture, shared with test_hf

SIZES = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=HF_VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)
EXPERTS, TOP_K = 4, 2
# A router's margin (the k-th picked logit over the next) that rounding cannot flip: the two sides' float32 logits
# agree to ~1e-6 relative.
ROUTING_MARGIN = 1e-3


def routers_spread(model):
    """transformers initializes a router with std 0.02, so that every expert gets ~1/E and a pick is decided in the
    last bits; a router of std 0.3 (logits of std ~1.7) picks by wide margins, which rounding leaves alone (checked:
    routing_margin), and still gives the k-th pick a weight that shows a mistake in its expert."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def mixtral_model():
    """Mixtral: softmax over every expert, top 2, renormalised; no shared expert; every layer MoE."""
    torch.manual_seed(5)
    config = transformers.MixtralConfig(
        **SIZES, num_hidden_layers=2, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    return routers_spread(randomized(transformers.MixtralForCausalLM(config)))


def qwen2_moe_model():
    """Qwen2-MoE: q/k/v biases, the top-2 probabilities as they are (norm_topk_prob=False), a shared expert twice an
    expert's width behind a sigmoid gate, and a dense first layer (mlp_only_layers) of its own width."""
    torch.manual_seed(6)
    config = transformers.Qwen2MoeConfig(
        **SIZES,
        num_hidden_layers=3,
        intermediate_size=40,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    )
    return routers_spread(randomized(transformers.Qwen2MoeForCausalLM(config)))


MODELS = {"mixtral": mixtral_model, "qwen2_moe": qwen2_moe_model}
EXPORTED_AS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tokenizer_file, tmp_path_factory):
    """(name, the transformers model, its save_pretrained directory with the tokenizer): one per family."""
    model = MODELS[request.param]()
    return request.param, model, save(model, tmp_path_factory.mktemp(request.param), tokenizer_file)


def prompt_ids(tokenizer_file) -> list[int]:
    return [int(i) for i in tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode(PROMPT).ids]


def routing_margin(model, ids) -> float:
    """The smallest gap, over the prompt's tokens and the MoE layers, between a token's k-th picked expert's router
    logit and the best one it did not pick."""
    with torch.no_grad():
        router_logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    gaps = []
    for logits in router_logits:
        ranked = torch.sort(logits.float(), dim=-1, descending=True).values
        gaps.append(float((ranked[:, TOP_K - 1] - ranked[:, TOP_K]).min()))
    return min(gaps)


def test_import_matches_transformers_logits_greedy_tokens_and_exports_back(saved, tokenizer_file, tmp_path):
    name, model, hf_dir = saved
    ids = prompt_ids(tokenizer_file)
    assert routing_margin(model, ids) > ROUTING_MARGIN  # so that a mismatch is the mapping's, never a near tie's
    workdir = tmp_path / "run"
    hf.import_hf(hf_dir, workdir)  # on the tests' 8-device mesh
    moe = config_lib.load_saved(workdir).model.moe
    assert (moe.num_experts, moe.experts_per_token) == (EXPERTS, TOP_K)

    ours, theirs = bigjax_logits(workdir, ids), torch_logits(model, ids)
    assert_logits_match(ours, theirs, model.config.num_hidden_layers)
    assert np.all(ours[:, HF_VOCAB:] == 0)

    # Greedy decoding with bigjax's KV cache continues the prompt as transformers' greedy generate does.
    new = generate.load(workdir).generate_ids([ids], generate.Sampling(max_new_tokens=10, temperature=0.0))[0]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = expected[0, len(ids) :].tolist()
    assert 0 not in expected, "the reference stopped token is generated: pick another seed"
    assert new == expected

    # Export: transformers loads it (no weight missing or left over) and computes the original's logits.
    out = tmp_path / "exported"
    assert hf.export(workdir, out) == 0
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded).__name__ == EXPORTED_AS[name]
    written, original = json.loads((out / "config.json").read_text()), model.config.to_dict()
    for field in ("num_experts_per_tok", "norm_topk_prob", "mlp_only_layers", "moe_intermediate_size"):
        assert written.get(field) == original.get(field), field
    # The same float32 weights, but transformers' grouped matmul over the experts it stacked on loading may sum in
    # another order than over the original's: equal up to rounding (bit for bit for most prompts).
    assert_logits_match(torch_logits(reloaded.eval(), ids), theirs, model.config.num_hidden_layers)


def test_init_from_hf_places_every_expert_on_the_expert_axis(saved, tmp_path):
    """A run whose model is the checkpoint's (config_from_hf), with its own router losses and capacity, and whose
    experts are split over 2 devices, loads the very weights the files hold, each array on the run's own sharding."""
    _, _, hf_dir = saved
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(hf.config_from_hf(hf_dir).model)
    config.model.vocab_size = HF_VOCAB + 3
    config.mesh.update(data=-1, expert=2)
    config.data.seq_len = 16
    config.init_from.workdir = f"hf:{hf_dir}"
    config.model.moe.update(router_aux_loss=0.05, router_z_loss=0.001, capacity_factor=2.0)  # the run's to choose
    setup = make_setup(config)
    state = finetune.load_pretrained_into(setup, setup.init_state())

    loaded, shardings = by_path(state.params), by_path(setup.state_shardings.params)
    experts = [path for path in loaded if "/experts/" in path]
    assert experts and all("expert" in str(shardings[path].spec) for path in experts), experts
    for path, array in loaded.items():
        assert array.sharding == shardings[path], path
    # Layer 1's router and expert 3's down projection, by hand from the file: torch's [out, in] transposed, stacked
    # by layer (Mixtral's layer 1 is the second of its MoE layers; Qwen2-MoE's the first, after its dense layer 0).
    with safe_open(hf_dir / hf.SINGLE_FILE, framework="numpy") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    mixtral = "model.layers.1.block_sparse_moe.gate.weight" in stored
    prefix = "model.layers.1." + ("block_sparse_moe." if mixtral else "mlp.")
    layer = 1 if mixtral else 0
    router = np.asarray(jax.device_get(loaded["moe_layers/mlp/router/kernel"]))[layer]
    np.testing.assert_array_equal(router, stored[prefix + "gate.weight"].T)
    down = np.asarray(jax.device_get(loaded["moe_layers/mlp/experts/down"]))[layer, 3]
    np.testing.assert_array_equal(
        down, stored[prefix + ("experts.3.w2.weight" if mixtral else "experts.3.down_proj.weight")].T
    )


def qwen2_moe_config_dir(tmp_path, **fields):
    config = qwen2_moe_model().config.to_dict() | dict(architectures=["Qwen2MoeForCausalLM"]) | fields
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(shared_expert_intermediate_size=24), "shared_expert_intermediate_size=24"),
        (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        (dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    ],
)
def test_a_qwen2_moe_bigjax_cannot_represent_is_refused_naming_the_field(fields, message, tmp_path):
    with pytest.raises(hf.HFError, match=message):
        hf.config_from_hf(qwen2_moe_config_dir(tmp_path, **fields))


@pytest.mark.parametrize(
    "moe, message",
    [
        (dict(num_shared_experts=1), "num_shared_experts=1 .*shared_expert_gate"),
        (dict(norm_topk_probs=False), "norm_topk_probs=False"),
        (dict(first_dense_layers=1), "first_dense_layers=1"),
    ],
)
def test_a_mixture_of_experts_no_architecture_has_is_refused_at_export(moe, message):
    """A Llama-style MoE exports as Mixtral (no biases, no shared experts, renormalised picks, every layer MoE) or
    Qwen2-MoE (gated shared experts); anything else is refused naming the setting."""
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(positions="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, num_layers=2)
    config.model.moe.update(num_experts=4, **moe)
    with pytest.raises(hf.HFError, match=message):
        family.for_config(config)
