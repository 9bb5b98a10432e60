"""The contract check: a family that works is accepted; families whose forward was deliberately broken are refused
with the part that differs named; verdicts are kept per transformers version and reused; the loader checks a
model's family before anything converts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from offspec.errors import ModelError
from offspec.runtime import family_check
from offspec.runtime.family_check import PARTS, check_family, ensure_family, shipped_verdicts, stored_verdict
from offspec.transformers_contract import transformers_version

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


# ------------------------------------------------------------------ deliberately broken families
class WorkingConfig(LlamaConfig):
    model_type = "offspec_test_working"


class WorkingForCausalLM(LlamaForCausalLM):
    config_class = WorkingConfig


class BrokenHeadConfig(LlamaConfig):
    model_type = "offspec_test_broken_head"


class BrokenHeadForCausalLM(LlamaForCausalLM):
    """The head reads the tokens, not only the final hidden states."""

    config_class = BrokenHeadConfig

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits + 0.1 * input_ids[..., None].float()
        return out


class BrokenLayerConfig(LlamaConfig):
    model_type = "offspec_test_broken_layer"


class BrokenLayerModel(LlamaModel):
    """The model forward reads layer 0's weights outside layer 0's forward (a streamed layer is not bound then)."""

    config_class = BrokenLayerConfig

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds = inputs_embeds + self.layers[0].mlp.up_proj.weight.mean()
        return super().forward(inputs_embeds=inputs_embeds, cache=cache, **kwargs)


class BrokenLayerForCausalLM(LlamaForCausalLM):
    config_class = BrokenLayerConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = BrokenLayerModel(config)
        self.post_init()


class BrokenCacheConfig(LlamaConfig):
    model_type = "offspec_test_broken_cache"


class StatefulAttention(LlamaAttention):
    """Keeps state between calls instead of in the cache: only a model's first forward is right."""

    def forward(self, hidden_states, *args, **kwargs):
        out, weights = super().forward(hidden_states, *args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        return out * (1.5 if self.calls > 1 else 1.0), weights


class BrokenCacheForCausalLM(LlamaForCausalLM):
    config_class = BrokenCacheConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.__class__ = StatefulAttention


class BrokenMaskConfig(Qwen2Config):
    model_type = "offspec_test_broken_mask"


class BrokenMaskModel(Qwen2Model):
    """Given masks by layer type, gives its sliding-window layers the full one."""

    config_class = BrokenMaskConfig

    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        if isinstance(attention_mask, dict):
            attention_mask = {kind: attention_mask["full_attention"] for kind in attention_mask}
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)


class BrokenMaskForCausalLM(Qwen2ForCausalLM):
    config_class = BrokenMaskConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = BrokenMaskModel(config)
        self.post_init()


for _cfg, _model in ((WorkingConfig, WorkingForCausalLM), (BrokenHeadConfig, BrokenHeadForCausalLM),
                     (BrokenLayerConfig, BrokenLayerForCausalLM), (BrokenCacheConfig, BrokenCacheForCausalLM),
                     (BrokenMaskConfig, BrokenMaskForCausalLM)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)

BROKEN = {
    "head": BrokenHeadConfig(**SMALL),
    "layer forward": BrokenLayerConfig(**SMALL),
    "cache": BrokenCacheConfig(**SMALL),
    "mask": BrokenMaskConfig(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch, tmp_path):
    """A home of its own and no verdicts remembered from other tests."""
    monkeypatch.setenv("OFFSPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(family_check, "_MEMO", {})


def test_a_family_that_works_is_accepted():
    verdict = check_family(WorkingConfig(**SMALL))
    assert verdict.ok and verdict.part is None and verdict.transformers == transformers_version()
    assert 0 < verdict.seconds < 60


@pytest.mark.parametrize("part", list(BROKEN))
def test_a_broken_family_is_refused_naming_the_part_that_differs(part):
    assert part in PARTS
    verdict = check_family(BROKEN[part])
    assert not verdict.ok and verdict.part == part, verdict
    line = verdict.refusal()
    assert "\n" not in line and f"in the {part} (" in line and BROKEN[part].model_type in line


def test_the_verdict_is_kept_per_transformers_version_and_reused(monkeypatch, tmp_path, capsys):
    config = WorkingConfig(**SMALL)
    assert stored_verdict(config.model_type) is None
    assert ensure_family(config).ok
    assert "checked the offspec_test_working family" in capsys.readouterr().err  # said once, on first use
    kept = json.loads((tmp_path / "home" / "families" / f"transformers-{transformers_version()}.json").read_text())
    assert kept["offspec_test_working"]["ok"] is True and kept["offspec_test_working"]["seconds"] > 0

    monkeypatch.setattr(family_check, "_MEMO", {})  # a later process: read back from the home, not checked again
    monkeypatch.setattr(family_check, "check_family", lambda config: pytest.fail("checked twice"))
    assert ensure_family(config).ok
    assert capsys.readouterr().err == ""


def test_a_refused_family_fails_in_one_line_naming_the_part():
    with pytest.raises(ModelError) as err:
        ensure_family(BROKEN["head"], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unsupported architecture 'offspec_test_broken_head': ")
    assert "in the head (" in msg and transformers_version() in msg


def test_families_shipped_as_verified_for_this_transformers_are_not_checked_again(monkeypatch):
    shipped = shipped_verdicts()
    if "llama" not in shipped:
        pytest.skip(f"no verdicts shipped for transformers {transformers_version()}")
    monkeypatch.setattr(family_check, "check_family", lambda config: pytest.fail("a shipped family was checked"))
    assert ensure_family(AutoConfig.for_model("llama", **SMALL)).ok


def test_structural_refusals_come_before_the_check(monkeypatch):
    monkeypatch.setattr(family_check, "check_family", lambda config: pytest.fail("checked"))
    with pytest.raises(ModelError, match="mixture-of-experts"):
        ensure_family(AutoConfig.for_model("jetmoe", **SMALL))


def test_the_loader_checks_a_family_before_converting_it(tmp_path):
    from offspec.loader import check_family

    torch.manual_seed(0)
    folder = tmp_path / "broken"
    BrokenHeadForCausalLM(BROKEN["head"]).save_pretrained(folder)
    with pytest.raises(ModelError, match="in the head"):
        check_family(str(folder), progress=False)
    assert not (tmp_path / "home" / "stores").exists()
