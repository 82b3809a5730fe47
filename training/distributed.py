"""FSDP2 for calibration: the frozen base model is sharded, the learned modules stay whole.

Only the learned modules (and LoRA) train, and they are small, so they are kept out of the shards
(`ignored_params`): every process holds them in full, the training loop averages their gradients as in
data parallelism, and checkpoints hold plain tensors. What sharding buys is memory: each process keeps
1/N of the frozen decoder weights and gathers one layer at a time for its forward (and backward) pass.

Accelerate turns on FSDP through its config (`distributed_type: FSDP`, `fsdp_version: 2`, see
`recipes/accelerate/fsdp2.yaml`). Accelerate only builds an FSDP plugin on GPUs; on CPUs (gloo) the same
environment that `accelerate launch` exports (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`, ...) selects it.
"""

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardingSettings:
    reshard_after_forward: bool = True
    cpu_offload: bool = False


def fsdp2_settings(accelerator) -> ShardingSettings | None:
    """The FSDP2 settings the launch asked for, or None for no sharding. FSDP1 is refused."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        # e.g. `accelerate launch` with an FSDP config and `use_cpu`: every process would train alone
        raise RuntimeError(
            f"WORLD_SIZE is {world} but Accelerate set up a single process; on CPUs launch with "
            "ACCELERATE_USE_CPU=true (torchrun) or `accelerate launch --cpu --num_processes N`"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ValueError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; sparsemem supports fsdp_version: 2")
        # FSDP2 plugins hold an offload policy: CPUOffloadPolicy to offload, a plain OffloadPolicy not to
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = plugin.cpu_offload
        offload = offload if isinstance(offload, bool) else isinstance(offload, CPUOffloadPolicy)
        return ShardingSettings(bool(plugin.reshard_after_forward), offload)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"FSDP_VERSION is {version}; sparsemem supports FSDP version 2")
        return ShardingSettings(parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", True), parse_flag_from_env("FSDP_OFFLOAD_PARAMS"))
    return None


def shard_frozen_base(model, keep_whole, settings: ShardingSettings) -> None:
    """`fully_shard` each decoder layer and then the whole model, leaving the parameters in
    `keep_whole` (the learned modules) unsharded on every process."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    keep = set(keep_whole)
    trainable = {p for p in model.parameters() if p.requires_grad}
    if not trainable <= keep:
        raise ValueError("FSDP2 here shards frozen parameters only; a trainable parameter is not kept whole")
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    layers = model.model.layers
    for layer in layers:
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload, ignored_params=keep)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload, ignored_params=keep)
    local, total = local_parameter_count(model)
    logger.info("FSDP2: %d decoder layers sharded; this process holds %d of %d parameters", len(layers), local, total)


def local_parameter_count(model) -> tuple[int, int]:
    """(elements this process stores, elements of the whole model): a shard counts its local part."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total
