"""Training on several processes and machines with PyTorch's own engine: ``torchrun`` launches (or
``accelerate launch --multi_gpu``, which runs torchrun's launcher and also works on CPUs),
``--strategy ddp`` replicates the model (DistributedDataParallel), ``--strategy fsdp`` shards it
(FSDP2 ``fully_shard``: every parameter, frozen base weights included, split by rows across the
processes and gathered per transformer block for its forward and backward).

    torchrun --nproc_per_node 4 -m dorakit train --strategy fsdp --model DIR --data FILE ...

What keeps a run independent of the process count:

- ``--batch-size`` is the global batch. Every process builds the same global batch (the order is a
  function of the seed and the position) and takes every world-th example of it; the loss is
  summed over tokens and divided by the global batch's trained tokens, times the process count
  because DDP and FSDP average gradients. So the gradient is the one-process gradient.
- The DoRA norm needs whole rows of W0 + sBA. FSDP2 shards by rows and gathers the whole weight
  before a block's forward, so the layer computes the norm from full tensors as usual (no
  identity-matrix trick); its step cache is switched off because the gathered tensors are new
  each forward (see ``AdapterLayer.cache_norms``).
- Checkpoints go through ``torch.distributed.checkpoint`` (each process writes its shards of the
  adapter and optimizer state; frozen weights are not saved), so a run resumes on any number of
  processes, and the finished adapter is gathered and written once, by rank 0, in PEFT's format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..integrations.transformers import default_device
from ..inject import adapter_layers
from .loss import loss_sum

Strategy = Literal["none", "ddp", "fsdp"]


@dataclass
class Dist:
    """This process's place in the run (one process: rank 0 of 1, strategy none)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def sum(self, value: Tensor) -> float:
        """The sum of a one-element ``value`` over processes, on every process (one host sync)."""
        if self.active:
            value = value.detach().to(device=self.device, dtype=torch.float64).clone()
            dist.all_reduce(value)
        return float(value)

    def any(self, flag: bool) -> bool:
        """True on every process when any process says so (e.g. a stop signal seen by one)."""
        if not self.active:
            return flag
        return self.sum(torch.tensor(1.0 if flag else 0.0)) > 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every process (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every process's ``value``, in rank order (on every process)."""
        if not self.active:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.barrier()  # without it FSDP processes sometimes abort at exit
            dist.destroy_process_group()


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_commands(strategy: str) -> str:
    """The commands that start N processes of ``dorakit train`` (both work on CPUs, with gloo)."""
    strategy = strategy if strategy != "none" else "ddp"
    return (f"torchrun --nproc_per_node N -m dorakit train --strategy {strategy} ... or "
            f"accelerate launch --multi_gpu --num_processes N -m dorakit train --strategy {strategy} ...")


def accelerate_single_process_launch() -> bool:
    """``accelerate launch`` without ``--multi_gpu`` (``--cpu``, or no GPU on the machine) starts one
    process whatever ``--num_processes`` says: its simple launcher sets ``ACCELERATE_USE_CPU``, and
    ``MASTER_ADDR`` when more than one process was asked for, but no ``RANK`` (issue 14)."""
    return "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "RANK" not in os.environ


def init_distributed(strategy: str) -> Dist:
    """Join the process group torchrun (or ``accelerate launch --multi_gpu``, which runs torchrun) set
    up (gloo on CPU, nccl on CUDA), or run alone.

    Raises:
        ValueError: several processes without a strategy, a strategy without a launcher, or
            ``accelerate launch`` asked for several processes without ``--multi_gpu`` (it starts one).
    """
    if accelerate_single_process_launch():
        raise ValueError("accelerate launch without --multi_gpu (e.g. with --cpu) starts a single process whatever "
                         f"--num_processes says. For several processes, on CPUs too, run: {launch_commands(strategy)}")
    world = launched_processes()
    if strategy == "none":
        if world > 1:
            raise ValueError(f"torchrun started {world} processes but --strategy is none; pass --strategy ddp "
                             "(replicate the model) or --strategy fsdp (shard it).")
        return Dist(device=default_device())
    if "RANK" not in os.environ or not dist.is_available():
        raise ValueError(f"--strategy {strategy} runs under a launcher that starts the processes: "
                         f"{launch_commands(strategy)} (N=1 works too).")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, device, strategy)


class TrainStep(nn.Module):
    """The loss of a micro-batch as one module's forward, so that DDP's and FSDP's forward hooks run
    around everything the loss touches (the selective head calls the decoder and the head apart)."""

    def __init__(self, model: nn.Module, task: str, selective: bool) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.selective = selective

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return loss_sum(self.model, batch, self.task, self.selective)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers names their classes in
    ``_no_split_modules``; otherwise the members of the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(step: TrainStep, run: Dist, autocast: torch.dtype | None) -> nn.Module:
    """``step`` under the run's strategy: itself, DDP around it, or FSDP2 over its blocks and root."""
    if run.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.device.index] if run.device.type == "cuda" else None
        return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=False)
    if run.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # On GPUs with bf16 autocast the gathered weights are bf16 and gradients reduce in fp32.
        policy = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32) if autocast else MixedPrecisionPolicy()
        for block in transformer_blocks(step.model):
            fully_shard(block, mp_policy=policy)
        fully_shard(step, mp_policy=policy)
        for _, layer in adapter_layers(step.model):
            layer.cache_norms = False
    return step


def set_gradient_sync(wrapped: nn.Module, run: Dist, sync: bool):
    """A context for one micro-batch: gradients are reduced across processes only on the last one."""
    import contextlib

    if run.strategy == "ddp" and not sync:
        return wrapped.no_sync()
    if run.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


class FullParameters:
    """For evaluation under FSDP: gather the root's own parameters (embeddings, final norm, head), which
    only the root's forward would gather, so the inner model can be called directly."""

    def __init__(self, wrapped: nn.Module, run: Dist) -> None:
        self.wrapped = wrapped if run.strategy == "fsdp" else None

    def __enter__(self):
        if self.wrapped is not None:
            self.wrapped.unshard()
        return self

    def __exit__(self, *exc) -> None:
        if self.wrapped is not None:
            self.wrapped.reshard()


def full_trainable_state(wrapped: nn.Module, run: Dist) -> dict[str, Tensor]:
    """The trainable tensors (adapters, modules_to_save copies) as whole CPU tensors keyed as in the
    unwrapped model's state dict. Collective under FSDP: every process calls it; rank 0 gets them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(wrapped, options=options)
    prefix = "model."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
