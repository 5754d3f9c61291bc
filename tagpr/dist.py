"""Everything distributed, in one place; a no-op on one process.

The same script runs as `python train_x.py` and `torchrun --nproc_per_node=N [--nnodes …]
train_x.py`: `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and
starts NCCL on CUDA or gloo on CPU. Reductions return their input when alone; stop
flags are synced so that no rank waits forever for one that quit.

FSDP2 (`apply_fsdp`): `fully_shard` each decoder layer, then the root, with an explicit
`MixedPrecisionPolicy` — bf16 parameters with fp32 gradient reduction on CUDA, fp32
throughout on CPU — and optional activation checkpointing per layer. Large models are
built on the meta device on every rank; only rank 0 reads the weights (on CPU), and
each rank allocates just its shard and receives it by broadcast from rank 0.
"""

from __future__ import annotations

import builtins
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .models import decoder_layers, layer_list, reinit_buffers


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_STATE = Dist()


def init(device: str | None = None) -> Dist:
    """Start the process group from torchrun's environment (or nothing, alone)."""
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    _STATE = Dist(rank, world, local, dev)
    return _STATE


def get() -> Dist:
    return _STATE


def destroy() -> None:
    """The end of a run, on every rank: wait for all of them, then take the process group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process() -> None:
    """A trainer's last line when it runs as one of several ranks: end the process now, skipping Python's
    finalisation. Gloo's C++ threads can be torn down in the wrong order there, and a rank then aborts
    (`terminate called without an active exception`, SIGABRT) after everything was written, which torchrun
    reports as a failed run. Everything of ours is written and closed by then (atomic files, `destroy()`
    done). Alone (one process, or tests calling `main()` in-process) it returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)


def print0(*args, **kwargs) -> None:
    if _STATE.is_main:
        builtins.print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum / max / min / mean across ranks, in place; the input itself when alone."""
    if not dist.is_initialized():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op == "mean":
        dist.all_reduce(t, dist.ReduceOp.SUM)
        return t.div_(dist.get_world_size())
    dist.all_reduce(t, ops[op])
    return t


def sum_scalar(x: float) -> float:
    return all_reduce(torch.tensor(float(x), dtype=torch.float64, device=_comm_device())).item()


def any_true(flag: bool) -> bool:
    """True on every rank if it is true on any rank (stop flags, bad batches)."""
    return bool(all_reduce(torch.tensor(int(flag), device=_comm_device()), "max").item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    return _STATE.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- FSDP2


def apply_fsdp(
    model: torch.nn.Module,
    device: torch.device,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    full_state: dict | None = None,
    from_meta: bool = False,
) -> torch.nn.Module:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, lm_head).

    `from_meta`: the model was built on the meta device (`models.load_for_sharding`);
    each rank allocates only its shard and receives its values from rank 0's
    `full_state` (keys of the unwrapped model, or of `model.lm` for a wrapper).
    On one process this only moves the model and applies activation checkpointing.
    """
    layers = decoder_layers(model)
    if activation_checkpointing:
        parent = layer_list(model)
        for i, layer in enumerate(layers):
            parent[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        layers = list(parent)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model.to(device)

    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    if not from_meta:
        model.to(device)
    for layer in layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if from_meta:
        model.to_empty(device=device)
        prefix = "lm." if hasattr(model, "lm") else ""
        full = {prefix + k: v for k, v in full_state.items()} if full_state is not None else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        reinit_buffers(model, device)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)
