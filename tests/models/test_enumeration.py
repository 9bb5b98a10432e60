"""Every causal-LM family the installed transformers ships, read from its own auto mapping (so a new release's
families are tested without editing this file).

A dense decoder-only family runs: a tiny random model of its default config, streamed with every layer on disk,
with a mixed plan and fully resident, gives transformers' own greedy tokens, and a tree pass equals each path
decoded alone. The others are refused in one line saying why: the reasons that a config states by itself
(encoder-decoder, recurrent or linear-attention layers, bidirectional attention) are checked against the config;
every other refusal is listed below with its reason. Mixtures of experts run here like the others (their
experts streamed by expert, tests/runtime/test_moe.py); those whose experts are not one fused module are skipped.

The default suite runs a representative set (each layout and head quirk once); `-m slow` (and `make test-latest`)
runs the whole enumeration.
"""

from __future__ import annotations

import pytest
import torch

from offspec.errors import ModelError
from offspec.generate import Engine, GenerationConfig, generate
from offspec.models.registry import check_supported
from offspec.models.tiny import default_config, tiny_config
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan, minimum_budget_bytes, plan_residency
from offspec.store.convert import convert_model
from offspec.store.manifest import read_manifest
from offspec.transformers_contract import causal_lm_mapping, transformers_version

EVERY = sorted(causal_lm_mapping())
# Each layout and head quirk once (the default suite).
REPRESENTATIVE = [
    "llama", "mistral", "qwen2", "gemma2", "gemma3", "gemma3n_text", "gemma4_text", "granite", "cohere", "gpt2",
    "gpt_neox", "opt", "falcon", "minicpm3", "exaone", "moshi", "biogpt",
    "bart", "bert", "bloom", "gpt_neo", "mamba", "mixtral",
]  # fmt: skip

ENCODERS = ("bert", "bert-generation", "big_bird", "camembert", "cpmant", "data2vec-text", "electra", "ernie", "git",
            "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
            "xlm-roberta-xl", "xmod")  # fmt: skip
# Refused, and a fragment of the one-line reason (beyond the reasons a config states by itself).
REFUSED: dict[str, str] = {
    **{t: "encoder.layer" for t in ENCODERS},  # encoders (BERT-style) that transformers can run as decoders
    "xlm": "transformer.attentions",  # an encoder whose attentions and feed-forwards sit in separate stacks
    "xlnet": "transformers cannot build",  # permutation LM without a fixed context
    "reformer": "transformers cannot build",  # its default config is not a decoder (LSH attention)
    "blt": "no num_hidden_layers",  # byte latent transformer: local and global stacks
    "hrm_text": "no stack of decoder layers",  # hierarchical recurrent reasoning
    "xlstm": "no stack of decoder layers",  # recurrent
    "rwkv": "no KV cache",  # recurrent
    "openai-gpt": "no KV cache",  # GPT-1 keeps no cache
    "trocr": "no KV cache",  # the decoder of an encoder-decoder
    "bloom": "4D attention mask",  # ALiBi built from a 2D padding mask
    "dory": "4D attention mask",  # looped layers over its own cache layout
    "emu3": "no causal LM",  # its text config has no causal-LM class
    "mllama": "no causal LM",  # cross-attention layers
    "dbrx": "transformers cannot build",  # its default config does not build (a mixture of experts)
    "dots1": "transformers cannot build",  # its default config does not build (a mixture of experts)
    "lfm2_moe": "transformers cannot build",  # its default config has no layer_types (convolution layers)
    "sarvam_moe": "merges or splits",  # transformers splits its fused query_key_value on load
    # dense decoders the contract check refuses, with the part that differs
    "gpt_neo": "the layer forward",  # local attention masked by slot, not by position
    "mpt": "the mask",  # ALiBi from key slots: a tree pass differs
    "doge": "the mask",  # dynamic top-k key masks over the cache span
    "moshi": "the mask",  # transformers' forward ignores its sliding window, its cache applies it
}
DEFAULT_DOES_NOT_LOAD = {"gemma4_assistant"}  # transformers' default config fails its own validation

PROMPT = [5, 17, 33, 90, 12, 7, 64, 3, 41]  # longer than every tiny window
NEW_TOKENS = 6


def states_by_itself(config, msg: str) -> bool:
    """A refusal whose reason the config states by itself (checked against it, not taken from offspec)."""
    text = config.get_text_config(decoder=True) if not getattr(config, "is_encoder_decoder", False) else config
    other = {t for t in getattr(text, "layer_types", None) or () if t not in ("full_attention", "sliding_attention")}
    return ((getattr(config, "is_encoder_decoder", False) and "encoder-decoder" in msg)
            or (bool(other) and all(t in msg for t in other))
            or (bool(getattr(text, "use_bidirectional_attention", False)) and "bidirectional" in msg))


def reference(tiny):
    """transformers' own model of the checkpoint's config (a multimodal class for a multimodal config)."""
    from offspec.transformers_contract import checkpoint_model

    torch.manual_seed(0)
    return checkpoint_model(tiny).float().eval()


def plans(store) -> dict[str, ResidencyPlan]:
    man = read_manifest(store)
    b, r = man.layer_bytes, man.resident.size
    mixed = tuple(DISK if i % 2 == 0 else DEVICE for i in range(len(b)))
    return {
        "every layer on disk": plan_residency(b, r, minimum_budget_bytes(b, r, 0, 0)),
        "mixed": ResidencyPlan(mixed, tuple(b), r, 0, 0, 2, max(b)),
        "fully resident": plan_residency(b, r, 1 << 34),
    }


def comb_tree(depth: int = 6, width: int = 2):
    from offspec.speculative.tree import DraftTree

    tree = DraftTree(PROMPT[-1], capacity=depth * width + 1)
    node = 0
    for d in range(depth):
        kids = tree.add(node, [(11 * d + 5 * j) % 200 + 3 for j in range(width)], [-1.0 * (d + 1)] * width)
        node = int(kids[0])
    return tree


def check_model_type(model_type: str, tmp_path) -> None:
    from offspec.runtime.family_check import check_family, shipped_verdicts

    if model_type in DEFAULT_DOES_NOT_LOAD:
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for its own default
            default_config(model_type)
        return
    config = default_config(model_type)
    shipped = shipped_verdicts().get(model_type)
    try:
        check_supported(config)
    except ModelError as exc:
        msg = str(exc)
        assert "\n" not in msg and f"'{config.model_type}'" in msg
        if "mixture-of-experts" in msg:
            pytest.skip("experts offspec does not stream by expert: see tests/runtime/test_moe.py")
        if model_type in REFUSED:
            assert REFUSED[model_type] in msg, msg
        else:
            assert states_by_itself(config, msg), f"{model_type} refused but not listed: {msg}"
        return
    if model_type in REFUSED:  # the contract check refuses it, naming the part
        verdict = check_family(config)
        assert not verdict.ok and REFUSED[model_type] in verdict.refusal(), verdict
        assert shipped is None or (not shipped.ok and shipped.part == verdict.part)
        return
    assert shipped is None or shipped.ok, f"{model_type}: shipped as refused ({shipped})"
    tiny = tiny_config(config)
    ref = reference(tiny)
    ref.save_pretrained(tmp_path / "src")
    store = convert_model(tmp_path / "src", tmp_path / "store", bits=16, dtype="float32", progress=False)
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    want = out[0, len(PROMPT):].tolist()
    for name, plan in plans(store).items():
        model = OffloadedModel(store, plan, cache_tokens=32)
        try:
            got = generate(Engine(model), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
            assert got.token_ids == want, f"{model_type}, {name}"
            if name == "mixed":
                from tests.speculative.oracles import assert_tree_logits_match_paths

                model.reset()
                model.forward(torch.tensor([PROMPT[:-1]]))
                model.supports_logit_rows = False  # the oracle compares every row
                assert_tree_logits_match_paths(model, comb_tree(), atol=1e-4, rtol=1e-4)
        finally:
            model.close()


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_representative_families(model_type, tmp_path):
    assert model_type in EVERY or model_type not in causal_lm_mapping()
    check_model_type(model_type, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", EVERY)
def test_every_causal_lm_family_runs_or_is_refused_with_its_reason(model_type, tmp_path):
    check_model_type(model_type, tmp_path)


@pytest.mark.parametrize("model_type", ["mistral3", "llava"])
def test_multimodal_checkpoints_run_as_their_text_decoder(model_type, tmp_path):
    """Image-text-to-text checkpoints (not causal LMs to transformers' auto mapping) whose text model sits under
    model.language_model: the text decoder runs, greedy equal to the multimodal model's own on text."""
    check_model_type(model_type, tmp_path)


def test_the_listed_refusals_are_families_transformers_ships():
    """A family that leaves transformers leaves the list (so the list only names what is tested)."""
    gone = sorted(set(REFUSED) - set(EVERY))
    assert not gone, f"no longer in transformers {transformers_version()}: {gone}"
