"""sparsemem: long memory at small cost for Hugging Face causal LMs.

Three-tier attention (anchors, a scored block store, consolidated slots) for Llama, Mistral, Qwen2 and
Qwen3, registered with transformers as `attn_implementation="sparsemem"`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .questions import ask, read_document
from .cache_compaction import compact, prefill
from .head_budgets import GlobalBudgets, ProportionalBudgets, UniformBudgets
from .query_sources import ContextQueries, RandomQueries, RepeatQueries, SelfStudyQueries
from .conversion import convert
from .documents import DocumentIntegrityError, DocumentModelMismatchError, load_document, save_document
from .memory_bank import BankFormatError, BankIntegrityError, BankModelMismatchError, MemoryBank
from .modeling.attention import AttentionStats, MemoryView, sparsemem_attention_forward
from .modeling.cache import SparseMemCache, SparseMemLayer
from .modeling.compaction import CompactionRecord
from .modeling.static_cache import StaticSparseMemCache
from .modeling.slots import SlotTier
from .modeling.online_compaction import OnlineCompaction
from .modeling.configuration_sparsemem import (
    SparseMemLlamaConfig,
    SparseMemMistralConfig,
    SparseMemQwen2Config,
    SparseMemQwen3Config,
)
from .modeling.modeling_sparsemem import (
    FAMILIES,
    SparseMemLlamaForCausalLM,
    SparseMemMistralForCausalLM,
    SparseMemQwen2ForCausalLM,
    SparseMemQwen3ForCausalLM,
)

__version__ = "0.1.0"

for _config_class, _model_class in FAMILIES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "AttentionStats",
    "BankFormatError",
    "BankIntegrityError",
    "BankModelMismatchError",
    "CompactionRecord",
    "ContextQueries",
    "DocumentIntegrityError",
    "DocumentModelMismatchError",
    "GlobalBudgets",
    "MemoryBank",
    "MemoryView",
    "OnlineCompaction",
    "ProportionalBudgets",
    "RandomQueries",
    "RepeatQueries",
    "SelfStudyQueries",
    "SlotTier",
    "SparseMemCache",
    "SparseMemLayer",
    "SparseMemLlamaConfig",
    "SparseMemLlamaForCausalLM",
    "SparseMemMistralConfig",
    "SparseMemMistralForCausalLM",
    "SparseMemQwen2Config",
    "SparseMemQwen2ForCausalLM",
    "SparseMemQwen3Config",
    "SparseMemQwen3ForCausalLM",
    "StaticSparseMemCache",
    "UniformBudgets",
    "ask",
    "compact",
    "convert",
    "load_document",
    "prefill",
    "read_document",
    "save_document",
    "sparsemem_attention_forward",
]