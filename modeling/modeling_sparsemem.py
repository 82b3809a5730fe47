"""Sparsemem causal LMs for the Llama, Mistral, Qwen2 and Qwen3 families.

Each class is its base family's `*ForCausalLM` with the attention modules replaced by sparse-memory
ones that keep the base parameter names, so base checkpoints load unchanged. The attention call goes
through `ALL_ATTENTION_FUNCTIONS`; the default implementation is "sparsemem" (three-tier attention),
and any other registered implementation ("sdpa", "eager", ...) gives the base model's dense attention.
"""

import functools
import inspect
import logging
import os

import torch
from transformers import GenerationConfig, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, load_state_dict
from transformers.utils import GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from .attention import ATTENTION_NAME, FAST_PATH_OPTIONS, AttentionStats, MemoryView, register_attention
from .block_consolidation import BlockConsolidator, BlockSlotCache, block_slots, build_consolidator
from .block_decode import BlockSummaryCache
from .cache import SparseMemCache
from .slots import SlotTier
from .call_context import dense_mask, settings_for
from .configuration_sparsemem import (
    SparseMemLlamaConfig,
    SparseMemMistralConfig,
    SparseMemQwen2Config,
    SparseMemQwen3Config,
)
from .learned_scorer import LearnedBlockScorer, build_scorer
from .placement import Placement
from .decode_graph import DecodeGraph
from .static_cache import StaticSparseMemCache
from .static_decode import selection_width, static_decode_attention

logger = logging.getLogger(__name__)

# transformers renamed the models' `past_key_values` argument to `cache` (5.2x, the old name deprecated);
# accept both from callers and hand the cache on under the name the installed version expects
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _given_cache(past_key_values, cache):
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not two different ones")
    return cache if cache is not None else past_key_values


def _continuation_mask(cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask that makes `generate` read `input_ids` right for a cache already holding tokens.

    transformers takes `input_ids` as the whole sequence (the cached tokens first) unless the mask is
    longer than them, which marks new tokens only. A compacted or loaded document is usually continued
    with the new tokens alone, so when the ids do not start with the cached tokens, the mask is extended
    over the cache (with ones: the cache holds no padding of its own).
    """
    past, new = cache.get_seq_length(), input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape[1] != new:
        return attention_mask  # already the mask of the whole sequence
    prefix = cache.holds_prefix_of(input_ids) if new > past else False
    if prefix is None:
        raise ValueError(
            f"`input_ids` ({new} tokens) are longer than the cache ({past} tokens), whose token ids are not known, "
            "so it is unclear whether they repeat the cached tokens: pass an `attention_mask` over the cached and "
            "the new tokens to give only new tokens"
        )
    if prefix:
        return attention_mask
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ones = attention_mask.new_ones(attention_mask.shape[0], past)
    return torch.cat([ones, attention_mask], dim=1)


def _online_compaction(generation_config, max_kv_tokens, config):
    """The `OnlineCompaction` that `generate` runs under: `max_kv_tokens` (the keyword, else the generation
    config's) and the generation config's `kv_compaction` options (`OnlineCompaction` fields)."""
    from dataclasses import fields

    from .online_compaction import OnlineCompaction

    if max_kv_tokens is None:
        max_kv_tokens = getattr(generation_config, "max_kv_tokens", None)
    options = getattr(generation_config, "kv_compaction", None)
    if max_kv_tokens is None:
        if options:
            raise ValueError("generation config: `kv_compaction` options need `max_kv_tokens` (the budget they compact to)")
        return None
    if getattr(generation_config, "cache_implementation", None) is not None:
        raise ValueError(
            f"`max_kv_tokens` runs on a SparseMemCache: it cannot be combined with "
            f"cache_implementation={generation_config.cache_implementation!r}"
        )
    options = dict(options or {})
    allowed = {f.name for f in fields(OnlineCompaction)} - {"max_kv_tokens"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"generation config: unknown `kv_compaction` option(s) {unknown}; choose from {sorted(allowed)}")
    options.setdefault("keep_first", getattr(config, "sink_tokens", 16))
    return OnlineCompaction(max_kv_tokens, **options)


class SparseMemAttentionMixin:
    """Forward pass of a family attention module with logical positions and the slot tier.

    Owns the per-layer places of the learned modules: `scorer` (block relevance; a `LearnedBlockScorer`
    with `scorer="learned"`) and `consolidator` (slots of complete blocks; a `BlockConsolidator` with
    `block_slots` set, else None). Options come from the config; per-call settings (a dense pass, a hook
    on the queries) from `call_context.call_settings`.
    """

    is_sparsemem_attention = True  # what `call_settings` looks for among a model's modules

    def _init_sparsemem(self) -> None:
        self.scorer = build_scorer(self.config)
        self.consolidator = build_consolidator(self.config)
        self.sparsemem_stats = AttentionStats()
        # Qwen2/Qwen3 set `sliding_window` per layer type; Mistral keeps it on the config
        self.attention_window = (
            self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
        )

    def _with_block_slots(self, slots, layer, key, value, key_positions, contiguous, device):
        """`slots` plus the consolidator's slots of every complete block (kept across decode steps by a cache
        layer whose keys are positions 0..N-1)."""
        if self.consolidator is None or self.config.top_k_blocks is None:  # dense-equivalent: no block is ever unselected
            return slots
        if layer is not None and hasattr(layer, "block_slot_cache") and contiguous:
            if layer.block_slot_cache is None:
                layer.block_slot_cache = BlockSlotCache(self.config.block_size)
            learned = layer.block_slot_cache.refresh(self.consolidator, key, value, device)
        else:
            learned = block_slots(self.consolidator, key, value, None if contiguous else key_positions)
            learned = None if learned is None else learned.to(device)
        return slots if learned is None else SlotTier.cat(slots, learned)

    def _placement(self, cache, layer, query_positions) -> Placement | None:
        """The memory placement of this pass (placement.py), once the layer holds more than the model's
        trained context under cache positions; None otherwise (every entry at its held rank)."""
        scheme = getattr(self.config, "memory_placement", "cache")
        if scheme == "cache" or layer is None or not getattr(cache, "cache_positions", False):
            return None
        if cache.trained_context is None or layer.timeline_width() <= cache.trained_context:
            return None
        return Placement(
            scheme, cache._rotary_embedding(self), query_positions - cache.rope_offset, layer.current_rope(),
            self.config.local_tokens, self.config.block_size,
        )

    @torch.compiler.disable  # launches its own kernels; a compiled decode step fuses what lies around it
    def _static_decode(self, query, key, value, attention_mask, cache, implementation) -> torch.Tensor | None:
        """The one-token sparsemem step over a `StaticSparseMemCache` layer, by `static_decode_attention` (fixed
        shapes, nothing read back: capturable); None for every other call, which runs the usual path over the
        held part of the buffers. Refuses what the fixed-shape step cannot honour, prefill included."""
        layer = cache.layers[self.layer_idx]
        if self.attention_window is not None and self.attention_window < layer.max_cache_len:
            raise ValueError(f"StaticSparseMemCache does not implement a sliding window ({self.attention_window} tokens, "
                             f"max_cache_len {layer.max_cache_len}): use SparseMemCache")
        if attention_mask is not None and implementation == ATTENTION_NAME:
            raise ValueError("StaticSparseMemCache does not take a padded batch: pass sequences of one length (or one "
                             "at a time), or use SparseMemCache")
        if query.shape[-2] != 1 or implementation != ATTENTION_NAME:
            return None
        cache.update(key, value, self.layer_idx)
        options = {name: getattr(self.config, name) for name in FAST_PATH_OPTIONS}
        width = selection_width(layer.max_cache_len, options)
        output, attended = static_decode_attention(query, layer, self.scaling, self.scorer, options, width)
        if not (output.is_cuda and torch.cuda.is_current_stream_capturing()):
            # a replayed step does not run Python: counts come from eager steps only
            self.sparsemem_stats.add("decode", attended, layer.get_seq_length() * query.shape[0] * query.shape[1])
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = _given_cache(past_key_values, cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if getattr(self, "q_norm", None) is not None:  # Qwen3 normalises each head before RoPE
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        if getattr(past_key_values, "is_sparsemem", False):
            if self.layer_idx == 0:  # once per forward pass, before any layer rotates its new tokens
                past_key_values.prepare_positions(self, query_states.shape[-2])
            offset = past_key_values.rope_offset
            if offset:
                # cache positions: the new tokens continue right after the last held entry; their cos/sin are
                # computed at those (in-range) positions rather than shifted from far-out logical ones, once per
                # forward pass (keyed on the position tensor the layers share)
                position_ids = kwargs.get("position_ids")
                if position_ids is None:
                    past = past_key_values.get_seq_length(self.layer_idx)
                    position_ids = torch.arange(past, past + query_states.shape[-2], device=query_states.device)[None]
                    cos, sin = past_key_values._rotary_embedding(self)(value_states, position_ids - offset)
                else:
                    cos, sin = past_key_values.rotary_at(self, value_states, position_ids)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        call = settings_for(self)  # this thread's per-call settings (dense pass, query capture), if any
        if call is not None and call.query_recorder is not None:  # reference queries for compaction (post-RoPE, post-norm)
            call.query_recorder(self.layer_idx, query_states)
        dense = call.attn_implementation if call is not None else None
        implementation = dense or self.config._attn_implementation

        if getattr(past_key_values, "is_static_sparsemem", False):
            output = self._static_decode(query_states, key_states, value_states, attention_mask, past_key_values, implementation)
            if output is not None:
                return self.o_proj(output.reshape(*input_shape, -1).contiguous()), None

        past, layer = 0, None
        if past_key_values is not None:
            past = past_key_values.get_seq_length(self.layer_idx)
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            layer = past_key_values.layers[self.layer_idx]
        total = past + query_states.shape[-2]
        device = key_states.device
        key_positions = getattr(layer, "positions", None)
        slots = getattr(layer, "slots", None)
        if key_positions is None:  # a transformers cache (or none): the newest `physical` tokens, in order
            key_positions = torch.arange(total - key_states.shape[-2], total, device=device)

        if implementation == ATTENTION_NAME:
            query_positions = torch.arange(past, total, device=device)
            summaries = None
            if layer is not None and hasattr(layer, "block_summaries"):
                summaries = layer.block_summaries
                sub_block = getattr(self.scorer, "sub_block", None)  # sub-block extrema for "subminmax"
                if summaries is None or (summaries.block_size, summaries.sub_block) != (self.config.block_size, sub_block):
                    summaries = layer.block_summaries = BlockSummaryCache(self.config.block_size, sub_block)
            # a SparseMemLayer holds positions 0..L-1 exactly when it holds L entries (nothing evicted)
            contiguous = key_positions.shape[0] == total and key_states.shape[-2] == total
            slots = self._with_block_slots(slots, layer, key_states, value_states, key_positions, contiguous, query_states.device)
            placement = self._placement(past_key_values, layer, query_positions)
            kwargs["sparsemem"] = MemoryView(
                query_positions, key_positions, slots, self.attention_window, summaries, contiguous,
                queries_newest=True, logical_length=total, placement=placement,
                fallback=None if placement is None else "memory placement beyond the trained context",
            )
        elif getattr(layer, "positions", None) is not None and (
            slots is not None or key_positions.shape[0] != total
        ):
            raise ValueError(
                f"attn_implementation={implementation!r} cannot read a SparseMemCache whose tokens were evicted "
                f"or consolidated into slots; use attn_implementation={ATTENTION_NAME!r}"
            )

        if dense is not None and self.config._attn_implementation == ATTENTION_NAME:
            # the model built sparsemem's padding mask; the dense implementation needs the full one
            attention_mask = dense_mask(attention_mask, torch.arange(past, total, device=device), key_positions, self.attention_window)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.attention_window,
            **kwargs,
        )
        online = getattr(past_key_values, "online", None)
        if implementation == ATTENTION_NAME and attention_mask is not None and past_key_values is not None:
            # a padded batch (sparsemem_mask drops an all-ones mask): compaction keeps the same positions
            # of every row, so it would keep padding as sinks; compaction refuses such a cache
            past_key_values.padded_batch = True
            if online is not None:
                raise ValueError("online compaction (max_kv_tokens) keeps the same positions of every row and "
                                 "cannot compact a padded batch; generate each sequence alone")
        if online is not None and layer is not None:
            # after this step attended everything: remember its queries; after the last layer, keep every
            # layer in budget (one batched solve for all the layers that reached it)
            online.observe(layer, query_states, torch.arange(past, total, device=device))
            if self.layer_idx == self.config.num_hidden_layers - 1:
                online.compact_full_layers(past_key_values, self)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class SparseMemLlamaAttention(SparseMemAttentionMixin, LlamaAttention):
    rotary_class = LlamaRotaryEmbedding

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_sparsemem()


class SparseMemMistralAttention(SparseMemAttentionMixin, MistralAttention):
    rotary_class = MistralRotaryEmbedding

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_sparsemem()


class SparseMemQwen2Attention(SparseMemAttentionMixin, Qwen2Attention):
    rotary_class = Qwen2RotaryEmbedding

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_sparsemem()


class SparseMemQwen3Attention(SparseMemAttentionMixin, Qwen3Attention):
    rotary_class = Qwen3RotaryEmbedding

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_sparsemem()


MODULES_FILE = "sparsemem_modules.safetensors"
LEARNED_MODULES = (LearnedBlockScorer, BlockConsolidator)
_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _hub_kwargs(kwargs) -> dict:
    return {key: kwargs[key] for key in _HUB_KEYS if key in kwargs}


def _modules_only_file(name_or_path, kwargs) -> str | None:
    """Path of `sparsemem_modules.safetensors` when `name_or_path` is a modules-only checkpoint."""
    if os.path.isdir(name_or_path):
        full = any(os.path.isfile(os.path.join(name_or_path, f)) for f in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        path = os.path.join(name_or_path, MODULES_FILE)
        return path if os.path.isfile(path) and not full else None
    hub = _hub_kwargs(kwargs)
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        if cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub):
            return None
    return cached_file(name_or_path, MODULES_FILE, _raise_exceptions_for_missing_entries=False, **hub)


def _reset_missing_modules(model, missing_keys) -> None:
    """Initialise learned modules whose parameters the checkpoint did not hold."""
    missing = {key.rpartition(".")[0] for key in missing_keys}
    for name, module in model.named_modules():
        if isinstance(module, LEARNED_MODULES) and name in missing:
            module.reset_parameters()


GENERATION_OPTIONS = ("max_kv_tokens", "kv_compaction")


def _restore_generation_options(model, name_or_path, kwargs) -> None:
    """Put back the sparsemem options of a saved `generation_config.json`: transformers drops keys it does not
    know from a generation config that was first derived from the model config (`_from_model_config`)."""
    if not isinstance(getattr(model, "generation_config", None), GenerationConfig):
        return
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, GENERATION_CONFIG_NAME)
        path = path if os.path.isfile(path) else None
    else:
        path = cached_file(name_or_path, GENERATION_CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **_hub_kwargs(kwargs))
    if path is None:
        return
    saved = GenerationConfig._dict_from_json_file(path)
    for key in GENERATION_OPTIONS:
        if key in saved and getattr(model.generation_config, key, None) is None:
            setattr(model.generation_config, key, saved[key])


class SparseMemForCausalLMMixin:
    """What every sparsemem causal LM adds to its base class."""

    attention_class: type = None

    def __init__(self, config):
        config.validate_sparsemem_options()
        super().__init__(config)
        for idx, decoder_layer in enumerate(self.model.layers):
            decoder_layer.self_attn = self.attention_class(config, idx)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads a "modules only" checkpoint: a folder holding `sparsemem_modules.safetensors` and a
        config whose `sparsemem_base_model` names the base checkpoint the modules go on top of.

        Parameters of the learned modules missing from a checkpoint (a base checkpoint) get their own
        initialisation, which reproduces the training-free behaviour.
        """
        want_info = kwargs.pop("output_loading_info", False)
        modules_file = _modules_only_file(pretrained_model_name_or_path, kwargs)
        if modules_file is not None:
            config = kwargs.pop("config", None) or cls.config_class.from_pretrained(
                pretrained_model_name_or_path, **_hub_kwargs(kwargs)
            )
            base = getattr(config, "sparsemem_base_model", None)
            if not base:
                raise ValueError(f"{pretrained_model_name_or_path}: {MODULES_FILE} needs `sparsemem_base_model` in config.json")
            model, info = super().from_pretrained(base, *args, config=config, output_loading_info=True, **kwargs)
            _reset_missing_modules(model, info["missing_keys"])
            model.load_sparsemem_modules(load_state_dict(modules_file))
        else:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
            _reset_missing_modules(model, info["missing_keys"])
        _restore_generation_options(model, pretrained_model_name_or_path, kwargs)
        return (model, info) if want_info else model

    def sparsemem_module_state_dict(self, extra_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Parameters of the learned modules (and of any base parameter named by `extra_prefixes`/suffixes)."""
        names = {name for name, module in self.named_modules() if isinstance(module, LEARNED_MODULES)}
        return {
            key: value
            for key, value in self.state_dict().items()
            if key.rpartition(".")[0] in names or any(part in key for part in extra_prefixes)
        }

    def load_sparsemem_modules(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a modules-only state dict; every key must exist in this model."""
        own = self.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise ValueError(f"{MODULES_FILE}: parameters this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                if own[key].shape != value.shape:
                    raise ValueError(f"{MODULES_FILE}: `{key}` has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
                own[key].copy_(value)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, *args, **kwargs):
        # sparse attention is the default of a sparsemem model; "sdpa"/"eager" remain available for dense runs
        if attn_implementation is None:
            attn_implementation = ATTENTION_NAME
        if attn_implementation == ATTENTION_NAME:
            register_attention()  # this module's function, also when loaded as remote code
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, *args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        cache = _given_cache(past_key_values, cache)
        if getattr(cache, "is_static_sparsemem", False):
            graph = self._decode_graph(cache, input_ids, labels, kwargs)
            if graph is not None:
                logits = graph(input_ids)
                if attention_mask is not None and not bool(attention_mask.all()):
                    raise ValueError("StaticSparseMemCache does not take a padded batch: pass sequences of one length "
                                     "(or one at a time), or use SparseMemCache")
                return CausalLMOutputWithPast(logits=logits, **{CACHE_ARGUMENT: cache})
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = SparseMemCache(self.config)
        if getattr(cache, "is_sparsemem", False):
            cache.record_tokens(input_ids, cache.get_seq_length())
        kwargs[CACHE_ARGUMENT] = cache
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _decode_graph(self, cache, input_ids, labels, kwargs) -> DecodeGraph | None:
        """The captured decode step that runs this call, where it is a one-token step over a filled
        `StaticSparseMemCache(cuda_graph=True)` on CUDA without gradients; None: run the forward eagerly."""
        graph = cache.graph
        if graph is not None and graph.busy:  # the capture itself runs the forward
            return None
        one_token = input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1 and input_ids.is_cuda
        if not (cache.cuda_graph and one_token and cache.get_seq_length() and labels is None):
            return None
        if torch.is_grad_enabled() or settings_for(self.model.layers[0].self_attn) is not None:
            return None
        if any(kwargs.get(name) for name in ("output_attentions", "output_hidden_states", "inputs_embeds")):
            return None
        if graph is None or graph.input_ids.shape[0] != input_ids.shape[0]:
            eager = functools.partial(self.forward, **{CACHE_ARGUMENT: cache})
            graph = cache.graph = DecodeGraph(eager, cache, input_ids.shape[0], input_ids.device, compile=cache.compile)
        return graph

    def generate(self, *args, max_kv_tokens: int | None = None, memory=None, **kwargs):
        """`transformers` generate; `max_kv_tokens` bounds every layer's physical KV memory by compacting
        all but the sinks and the newest tokens into slots whenever a layer reaches it (online compaction).
        `memory`: a `sparsemem.MemoryBank`; the prompt reads the chunks it retrieves (one question, batch 1)."""
        if memory is not None:
            if any(kwargs.get(name) is not None for name in ("past_key_values", "cache")) or max_kv_tokens is not None:
                raise ValueError("`memory` builds the cache itself: it cannot be combined with a cache or `max_kv_tokens`")
            inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.shape[0] != 1:
                raise ValueError("generate(memory=...) answers one prompt: pass input_ids of shape [1, n]")
            kwargs[CACHE_ARGUMENT] = memory.cache_for(inputs)
        online = _online_compaction(kwargs.get("generation_config") or self.generation_config, max_kv_tokens, self.config)
        if online is not None:
            if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
                raise ValueError(
                    "pass `max_kv_tokens` either to generate() (or the generation config) or to "
                    "SparseMemCache(config, max_kv_tokens=...), not with a `past_key_values` of your own"
                )
            kwargs[CACHE_ARGUMENT] = SparseMemCache(self.config, online=online)
        other = "cache" if CACHE_ARGUMENT == "past_key_values" else "past_key_values"
        if other in kwargs:
            kwargs[CACHE_ARGUMENT] = _given_cache(kwargs.pop(other), kwargs.get(CACHE_ARGUMENT))
        cache = kwargs.get(CACHE_ARGUMENT)
        if getattr(cache, "is_sparsemem", False) and cache.get_seq_length():
            inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
            if isinstance(inputs, torch.Tensor):
                kwargs["attention_mask"] = _continuation_mask(cache, inputs, kwargs.get("attention_mask"))
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        own = model_kwargs.get(CACHE_ARGUMENT) is None and generation_config.use_cache is not False
        implementation = generation_config.cache_implementation
        if own and implementation is None:
            model_kwargs[CACHE_ARGUMENT] = SparseMemCache(self.config)
        elif own and implementation == "static":
            # transformers' switch for a fixed-shape cache: here the sparsemem one, whose decode steps replay a
            # captured CUDA graph (a plain StaticCache holds no block summaries and would read its whole buffer)
            length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
            length = generation_config.max_cache_len or length or generation_config.max_length
            model_kwargs[CACHE_ARGUMENT] = StaticSparseMemCache(self.config, max_cache_len=int(length))
            generation_config.cache_implementation = None  # the cache is made; transformers refuses both at once
        elif own and implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={implementation!r}: transformers' fixed-shape caches hold no block summaries; use "
                "cache_implementation='static' (StaticSparseMemCache) or the default (SparseMemCache)"
            )
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # -- reporting ----------------------------------------------------------------------------------

    def sparsemem_stats(self) -> dict[str, float]:
        """Attention density since the last reset: attended (query head, key) pairs / dense causal pairs."""
        attended = {"prefill": 0.0, "decode": 0.0}
        dense = {"prefill": 0.0, "decode": 0.0}
        for module in self.modules():
            stats = getattr(module, "sparsemem_stats", None)
            if isinstance(stats, AttentionStats):
                for phase in attended:
                    attended[phase] += float(stats.attended[phase])
                    dense[phase] += float(stats.dense[phase])
        result = {f"{phase}_density": attended[phase] / dense[phase] if dense[phase] else None for phase in attended}
        total_dense = sum(dense.values())
        result["density"] = sum(attended.values()) / total_dense if total_dense else None
        return result

    def reset_sparsemem_stats(self) -> None:
        for module in self.modules():
            stats = getattr(module, "sparsemem_stats", None)
            if isinstance(stats, AttentionStats):
                stats.reset()


class SparseMemLlamaForCausalLM(SparseMemForCausalLMMixin, LlamaForCausalLM):
    config_class = SparseMemLlamaConfig
    attention_class = SparseMemLlamaAttention


class SparseMemMistralForCausalLM(SparseMemForCausalLMMixin, MistralForCausalLM):
    config_class = SparseMemMistralConfig
    attention_class = SparseMemMistralAttention


class SparseMemQwen2ForCausalLM(SparseMemForCausalLMMixin, Qwen2ForCausalLM):
    config_class = SparseMemQwen2Config
    attention_class = SparseMemQwen2Attention


class SparseMemQwen3ForCausalLM(SparseMemForCausalLMMixin, Qwen3ForCausalLM):
    config_class = SparseMemQwen3Config
    attention_class = SparseMemQwen3Attention


for _model_class in (
    SparseMemLlamaForCausalLM,
    SparseMemMistralForCausalLM,
    SparseMemQwen2ForCausalLM,
    SparseMemQwen3ForCausalLM,
):
    _model_class.register_for_auto_class("AutoModelForCausalLM")

# base model_type -> (config class, model class)
FAMILIES = {
    "llama": (SparseMemLlamaConfig, SparseMemLlamaForCausalLM),
    "mistral": (SparseMemMistralConfig, SparseMemMistralForCausalLM),
    "qwen2": (SparseMemQwen2Config, SparseMemQwen2ForCausalLM),
    "qwen3": (SparseMemQwen3Config, SparseMemQwen3ForCausalLM),
}

__all__ = [
    "FAMILIES",
    "SparseMemLlamaForCausalLM",
    "SparseMemMistralForCausalLM",
    "SparseMemQwen2ForCausalLM",
    "SparseMemQwen3ForCausalLM",
]
