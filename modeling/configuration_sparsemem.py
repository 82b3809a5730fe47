"""Configurations of the sparsemem model families.

Each config is the base family's config plus the sparse-memory options, so a base checkpoint's
`config.json` loads unchanged and the options travel inside `config.json` of a saved sparsemem
checkpoint.
"""

from dataclasses import dataclass

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from .placement import check_placement, check_placement_options
from .rope import POSITION_POLICIES

SCORERS = ("minmax", "hybrid", "mean", "subminmax", "learned")
SCORER_INITS = ("minmax", "hybrid")
SCORER_UNIONS = (None, "minmax")
ATTENTION_BACKENDS = ("auto", "reference", "flex")


@dataclass(kw_only=True)
class SparseMemOptions:
    """Options shared by every sparsemem family.

    block_size: tokens per block of the block store; selection and summaries work per block.
    sink_tokens: the first tokens of the sequence, always attended exactly (attention sinks).
    local_tokens: the newest tokens before each query, always attended exactly.
    top_k_blocks: blocks attended exactly per query on top of the anchors; `None` means every block
        (dense-equivalent).
    block_fraction: when set, each query attends ceil(block_fraction x its candidate blocks), at least
        `top_k_blocks`: a density that holds across context lengths. Ignored when `top_k_blocks` is None.
    block_mass: when set (in (0, 1]), each query takes its blocks best first until they hold this share of
        its cold attention mass as the learned scorer estimates it (at least `top_k_blocks`, at most the
        `block_fraction` budget when set): the density then follows the input, few blocks for a query
        that attends to one place, more for a diffuse one. Needs `scorer="learned"`.
    scorer: training-free block scorer: "minmax" (upper bound of q.k from per-block key extrema), "mean"
        (q . mean key), "hybrid" (both, standardised and added), "subminmax" (the best "minmax" bound among
        the sub-blocks of `scorer_sub_block` tokens of each block: large blocks scored as finely as small
        ones), or "learned" (a trained per-KV-head mix of both plus trained projections of queries and
        pooled block keys).
    scorer_sub_block: tokens per sub-block of the "subminmax" scorer; needed by it and allowed with it
        alone, and must divide `block_size`. 1 scores a block by the exact max of q.k over its keys,
        `block_size` equals "minmax"; 8 or 16 keep the selection of 64- and 128-token blocks close to that
        of 8- or 16-token blocks, for the summary memory of 8- or 16-token blocks.
    scorer_dim: width of the learned scorer's query/key projections (used when `scorer="learned"`).
    scorer_init: the training-free scorer an untrained learned scorer equals exactly ("minmax" or
        "hybrid"), so a calibration starts no worse than it. A trained checkpoint stores its own mix.
    scorer_union: "minmax" (the learned scorer selects by a block's better rank under its trained score
        and under the minmax bound, so blocks the bound singles out, such as the source of a copy, stay
        selected) or None (the trained score alone). Untrained, either equals `scorer_init`'s ranking
        when that is "minmax".
    block_slots: when set, every complete block of the block store is also consolidated into this many
        `(k, v, beta)` slots by the layer's learned consolidator (block_consolidation.py), and a query
        that does not attend a cold block counts its slots instead, so unselected blocks are answered by
        compact memory rather than dropped. `None`: unselected blocks are dropped.
    query_chunk_size: queries processed at once by the reference path; bounds its memory.
    query_block_size: `None` selects blocks per query. An integer groups queries into aligned blocks of
        that many logical positions that share one selection, scored from their mean query (the
        granularity of block-sparse GPU kernels, which need it: see `attention_backend`).
    attention_backend: "reference" (vectorised PyTorch, any device), "flex" (block-sparse
        FlexAttention on CUDA; raises when the inputs do not allow it) or "auto" ("flex" when on CUDA
        and the inputs allow it, else "reference"; both compute the same function).
    positions: RoPE positions of what the cache holds (rope.py). "logical": every token keeps its position
        in the full sequence (exact inside the trained context; beyond it distances leave the range the
        model was trained on). "cache": every held entry takes its rank in the cache's time order, keys
        re-rotated when entries leave (evicted or compacted), so distances stay within what the cache
        holds. "auto": logical while the sequence fits the model's trained context (the RoPE scaling's
        original length, else `max_position_embeddings`), cache positions from then on.
    memory_placement: where a query attends what lies outside its local window once the cache holds more
        than the trained context (placement.py), for sparse selection over a long block store. "cache": at
        the held ranks (distances may leave the trained range). "fixed": sinks, selected blocks and slots
        all at distance `local_tokens`, scored without their positions (InfLLM). "ordered": the same
        position-free scoring; the attended blocks keep their time order packed right before the local
        window (needs `top_k_blocks` alone, no `block_fraction`/`block_mass`). Needs positions "auto" or
        "cache"; inside the trained context nothing changes.
    selection_gate_temperature: calibration only. When set and a gradient is being computed, the reference
        path multiplies each block's keys by a straight-through gate (selection_gate.py): the forward output
        stays the sparse model's, and the end-to-end loss reaches the scorer through a sigmoid of each
        score's distance to the selection boundary at this temperature. A config option rather than a
        per-call setting because gradient checkpointing recomputes the layers during the backward pass,
        possibly on another thread, and must take the same path. `None`: off (inference never gates).
    """

    block_size: int = 8
    sink_tokens: int = 16
    local_tokens: int = 64
    top_k_blocks: int | None = 16
    block_fraction: float | None = 0.195
    block_mass: float | None = None
    scorer: str = "minmax"
    scorer_sub_block: int | None = None
    scorer_dim: int = 64
    scorer_init: str = "minmax"
    scorer_union: str | None = "minmax"
    block_slots: int | None = None
    query_chunk_size: int = 512
    query_block_size: int | None = None
    attention_backend: str = "auto"
    positions: str = "auto"
    memory_placement: str = "cache"
    selection_gate_temperature: float | None = None

    def validate_sparsemem_options(self) -> None:
        def _int(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")

        _int("block_size", self.block_size, 1)
        _int("sink_tokens", self.sink_tokens, 0)
        _int("local_tokens", self.local_tokens, 0)
        _int("query_chunk_size", self.query_chunk_size, 1)
        _int("scorer_dim", self.scorer_dim, 1)
        if self.top_k_blocks is not None:
            _int("top_k_blocks", self.top_k_blocks, 1)
        if self.block_slots is not None:
            _int("block_slots", self.block_slots, 1)
            if self.block_slots > self.block_size:
                raise ValueError(f"`block_slots` ({self.block_slots}) must not exceed `block_size` ({self.block_size})")
        if self.query_block_size is not None:
            _int("query_block_size", self.query_block_size, 1)
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"`positions` must be one of {POSITION_POLICIES}, got {self.positions!r}")
        check_placement(self.memory_placement)
        check_placement_options(
            self.memory_placement, self.positions, self.top_k_blocks, self.block_fraction, self.block_mass
        )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"`attention_backend` must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.block_fraction is not None and (
            isinstance(self.block_fraction, bool)
            or not isinstance(self.block_fraction, (int, float))
            or not 0 < self.block_fraction <= 1
        ):
            raise ValueError(f"`block_fraction` must be a number in (0, 1], got {self.block_fraction!r}")
        if self.block_mass is not None:
            if isinstance(self.block_mass, bool) or not isinstance(self.block_mass, (int, float)) or not 0 < self.block_mass <= 1:
                raise ValueError(f"`block_mass` must be a share in (0, 1], got {self.block_mass!r}")
            if self.scorer != "learned":
                raise ValueError(f"`block_mass` needs scorer='learned' (its mass estimate), got scorer={self.scorer!r}")
        gate = self.selection_gate_temperature
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate < float("inf")):
            raise ValueError(f"`selection_gate_temperature` must be a positive number or None, got {gate!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}, got {self.scorer!r}")
        if self.scorer == "subminmax":
            if self.scorer_sub_block is None:
                raise ValueError("scorer='subminmax' needs `scorer_sub_block` (tokens per sub-block, dividing `block_size`)")
            _int("scorer_sub_block", self.scorer_sub_block, 1)
            if self.block_size % self.scorer_sub_block:
                raise ValueError(f"`scorer_sub_block` ({self.scorer_sub_block}) must divide `block_size` ({self.block_size})")
        elif self.scorer_sub_block is not None:
            raise ValueError(
                f"`scorer_sub_block` is used by scorer='subminmax' alone, got scorer_sub_block={self.scorer_sub_block!r} "
                f"with scorer={self.scorer!r}"
            )
        if self.scorer_init not in SCORER_INITS:
            raise ValueError(f"`scorer_init` must be one of {SCORER_INITS}, got {self.scorer_init!r}")
        if self.scorer_union not in SCORER_UNIONS:
            raise ValueError(f"`scorer_union` must be one of {SCORER_UNIONS}, got {self.scorer_union!r}")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if kv_heads is not None and (kv_heads < 1 or heads % kv_heads != 0):
            raise ValueError(
                f"`num_key_value_heads` ({kv_heads}) must divide `num_attention_heads` ({heads}): "
                "block selection is shared by the query heads of one KV group"
            )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        source = config_dict.get("model_type")
        if source is not None and source not in (cls.model_type, cls.base_model_type):
            raise ValueError(
                f"{cls.__name__} cannot load a checkpoint of model_type {source!r}; expected "
                f"{cls.base_model_type!r} (a base checkpoint) or {cls.model_type!r}"
            )
        result = super().from_dict(config_dict, **kwargs)
        # options passed as keyword arguments are set after __post_init__: validate again
        (result[0] if isinstance(result, tuple) else result).validate_sparsemem_options()
        return result

    def __post_init__(self, **kwargs):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a family config: finish its own setup, then check the options
            parent(**kwargs)
            self.validate_sparsemem_options()

    def sparsemem_options(self) -> dict:
        return {name: getattr(self, name) for name in OPTION_NAMES}


OPTION_NAMES = tuple(SparseMemOptions.__dataclass_fields__)


class SparseMemLlamaConfig(SparseMemOptions, LlamaConfig):
    model_type = "sparsemem_llama"
    base_model_type = "llama"


class SparseMemMistralConfig(SparseMemOptions, MistralConfig):
    model_type = "sparsemem_mistral"
    base_model_type = "mistral"


class SparseMemQwen2Config(SparseMemOptions, Qwen2Config):
    model_type = "sparsemem_qwen2"
    base_model_type = "qwen2"


class SparseMemQwen3Config(SparseMemOptions, Qwen3Config):
    model_type = "sparsemem_qwen3"
    base_model_type = "qwen3"


for _config_class in (SparseMemLlamaConfig, SparseMemMistralConfig, SparseMemQwen2Config, SparseMemQwen3Config):
    _config_class.register_for_auto_class()
