"""`SparseMemCache`: a transformers `Cache` holding the three memory tiers per layer.

Per layer it keeps
- full-resolution K/V (anchors and the block store) with the logical position of every entry, and
- a slot tier of consolidated `(k, v, beta)` entries standing for spans whose K/V are not attended.

The logical length never shrinks when tokens are evicted into slots, and masks, anchors and blocks are
built over logical positions. RoPE positions follow the cache's position policy (`rope.py`): "logical"
keeps every token at the position it had in the full sequence; "cache" gives every held entry its rank in
the cache's time order (keys re-rotated when entries leave), so distances stay within what the cache
holds; "auto" is logical inside the model's trained context and cache positions beyond it.
"""

import functools
import time

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .compaction import CompactionRecord
from .rope import check_policy, check_rope_shiftable, shift_keys, trained_context
from .slots import SlotTier


class SparseMemLayer(CacheLayerMixin):
    """One layer of `SparseMemCache`."""

    is_sliding = False
    is_croppable = True

    def __init__(self, offload_blocks: bool = False, **kwargs):
        super().__init__()
        # full-resolution K/V in pinned host memory: decode reads the selected blocks in place over the bus
        self.offload_blocks = offload_blocks
        self.positions: torch.Tensor | None = None
        self.logical_length = 0
        self.slots: SlotTier | None = None
        # RoPE positions the keys are rotated at: None = their logical positions. Set once the cache gives
        # entries cache positions (see `SparseMemCache.prepare_positions`); new tokens then enter at
        # logical - rope_offset
        self.rope_positions: torch.Tensor | None = None
        self.rope_offset = 0
        self.entries_left = False  # entries left (eviction, compaction) since the positions were last laid out
        # derived from the keys, kept across calls and dropped together by `_drop_derived` whenever the keys change
        # other than by appending: block summaries (decode fast path) and slots of complete blocks (`block_slots`)
        self.block_summaries = None
        self.block_slot_cache = None
        # newest queries of the layer, kept only under online compaction (its reference queries)
        self.recent_queries: torch.Tensor | None = None
        self.recent_query_positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.offload_blocks:
            if not key_states.is_cuda:
                raise ValueError("`offload_blocks=True` keeps the block store in pinned host memory for a CUDA model; "
                                 f"the keys are on {key_states.device}")
            self.keys = torch.empty(*key_states.shape[:-2], 0, key_states.shape[-1], dtype=key_states.dtype).pin_memory()
            self.values = torch.empty(*value_states.shape[:-2], 0, value_states.shape[-1], dtype=value_states.dtype).pin_memory()
        else:
            self.keys = key_states[..., :0, :]
            self.values = value_states[..., :0, :]
        self.positions = torch.empty(0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        new_positions = torch.arange(self.logical_length, self.logical_length + new, device=self.positions.device)
        self.keys, self.values = self._append(key_states, value_states)
        if self.rope_positions is not None:
            self.rope_positions = torch.cat([self.rope_positions, new_positions - self.rope_offset])
        self.positions = torch.cat([self.positions, new_positions])
        self.logical_length += new
        if self.offload_blocks and self.keys.device != key_states.device:
            if new == 1 and self.keys.is_pinned():
                return self.keys, self.values  # decode: the kernel reads the selected blocks from host memory
            # prefill: this layer's K/V visit the GPU for the call, one layer at a time
            return (self.keys.to(key_states.device, non_blocking=True), self.values.to(value_states.device, non_blocking=True))
        return self.keys, self.values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append in place into buffers with spare room, so a decode step does not copy the whole layer.

        `keys`/`values` stay views of the first `physical_length` entries; any other edit of them
        (eviction, beam reordering, compaction) replaces the tensors and the next append starts a new buffer.
        """
        held, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = getattr(self, "_buffers_kv", None)
        in_buffer = (
            buffers is not None
            and self.keys.data_ptr() == buffers[0].data_ptr()
            and self.values.data_ptr() == buffers[1].data_ptr()
            and buffers[0].shape[:2] == self.keys.shape[:2]
        )
        if not in_buffer or buffers[0].shape[-2] < held + new:
            # room for later steps: 1/16 of the layer, between 256 and 4096 entries
            spare = 0 if new > 1 and held == 0 else min(max(256, (held + new) // 16), 4096)
            pinned = self.offload_blocks and self.keys.device.type == "cpu"
            buffers = tuple(
                torch.empty(*t.shape[:-2], held + new + spare, t.shape[-1], dtype=t.dtype, device=t.device, pin_memory=pinned)
                for t in (self.keys, self.values)
            )
            buffers[0][..., :held, :] = self.keys
            buffers[1][..., :held, :] = self.values
            self._buffers_kv = buffers
        buffers[0][..., held : held + new, :] = key_states
        buffers[1][..., held : held + new, :] = value_states
        return buffers[0][..., : held + new, :], buffers[1][..., : held + new, :]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        # masks are built over logical positions, from 0
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _drop_derived(self) -> None:
        """Forget the state derived from the keys (see `__init__`): the keys changed other than by appending."""
        self.block_summaries = None
        self.block_slot_cache = None

    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.rope_positions, self.rope_offset, self.entries_left = None, 0, False
        self.slots = None
        self._drop_derived()
        self._buffers_kv = None
        self.recent_queries = self.recent_query_positions = None
        self.logical_length = 0
        self.is_initialized = False

    # -- tier edits used by compaction and consolidation ---------------------------------------------

    def add_slots(self, slots: SlotTier) -> None:
        if not self.is_initialized:
            raise ValueError("cannot add slots to an empty cache layer: run the context through the model first")
        batch, heads, _, dim = self.keys.shape
        if slots.keys.shape[0] != batch or slots.keys.shape[-1] != dim or slots.values.shape[-1] != self.values.shape[-1]:
            raise ValueError(
                f"slot keys {tuple(slots.keys.shape)} do not match the layer's keys {tuple(self.keys.shape)} in batch or head dim"
            )
        if len(slots) and (int(slots.head.min()) < 0 or int(slots.head.max()) >= heads):
            raise ValueError(f"slot `head` must lie in [0, {heads})")
        if (slots.position >= self.logical_length).any():
            raise ValueError("slots may only stand for positions already in the cache")
        slots = slots.to(self.device)
        self.slots = SlotTier.cat(self.slots, slots)
        self.entries_left = True

    def set_slots(self, slots: SlotTier | None) -> None:
        """Replace the whole slot tier (e.g. by slots that fold the old ones in)."""
        self.slots = None
        self.entries_left = True
        if slots is not None:
            self.add_slots(slots)

    def evict(self, drop: torch.Tensor) -> None:
        """Drop the full-resolution entries where the [N] boolean `drop` is True (their slots stay)."""
        keep = ~drop.to(self.positions.device)
        self._drop_derived()
        self._buffers_kv = None  # the kept entries are copied out: do not hold the old buffers' memory too
        self.keys, self.values = self.keys[..., keep, :], self.values[..., keep, :]
        self.positions = self.positions[keep]
        if self.rope_positions is not None:
            self.rope_positions = self.rope_positions[keep]
        self.entries_left = True

    # -- RoPE positions -----------------------------------------------------------------------------

    def timeline_width(self) -> int:
        """Positions the held entries take in time order: one per exact entry, and per slot group the
        most slots one KV head has in it."""
        if not self.is_initialized:
            return 0
        width = self.physical_length
        if self.slots is not None and len(self.slots):
            width += self.slots.timeline()[4]
        return width

    def lay_out_positions(self, next_position: int, rotary) -> None:
        """Give every held entry its rank in time order, the newest at `next_position` - 1, re-rotating the
        keys (and slot keys) from where they are to there; new tokens then enter at `next_position`."""
        if not self.is_initialized:
            return
        target, slot_target = self.layout_targets(next_position)
        keys = shift_keys(rotary, self.keys, target - self.current_rope()) if self.positions.numel() else self.keys
        slot_keys = None
        if slot_target is not None:
            slot_keys = shift_keys(rotary, self.slots.keys, slot_target - self.slots.rope)
        self.take_layout(next_position, target, keys, slot_target, slot_keys)

    def current_rope(self) -> torch.Tensor:
        """The RoPE positions [N] the full-resolution keys are rotated at now."""
        return self.rope_positions if self.rope_positions is not None else self.positions

    def layout_targets(self, next_position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where `lay_out_positions` puts the held entries: (RoPE position [N] of each full-resolution entry,
        [B, S] of each slot or None), the newest at `next_position` - 1."""
        device = self.positions.device
        exact = self.positions
        items = [exact]
        widths = [torch.ones_like(exact)]
        tie = [torch.ones_like(exact)]  # a slot group sorts before an exact entry at the same position
        if self.slots is not None and len(self.slots):
            groups, group_widths, offset, group_of, _ = self.slots.timeline()
            items.append(groups.to(device))
            widths.append(group_widths.to(device))
            tie.append(torch.zeros_like(groups, device=device))
        position, width = torch.cat(items), torch.cat(widths)
        order = torch.sort(torch.cat(tie), stable=True).indices
        order = order[torch.sort(position[order], stable=True).indices]
        start = torch.empty_like(width)
        start[order] = torch.cumsum(width[order], 0) - width[order]
        base = next_position - self.timeline_width()
        target = base + start[: exact.numel()]
        if self.slots is None or not len(self.slots):
            return target, None
        group_start = start[exact.numel():].to(self.slots.position.device)
        return target, (base + group_start[group_of] + offset)[None].expand_as(self.slots.rope)

    def take_layout(self, next_position: int, target, keys, slot_target=None, slot_keys=None) -> None:
        """Adopt a layout: `keys` / `slot_keys` are this layer's keys already moved to `target` /
        `slot_target` (see `layout_targets`)."""
        if self.positions.numel():
            self._replace_keys(keys)
        self.rope_positions = target
        if slot_target is not None:
            self.slots = self.slots.moved(slot_keys, slot_target.clone())
        self.rope_offset = self.logical_length - next_position
        self.entries_left = False
        self._drop_derived()

    def same_layout_as(self, other: "SparseMemLayer") -> list:
        """Checks (0-dim bool tensors, to be read back together) that this layer holds its entries exactly
        where `other` does (positions, RoPE positions, slots per head and position), or None when the shapes
        already differ. Layers fed the same tokens and compacted together lay out identically."""
        mine, theirs = self.slots, other.slots
        if (self.keys.shape != other.keys.shape or self.keys.device != other.keys.device or self.offload_blocks
                or other.offload_blocks or (self.rope_positions is None) != (other.rope_positions is None)
                or (0 if mine is None else len(mine)) != (0 if theirs is None else len(theirs))):
            return None
        checks = [(self.positions == other.positions).all()]
        if self.rope_positions is not None:
            checks.append((self.rope_positions == other.rope_positions).all())
        if mine is not None and len(mine):
            checks += [(mine.position == theirs.position).all(), (mine.head == theirs.head).all()]
        return checks

    def _replace_keys(self, keys: torch.Tensor) -> None:
        if self.offload_blocks and self.keys.is_pinned():
            keys = keys.to("cpu").pin_memory()
        self._buffers_kv = None
        self.keys = keys

    # -- transformers cache API ---------------------------------------------------------------------

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many newest logical tokens; positive: keep that many (legacy meaning)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        new_length = tokens_to_remove if tokens_to_remove > 0 else self.logical_length + tokens_to_remove
        if new_length >= self.logical_length:
            return
        if new_length < 0:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens from a cache of {self.logical_length}")
        if self.slots is not None and (self.slots.position >= new_length).any():
            raise ValueError(
                f"cannot crop the cache to {new_length} tokens: consolidated slots cover positions beyond it "
                "and a slot cannot be split"
            )
        drop = self.positions >= new_length
        kept = int((~drop).sum())
        if not drop[:kept].any():
            # the newest entries sit last: keep views of the rest, so answering from a document and
            # cropping back copies nothing (the append buffers stay and are written over)
            if self.block_summaries is not None:  # complete blocks before the cut stay summarised
                summaries = self.block_summaries
                summaries.complete = min(summaries.complete, kept // summaries.block_size)
            self.block_slot_cache = None
            self.keys, self.values = self.keys[..., :kept, :], self.values[..., :kept, :]
            self.positions = self.positions[:kept]
        else:
            self.evict(drop)
        self.logical_length = new_length

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._drop_derived()
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.slots is not None:
            self.slots = self.slots.map(fn)
        if self.recent_queries is not None:
            self.recent_queries = fn(self.recent_queries)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self):
        super().offload()
        if self.slots is not None:
            self.slots = self.slots.to("cpu")

    def prefetch(self):
        super().prefetch()
        if self.slots is not None:
            self.slots = self.slots.to(self.device)

    # -- reporting ----------------------------------------------------------------------------------

    def storage_bytes(self) -> int:
        """Bytes of every tensor the layer keeps alive: K/V with the spare room of their append buffers,
        positions, slots and the reference queries of online compaction (each storage counted once)."""
        tensors = [self.keys, self.values, self.positions, self.recent_queries, self.recent_query_positions]
        tensors += list(getattr(self, "_buffers_kv", None) or ())
        if self.slots is not None:
            tensors += [self.slots.keys, self.slots.values, self.slots.beta, self.slots.head, self.slots.block, self.slots.position]
        storages = {}
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def memory_bytes(self, sink_tokens: int, local_tokens: int) -> dict[str, int]:
        """Bytes held per tier; anchors are judged against the next query position."""
        if not self.is_initialized:
            return {"anchors": 0, "block_store": 0, "slots": 0}
        per_token = (self.keys[..., :1, :].numel() * self.keys.element_size()) + (
            self.values[..., :1, :].numel() * self.values.element_size()
        )
        anchors = (self.positions < sink_tokens) | (self.positions >= self.logical_length - local_tokens)
        num_anchors = int(anchors.sum())
        return {
            "anchors": num_anchors * per_token,
            "block_store": (self.physical_length - num_anchors) * per_token,
            "slots": 0 if self.slots is None else self.slots.nbytes,
        }


class SparseMemCache(Cache):
    """Cache of a sparsemem model; created automatically by `forward` and `generate`.

    Pass `config` (a sparsemem config) so the per-tier byte report knows the anchor sizes.
    `max_kv_tokens` (or an `OnlineCompaction` as `online`) bounds the physical memory of every layer:
    after each forward pass a layer that reached the budget is compacted into slots.

    `compaction`: a `CompactionRecord` of the last `sparsemem.compact` call that compacted this cache
    (settings, queries, slots per layer and head, seconds), None until one did; set by
    `record_compaction`, saved and loaded with the cache by `save_document` / `load_document`.
    """

    is_sparsemem = True

    def __init__(
        self, config=None, max_kv_tokens: int | None = None, online=None, offload_blocks: bool = False,
        positions: str | None = None, **kwargs,
    ):
        """positions: the RoPE position policy ("logical", "cache" or "auto"; default: the config's
        `positions`, else "auto"); see `rope.py`."""
        if offload_blocks:
            super().__init__(layer_class_to_replicate=functools.partial(SparseMemLayer, offload_blocks=True))
        else:
            super().__init__(layer_class_to_replicate=SparseMemLayer)
        self.sink_tokens = getattr(config, "sink_tokens", 0)
        self.local_tokens = getattr(config, "local_tokens", 0)
        if max_kv_tokens is not None:
            if online is not None:
                raise ValueError("pass either `max_kv_tokens` or `online`, not both")
            from .online_compaction import OnlineCompaction

            online = OnlineCompaction(max_kv_tokens, keep_first=self.sink_tokens)
        self.online = online
        self.positions = check_policy(positions if positions is not None else getattr(config, "positions", "auto"))
        self.trained_context = None if config is None else trained_context(config)
        if self.positions != "logical" and config is not None:
            check_rope_shiftable(config)
        self.cache_positions = False  # whether held entries have been given cache positions
        self._rotary = None
        self.layouts, self.layout_seconds = 0, 0.0  # re-rotations of every layer done, and their wall seconds
        # [B, L] ids of the logical tokens when every one came in as an id (None where unknown): lets
        # `generate` tell a whole sequence (cached tokens first) from new tokens only
        self.token_ids: torch.Tensor | None = None
        self.compaction: CompactionRecord | None = None

    def record_compaction(self, record: CompactionRecord | None) -> None:
        """Keep what a whole-cache compaction did as `compaction` (None: forget it)."""
        if record is not None and not isinstance(record, CompactionRecord):
            raise TypeError(f"`record` must be a CompactionRecord or None, got {type(record).__name__}")
        self.compaction = record

    # -- RoPE positions -----------------------------------------------------------------------------

    def prepare_positions(self, module, query_length: int) -> int:
        """Called before a forward pass's first layer: decides the positions of the `query_length` new
        tokens under the policy, re-rotating held keys to their ranks where entries left since the last
        call. Returns the offset to subtract from logical positions for RoPE (0: logical positions)."""
        if self.positions == "logical":
            return 0
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return 0
        if not self.cache_positions:
            length = layers[0].logical_length + query_length
            if self.positions == "auto" and (self.trained_context is None or length <= self.trained_context):
                return 0  # inside the trained window: logical positions, exactly as with "logical"
            self.cache_positions = True
            moved = True
        else:
            moved = any(layer.entries_left for layer in layers)
        if moved:
            start = time.perf_counter()
            rotary = self._rotary_embedding(module)
            next_position = max(layer.timeline_width() for layer in layers)
            self._lay_out(layers, next_position, rotary)
            if layers[0].keys.is_cuda:
                torch.cuda.synchronize(layers[0].keys.device)  # so the seconds below are the re-rotation's own
            self.layouts += 1
            self.layout_seconds += time.perf_counter() - start
        return layers[0].rope_offset

    @staticmethod
    def _lay_out(layers, next_position: int, rotary) -> None:
        """`lay_out_positions` of every layer; the layers that hold their entries where the first one does
        (a stream's layers) share its layout and are re-rotated as one stacked tensor."""
        first, checks, alike = layers[0], [], []
        for layer in layers[1:]:
            same = layer.same_layout_as(first)
            if same is not None:
                alike.append(layer)
                checks.append(torch.stack(same).all())
        if checks:
            agree = torch.stack(checks).tolist()  # one read-back for every layer
            alike = [layer for layer, ok in zip(alike, agree) if ok]
        group = [first, *alike]
        for layer in layers:
            if not any(layer is member for member in group):
                layer.lay_out_positions(next_position, rotary)
        target, slot_target = first.layout_targets(next_position)
        keys = torch.stack([layer.keys for layer in group])
        if first.positions.numel():
            keys = shift_keys(rotary, keys, target - first.current_rope())
        slot_keys = [None] * len(group)
        if slot_target is not None:
            ropes = torch.stack([layer.slots.rope for layer in group])
            slot_keys = shift_keys(rotary, torch.stack([layer.slots.keys for layer in group]), slot_target - ropes)
        for number, layer in enumerate(group):
            # copies: each layer owns its keys (a view would keep the whole stack alive)
            layer.take_layout(next_position, target, keys[number].clone(), slot_target,
                              None if slot_keys[number] is None else slot_keys[number].clone())

    @property
    def rope_offset(self) -> int:
        return next((layer.rope_offset for layer in self.layers if layer.is_initialized), 0)

    def _rotary_embedding(self, module):
        """The model family's own rotary embedding, built from the attention module's config (scaled RoPE
        included)."""
        if self._rotary is None:
            config = module.config
            check_rope_shiftable(config)
            self._rotary = module.rotary_class(config=config).to(module.q_proj.weight.device)
        return self._rotary

    def rotary_at(self, module, like: torch.Tensor, position_ids: torch.Tensor):
        """cos/sin of the model's rotary embedding for the new tokens at logical `position_ids` moved to cache
        positions (minus `rope_offset`), in `like`'s dtype: computed once per forward pass and shared by the
        layers, which all rotate the new tokens at the same positions."""
        key = (position_ids, self.rope_offset, like.dtype, like.device)
        memo = self.__dict__.get("_rotary_memo")
        if memo is not None and memo[0][0] is key[0] and memo[0][1:] == key[1:]:
            return memo[1]
        cos_sin = self._rotary_embedding(module)(like, position_ids - self.rope_offset)
        self.__dict__["_rotary_memo"] = (key, cos_sin)
        return cos_sin

    def record_tokens(self, input_ids: torch.Tensor | None, start: int) -> None:
        """Note the ids of a forward pass that appends at logical position `start`."""
        known = self.token_ids
        if input_ids is None or (start and (known is None or known.shape[1] < start or known.shape[0] != input_ids.shape[0])):
            self.token_ids = None
        else:
            prefix = [] if known is None or not start else [known[:, :start]]  # a crop leaves ids past `start`
            self.token_ids = torch.cat(prefix + [input_ids.detach().to(torch.long)], dim=1)

    def reset(self) -> None:
        super().reset()
        self.token_ids = None
        self.compaction = None  # nothing held, nothing compacted

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.index_select(0, beam_idx.to(self.token_ids.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.token_ids is not None:
            self.token_ids = self.token_ids[indices]

    def holds_prefix_of(self, input_ids: torch.Tensor) -> bool | None:
        """Whether `input_ids` start with the cached tokens (None: their ids are not known)."""
        length, known = self.get_seq_length(), self.token_ids
        if known is None or known.shape[1] < length:
            return None
        if input_ids.shape[0] != known.shape[0] or input_ids.shape[1] < length:
            return False
        return bool(torch.equal(known[:, :length].to(input_ids.device), input_ids[:, :length]))

    def memory_bytes(self) -> dict[str, int]:
        """Physical bytes per tier over all layers, and their total."""
        totals = {"anchors": 0, "block_store": 0, "slots": 0}
        for layer in self.layers:
            for tier, value in layer.memory_bytes(self.sink_tokens, self.local_tokens).items():
                totals[tier] += value
        totals["total"] = sum(totals.values())
        return totals

    def storage_bytes(self) -> int:
        """Bytes of all tensors the layers keep alive (spare buffer room and reference queries included)."""
        return sum(layer.storage_bytes() for layer in self.layers)

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length for layer in self.layers]
