"""offspec's whole contract with transformers' internals, in one place.

offspec runs a family's own model forward (`CausalLM.model`: embeddings, rotary, decoder layers, final
norm) with a KV cache of its own. What it relies on:
- the model forward's public arguments: `input_ids`, `attention_mask` given as a prepared additive
  float 4D mask `[1, 1, q, kv]` (used as given), or, for families with mixed layer types, a dict
  `{"full_attention": m, "sliding_attention": m}`; explicit `position_ids`; `use_cache=True`; and
  the cache under `cache` (from 5.24) or `past_key_values` (before; the old name is deprecated until 5.40);
  the output's `last_hidden_state` is the final-normed hidden states;
- the cache protocol: attention modules call `cache.update(key, value, layer_idx, ...)`; the extra
  arguments changed between releases (`cache_kwargs` positional before 5.24, `kwargs=` from 5.24) and
  are ignored here (offspec positions come from the model, not the cache); `get_seq_length()`;
- decoder layers called one by one (the contract test) take the same cache argument name, a mask and
  `position_embeddings=(cos, sin)` from `rotary(hidden, position_ids)`.
The contract test runs a real decoder layer and model forward of each supported family against
transformers' own DynamicCache.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

# The transformers releases the test suite passed on (see docs/dependencies.md to move them).
TESTED_RANGE = ("5.0.0", "5.24.0")


class ContractError(RuntimeError):
    """The installed transformers no longer behaves as offspec relies on."""


def transformers_version() -> str:
    """The installed transformers version, read from its metadata (no import)."""
    from importlib.metadata import version

    return version("transformers")


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if len(out) == 3:
            break
    return tuple(out)


def in_tested_range(version: str | None = None) -> bool:
    v = _vtuple(version or transformers_version())
    return _vtuple(TESTED_RANGE[0]) <= v <= _vtuple(TESTED_RANGE[1])


def warn_if_untested(stream=None) -> bool:
    """One stderr line when the installed transformers lies outside the tested range; True if warned."""
    v = transformers_version()
    if in_tested_range(v):
        return False
    print(f"warning: transformers {v} is outside the range offspec was tested with "
          f"({TESTED_RANGE[0]} to {TESTED_RANGE[1]}); continuing", file=stream or sys.stderr)
    return True


@lru_cache(maxsize=None)
def cache_arg_name(layer_cls: type) -> str:
    """The keyword a decoder layer (or model forward) takes its KV cache under: 'cache' or 'past_key_values'."""
    params = inspect.signature(inspect.unwrap(layer_cls.forward)).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ContractError(
        f"transformers {transformers_version()}: {layer_cls.__name__}.forward takes neither 'cache' nor "
        "'past_key_values' (the cache argument of decoder layers changed)")


def run_decoder(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor,
                cache) -> torch.Tensor:
    """Run a family's inner model forward over offspec's cache; the final-normed hidden states [1, T, hidden]."""
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                  **{cache_arg_name(type(decoder)): cache})
    return out.last_hidden_state


def layer_position_embeddings(decoder: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                              layer_idx: int):
    """(cos, sin) for one decoder layer: the rotary takes the layer's type when it has one per type (Gemma 3)."""
    rotary = decoder.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, position_ids, decoder.config.layer_types[layer_idx])
    return rotary(hidden, position_ids)


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, *, mask: torch.Tensor, position_ids: torch.Tensor,
               position_embeddings, cache) -> torch.Tensor:
    """Run one transformers decoder layer over offspec's cache; returns the hidden states."""
    out = layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=True,
                position_embeddings=position_embeddings, **{cache_arg_name(type(layer)): cache})
    return out[0] if isinstance(out, tuple) else out


def causal_lm_mapping() -> dict[str, str]:
    """model_type -> the class name transformers' AutoModelForCausalLM builds for it (its public auto mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def knows_model_type(model_type: str) -> bool:
    """Whether the installed transformers has a config class for a model_type (its auto mapping, with the types
    registered through AutoConfig.register)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def causal_lm_class_name(model_type: str) -> str | None:
    return causal_lm_mapping().get(model_type)


def text_config(config):
    """The config of a model's text decoder: the config itself, or the text part of a multimodal one."""
    return config.get_text_config(decoder=True)


def decoder_layer_stack(causal_lm: torch.nn.Module, num_layers: int) -> tuple[str | None, torch.nn.ModuleList | None]:
    """(qualified name, module) of the ModuleList holding a causal LM's num_layers decoder layers, e.g.
    ("model.layers", ...) or ("transformer.h", ...); (None, None) if there is none."""
    for name, mod in causal_lm.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers and name.startswith(
                causal_lm.base_model_prefix + "."):
            return name, mod
    return None, None


def tie_unbound_weights(causal_lm: torch.nn.Module) -> list[str]:
    """Parameters still on the meta device that transformers ties to another (the head to the embeddings), bound to
    it as transformers' tying does; returns their names. `all_tied_weights_keys` is what `post_init` records."""
    tied = dict(getattr(causal_lm, "all_tied_weights_keys", None) or {})
    out = causal_lm.get_output_embeddings()
    if not tied and out is not None and out.weight.is_meta:  # older classes: the output embeddings are the tie
        names = {id(p): n for n, p in causal_lm.named_parameters()}
        source = causal_lm.get_input_embeddings().weight
        if id(out.weight) in names and id(source) in names:
            tied = {names[id(out.weight)]: names[id(source)]}
    done = []
    for target, source in tied.items():
        mod_name, _, leaf = target.rpartition(".")
        mod = causal_lm.get_submodule(mod_name) if mod_name else causal_lm
        if getattr(mod, leaf) is not None and getattr(mod, leaf).is_meta:
            src = causal_lm.get_parameter(source)
            if not src.is_meta:
                mod._parameters[leaf] = src
                done.append(target)
    return done


@lru_cache(maxsize=1)
def _given_output_class() -> type:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class GivenOutput(BaseModelOutputWithPast):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return GivenOutput


def _given_output(hidden: torch.Tensor):
    """The base model's output as a causal LM reads it: the final hidden states, nothing else (None for any other
    field the class may read, e.g. a MoE model's router logits)."""
    return _given_output_class()(last_hidden_state=hidden)


class _GivenHiddenStates(torch.nn.Module):
    """Stands in for a causal LM's base model: returns the final hidden states it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return _given_output(self.hidden)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # a causal LM that calls a part of its base model (OPT: `self.model.decoder`)
            if name.startswith("_"):
                raise
            return self


class HeadRunner:
    """A causal LM's own forward from final hidden states to logits: its lm_head and whatever the class does after
    it (Gemma's final soft-capping, Granite's logit divisor, Cohere's logit scale, ...), run by transformers' code.

    A shallow copy of the causal LM whose base model returns the given hidden states; the head's parameters are the
    causal LM's own (bound later, tied or not)."""

    def __init__(self, causal_lm: torch.nn.Module) -> None:
        import copy

        self._given = _GivenHiddenStates()
        self._causal_lm, self._prefix = causal_lm, causal_lm.base_model_prefix
        self._lm = copy.copy(causal_lm)
        self._lm._modules = dict(causal_lm._modules)
        self._lm._modules[self._prefix] = self._given
        params = inspect.signature(inspect.unwrap(type(causal_lm).forward)).parameters
        self._kwargs = {"logits_to_keep": 0} if "logits_to_keep" in params else {}
        if "use_cache" in params:
            self._kwargs["use_cache"] = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of final hidden states [..., hidden] (any leading shape: one position, rows of a tree,
        a batch), in the model's dtype. The head runs over them as one sequence of positions."""
        for name, mod in self._causal_lm._modules.items():  # the causal LM's head may be replaced after (a draft's)
            if name != self._prefix and self._lm._modules.get(name) is not mod:
                self._lm._modules[name] = mod
        lead = hidden.shape[:-1]
        self._given.hidden = flat = hidden.reshape(1, -1, hidden.shape[-1])
        # placeholder ids: a head may read how many positions there are (Gemma 4), never which tokens
        ids = torch.zeros(flat.shape[:2], dtype=torch.long, device=hidden.device)
        try:
            logits = self._lm(input_ids=ids, **self._kwargs).logits
        finally:
            self._given.hidden = None
        return logits.reshape(*lead, logits.shape[-1])


class _KVRecorder:
    """A cache that only records the key and value shapes each layer writes (for a forward on the meta device)."""

    is_compileable = False

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.shapes[layer_idx] = (tuple(key_states.shape), tuple(value_states.shape))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def kv_shapes(causal_lm: torch.nn.Module) -> dict[int, tuple[tuple[int, int], tuple[int, int]]]:
    """Per decoder layer that writes the KV cache: ((key heads, key dim), (value heads, value dim)), found by running
    the model's own forward on the meta device (no memory, no compute) over one token with a recording cache.
    Layers that reuse another layer's keys (KV sharing) write nothing and are absent."""
    base = causal_lm.base_model
    meta = torch.device("meta")
    cache = _KVRecorder()
    one = torch.zeros(1, 1, dtype=torch.long, device=meta)
    mask = torch.zeros(1, 1, 1, 1, device=meta, dtype=next(causal_lm.parameters()).dtype)
    types = getattr(base.config, "layer_types", None)
    # routed experts pick their rows by value (nonzero), which the meta device cannot do: they answer zeros here
    muted = [mod for name, mod in base.named_modules() if name.rsplit(".", 1)[-1].startswith("experts")
             and _is_experts(mod)]
    for mod in muted:
        mod.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
    try:
        with torch.no_grad():
            try:
                run_decoder(base, one, {t: mask for t in set(types)} if types else mask, one, cache)
            except (TypeError, AttributeError, KeyError):  # a forward that takes one mask whatever its layer types
                run_decoder(base, one, mask, one, cache)
    finally:
        for mod in muted:
            del mod.forward
    return {i: ((k[1], k[3]), (v[1], v[3])) for i, (k, v) in cache.shapes.items()}



def checkpoint_model(config):
    """The model transformers builds for a checkpoint's config (random weights, on the current device): its causal
    LM, or for a multimodal config whose class is not one (Mistral 3) its image-text-to-text model, else (a tower
    that needs another library) its text decoder's causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto, cfg in ((AutoModelForCausalLM, config), (AutoModelForImageTextToText, config),
                      (AutoModelForCausalLM, text_config(config))):
        try:
            return auto.from_config(cfg)
        except (ValueError, ImportError):
            if cfg is not config:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class ExpertsModule:
    """A layer's routed experts as transformers holds them: one module whose parameters are [num_experts, ...]
    tensors, called as `experts(hidden_states, top_k_index, top_k_weights)` by its MoE block."""

    path: str  # relative to the decoder layer, e.g. "mlp.experts"
    num_experts: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter leaf, one expert's shape) in the module's order

    def names(self) -> list[str]:
        """Layer-relative names of the module's parameters, e.g. "mlp.experts.gate_up_proj"."""
        return [f"{self.path}.{leaf}" for leaf, _ in self.shapes]


def experts_module(layer: torch.nn.Module) -> ExpertsModule | None:
    """The fused experts module of a decoder layer, or None for a dense layer (or experts of another kind)."""
    for path, mod in layer.named_modules():
        if path.rsplit(".", 1)[-1].startswith("experts") and _is_experts(mod):
            n = int(mod.num_experts)
            return ExpertsModule(path, n, tuple((leaf, tuple(p.shape[1:])) for leaf, p in
                                                mod.named_parameters(recurse=False)))
    return None


def _is_experts(mod: torch.nn.Module) -> bool:
    """A fused experts module: `num_experts`, and every parameter its own, [num_experts, ...], matrices among them
    (a router's [num_experts, hidden] weight is not one)."""
    n = getattr(mod, "num_experts", None)
    params = list(mod.named_parameters(recurse=False))
    return (isinstance(n, int) and n >= 1 and bool(params) and len(params) == len(list(mod.parameters()))
            and all(p.ndim >= 2 and p.shape[0] == n for _, p in params) and any(p.ndim >= 3 for _, p in params))


class CheckpointNames:
    """Checkpoint tensor names -> the names of the model transformers builds for the checkpoint's config, by
    transformers' own conversion mapping (the renames it applies when loading: original layouts such as EXAONE's
    `transformer.h`, multimodal prefixes, a checkpoint saved without its base model's prefix).

    Built from the model on the meta device. Tensors that transformers merges or splits on load (its weight
    converters) cannot be streamed one at a time: `name` raises ContractError for them."""

    def __init__(self, config) -> None:
        with torch.device("meta"):
            model = checkpoint_model(config)
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # a transformers without load-time renames: checkpoints are named as their models
            self._renamings, self._converters, self._rename = [], [], None
        else:
            mapping = get_model_conversion_mapping(model)
            self._renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
            self._converters = [t for t in mapping if isinstance(t, WeightConverter)]
            self._rename = rename_source_key
        self._prefix = model.base_model_prefix
        self._names = {n: True for n in model.state_dict()}
        # 2-D weights of decoder layers held by other modules than nn.Linear (routers): an NF4 store keeps them
        self.not_linear = frozenset(
            f"{mod_name}.{leaf}" for mod_name, mod in model.named_modules() if not isinstance(mod, torch.nn.Linear)
            for leaf, p in mod.named_parameters(recurse=False) if leaf == "weight" and p.ndim == 2
            and ".layers." in f".{mod_name}" and not _is_experts(mod))
        self.experts: dict[int, ExpertsModule] = {}  # decoder layer -> its routed experts (MoE layers only)
        self.expert_params: dict[str, tuple[int, str]] = {}  # full parameter name -> (layer, name in the layer)
        n = int(getattr(text_config(config), "num_hidden_layers", 0) or 0)
        path, layers = decoder_layer_stack(model, n) if n else (None, None)
        for i, layer in enumerate(layers or ()):
            if (found := experts_module(layer)) is not None:
                self.experts[i] = found
                for rel in found.names():
                    self.expert_params[f"{path}.{i}.{rel}"] = (i, rel)
        self.parameters = frozenset(n for n, _ in model.named_parameters(remove_duplicate=False))
        self.state = frozenset(self._names)  # parameters and persistent buffers: what a checkpoint may hold
        self.model_class = type(model).__name__

    def expert_piece(self, key: str) -> tuple[str, int, int, int] | None:
        """For one expert's tensor that transformers stacks into a fused experts parameter on load (per-expert
        checkpoints: `mlp.experts.3.gate_proj.weight`): (the parameter's full name, expert, piece, pieces), where the
        expert's slice of the parameter is its pieces concatenated along their first dimension. None otherwise."""
        if self._rename is None:
            return None
        renamed, pattern = self._rename(key, self._renamings, self._converters, self._prefix, self._names)
        if pattern is None or renamed not in self.expert_params:
            return None
        conv = next((c for c in self._converters if pattern in c.source_patterns), None)
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(conv, "operations", ())]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            return None
        regex = re.escape(pattern).replace(r"\*", r"(\d+)")
        m = re.search(regex, key)
        if m is None or not m.groups():
            return None
        return renamed, int(m.group(1)), conv.source_patterns.index(pattern), len(conv.source_patterns)

    def name(self, key: str) -> str:
        """The model's name for a checkpoint tensor (unchanged when nothing applies)."""
        if self._rename is None:
            return key if key in self._names or f"{self._prefix}.{key}" not in self._names else f"{self._prefix}.{key}"
        renamed, converter = self._rename(key, self._renamings, self._converters, self._prefix, self._names)
        if converter is not None:
            raise ContractError(f"transformers {transformers_version()} merges or splits {key} ({converter}) when "
                                f"loading {self.model_class}, which offspec cannot convert one tensor at a time")
        if renamed not in self._names and key in self._names:
            return key
        return renamed


class CacheProtocol:
    """Mixin for offspec caches: the methods transformers' attention and masking code call on a cache."""

    is_compileable = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.write(key_states, value_states, layer_idx)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# GGUF: transformers' GGUF loader, applied one tensor at a time.
#
# transformers turns a GGUF into a model in three steps that offspec reuses, and one it does not:
# - config and tokenizer from the file's metadata (public: `AutoConfig` / `AutoTokenizer` with `gguf_file=`);
# - the GGUF -> HF tensor name map (`modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`, built from a model
#   instantiated on the meta device);
# - per-family tensor fixes (`TENSOR_PROCESSORS`: llama/mistral Q/K un-permute, Gemma norms minus 1, ...),
#   each called on one dequantized float32 array, as transformers' own loop does;
# - not reused: its loop, which dequantizes every tensor of the file into memory before building the model.
#   offspec dequantizes with the `gguf` library (what that loop calls), one tensor at a time.
# Mixture-of-experts files hold each projection of a layer's experts as one merged tensor (llama.cpp's
# `blk.N.ffn_{gate,up,down}_exps`, [n_expert, ...]). transformers' processor places it inside its model's fused
# expert parameter (`mlp.experts.gate_up_proj`: gate first, up second); its checkpoint conversion mapping names
# the per-expert tensors that fused parameter is merged from (`mlp.experts.{e}.gate_proj.weight`). offspec reads
# both (`GgufTensorMap.expert_names`) to give each expert's slice of a merged tensor its checkpoint name.
# Architectures that transformers moved to its newer GGUF path (weight converters, e.g. qwen3.5, lfm2) are
# refused with a clear line rather than converted with the legacy processors.
# ---------------------------------------------------------------------------------------------------------------


def _gguf_legacy():
    """transformers' legacy GGUF module, or ContractError naming the installed version."""
    try:
        import transformers.modeling_gguf_pytorch_utils as legacy

        for attr in ("get_gguf_hf_weights_map", "TENSOR_PROCESSORS", "TensorProcessor"):
            getattr(legacy, attr)
    except (ImportError, AttributeError) as exc:
        raise ContractError(
            f"transformers {transformers_version()}: its GGUF name map and tensor processors "
            f"(modeling_gguf_pytorch_utils) are not where offspec expects them ({exc})") from None
    return legacy


def gguf_newer_path_archs() -> frozenset[str]:
    """GGUF architectures transformers converts through its newer weight-converter path (none before 5.24)."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        return frozenset()
    return frozenset(GGUF_ARCHS)


def gguf_config(path):
    """The transformers config a GGUF file describes (read from its metadata by transformers)."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def gguf_tokenizer(path):
    """The tokenizer a GGUF file embeds, built by transformers."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _fewer_layers(config, n: int):
    """A copy of config with n decoder layers (per-layer lists cut to match)."""
    import copy

    total = int(config.num_hidden_layers)
    small = copy.deepcopy(config)
    for key, value in list(vars(small).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(small, key, value[:n])
    small.num_hidden_layers = n
    return small


def _repeat_layers(names: dict[str, str], n: int) -> dict[str, str] | None:
    """The GGUF -> HF map of layers 0 and 1 extended to n layers; None if the two layers differ in pattern."""
    import re

    per_layer: dict[int, set[tuple[str, str]]] = {0: set(), 1: set()}
    out = {}
    for gguf_name, hf_name in names.items():
        g, h = re.match(r"^blk\.(\d+)\.(.*)$", gguf_name), re.match(r"^(.*?)layers\.(\d+)\.(.*)$", hf_name)
        if g is None and h is None:
            out[gguf_name] = hf_name
        elif g is not None and h is not None and g.group(1) == h.group(2) and int(g.group(1)) in per_layer:
            per_layer[int(g.group(1))].add((g.group(2), h.group(1), h.group(3)))
        else:
            return None
    if per_layer[0] != per_layer[1]:
        return None
    for i in range(n):
        for g_rest, h_prefix, h_rest in per_layer[0]:
            out[f"blk.{i}.{g_rest}"] = f"{h_prefix}layers.{i}.{h_rest}"
    return out


class GgufTensorMap:
    """GGUF tensor name -> HF name, and the family's tensor fix, for one file's architecture and config."""

    def __init__(self, architecture: str, config) -> None:
        legacy = _gguf_legacy()
        self.architecture = architecture
        if architecture in gguf_newer_path_archs():
            raise ContractError(
                f"transformers {transformers_version()} loads GGUF architecture {architecture!r} through its "
                "newer weight-converter path, which offspec does not stream yet")
        from transformers import AutoModelForCausalLM

        processor_cls = legacy.TENSOR_PROCESSORS.get(architecture, legacy.TensorProcessor)
        self.processor = processor_cls(config=config.to_dict())
        n = int(config.num_hidden_layers)
        try:
            # The map of a two-layer skeleton, repeated for every layer: gguf-py's name table and a meta
            # model of the whole network cost memory that grows with its depth. Layers whose names differ from the
            # pattern of the first two fall back to the whole skeleton.
            names = self._map(legacy, AutoModelForCausalLM, _fewer_layers(config, min(n, 2)), min(n, 2))
            self.names = _repeat_layers(names, n) if n > 2 else names
            if self.names is None:
                self.names = self._map(legacy, AutoModelForCausalLM, config, n)
        except ContractError:
            raise
        except Exception as exc:  # NotImplementedError for an arch gguf-py does not know, and API drift
            raise ContractError(
                f"transformers {transformers_version()}: cannot map the GGUF tensor names of "
                f"{architecture!r} ({type(exc).__name__}: {exc})") from None

    def _map(self, legacy, auto_cls, config, num_layers: int) -> dict[str, str]:
        with torch.device("meta"):
            skeleton = auto_cls.from_config(config)
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter
        except ImportError:  # a transformers without load-time conversions: no per-expert checkpoint names
            self._converters = []
        else:
            self._converters = [t for t in get_model_conversion_mapping(skeleton) if isinstance(t, WeightConverter)]
        return legacy.get_gguf_hf_weights_map(skeleton, self.processor, num_layers=num_layers)

    def expert_names(self, gguf_name: str, num_experts: int) -> list[str] | None:
        """The checkpoint names of each expert's slice of a merged expert tensor (`blk.N.ffn_gate_exps.weight`,
        [num_experts, ...]), e.g. `model.layers.N.mlp.experts.{e}.gate_proj.weight`; None for other tensors.

        ContractError when transformers does not load the tensor, or loads it in a way other than placing each
        expert's slice unchanged in its model's fused parameter (then the slices cannot be converted one by one)."""
        import re

        m = re.match(r"^(?P<base>blk\.\d+\.ffn_\w+_exps)\.(?:weight|bias)$", gguf_name)
        if m is None:
            return None
        model_name = self.names.get(gguf_name) or self.names.get(m["base"])
        who = f"transformers {transformers_version()}"
        if model_name is None:
            raise ContractError(f"{who} does not load the merged expert tensor {gguf_name} of GGUF architecture "
                                f"{self.architecture!r} (its GGUF loader has no map for these experts; Mixtral "
                                "GGUFs, for one, are written as 'llama')")
        part, parts, dim = self._expert_placement(gguf_name, num_experts)
        for conv in self._converters:
            targets, sources = list(conv.target_patterns), list(conv.source_patterns)
            if len(targets) != 1 or targets[0] not in model_name or len(sources) != parts:
                continue
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
            if ops != [("MergeModulelist", 0)] + ([("Concatenate", dim)] if parts > 1 else []):
                continue
            source = sources[part]
            names = [model_name.replace(targets[0], source.replace("*", str(e)), 1) for e in range(num_experts)]
            if conv.rename_source_key(names[-1]) == (model_name, source):
                return names
        raise ContractError(f"{who}: no per-expert checkpoint names for {model_name} (part {part + 1} of {parts}) "
                            f"in its conversion mapping, so offspec cannot split {gguf_name} by expert")

    def _run_processor(self, gguf_name: str, weights):
        """(result, parsed tensors) of transformers' GGUF tensor processor on one array; ContractError if it fails."""
        scratch: dict = {"tensors": {}}
        try:
            result = self.processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self.names,
                                            parsed_parameters=scratch)
        except Exception as exc:
            raise ContractError(
                f"transformers {transformers_version()}: its GGUF tensor processor "
                f"{type(self.processor).__name__} failed on {gguf_name} ({type(exc).__name__}: {exc})") from None
        return result, scratch

    def _expert_placement(self, gguf_name: str, num_experts: int) -> tuple[int, int, int]:
        """(part, parts, dim): where transformers' processor puts a merged expert tensor in its fused parameter:
        part `part` of `parts` equal parts along `dim`; ContractError if it changes the values or splits them."""
        import numpy as np

        probe = np.arange(num_experts * 15, dtype=np.float32).reshape(num_experts, 3, 5)
        if gguf_name.endswith(".bias"):
            probe = probe[:, :, 0].copy()
        result, scratch = self._run_processor(gguf_name, probe)
        placed = list(scratch["tensors"].values())
        if result.name is not None and not placed:
            out = torch.as_tensor(np.asarray(result.weights))
        elif result.name is None and len(placed) == 1:
            out = placed[0]
        else:
            out = None
        want = torch.from_numpy(probe)
        if out is not None and out.dim() == want.dim():
            grown = [d for d in range(want.dim()) if out.shape[d] != want.shape[d]]
            if not grown and torch.equal(out, want):
                return 0, 1, 0
            if len(grown) == 1 and out.shape[grown[0]] % want.shape[grown[0]] == 0:
                d, size = grown[0], want.shape[grown[0]]
                for part in range(out.shape[d] // size):
                    if torch.equal(out.narrow(d, part * size, size), want):
                        return part, out.shape[d] // size, d
        raise ContractError(f"transformers {transformers_version()}: {type(self.processor).__name__} transforms "
                            f"{gguf_name} across experts, which offspec cannot convert one expert at a time")

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF parameter name of a GGUF tensor, or None for tensors transformers drops (e.g. rope_freqs)."""
        return self.names.get(gguf_name)

    def process(self, gguf_name: str, weights):
        """The family's fix applied to one dequantized float32 array; returns (hf_name or None, array)."""
        result, scratch = self._run_processor(gguf_name, weights)
        if result.name is None or scratch["tensors"]:
            raise ContractError(
                f"transformers {transformers_version()}: {type(self.processor).__name__} merges or renames "
                f"{gguf_name} across tensors, which offspec cannot convert one tensor at a time")
        return self.names.get(result.name), result.weights
