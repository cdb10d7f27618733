"""The torchrun environment, the process group, and the few small collectives prefix needs.

With one process (no torchrun, or --nproc-per-node 1) no process group is created and every
collective is a no-op, so the same code runs on a laptop.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from prefix.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    """auto is cuda when one is visible, else cpu (never mps: ask for it by name)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: cuda was asked for but no CUDA device is visible; "
                        "use trainer.device=auto or cpu, or run where a GPU is attached")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device: mps was asked for but this machine has no usable MPS device "
                        "(Apple silicon with an MPS build of torch); use trainer.device=auto or cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        # TF32 tensor cores for the float32 matmuls left outside autocast (set once, per process).
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda", local_rank)
    if preference == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not an integer; torchrun sets it, "
                        "so unset it or launch with torchrun") from None


class PeerLost(Exception):
    """A collective waited `distributed.timeout_s` for a peer (frozen, partitioned or gone)."""


_TIMEOUT = timedelta(seconds=600)


def timeout() -> timedelta:
    """The collective timeout the process group was created with (for groups made later)."""
    return _TIMEOUT


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is a collective (or its store) giving up on a peer, rather than a bug."""
    text = str(error)
    return isinstance(error, (RuntimeError, dist.DistError)) and any(
        marker in text for marker in ("Timed out", "timed out", "Timeout", "Connection closed by peer",
                                      "Connection reset by peer", "Broken pipe"))


def local(device_preference: str = "auto") -> World:
    """This process's place in torchrun's environment and its device, before any process group exists: what a
    start checks, and takes the run's lease with, while the group comes up (`join`)."""
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if world_size > 1 and missing:
        raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun, "
                        "or unset WORLD_SIZE for a single process")
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and device.type == "mps":
        # gloo, the only backend that runs on a Mac, takes CPU and CUDA tensors only: DDP's
        # gradient all-reduce cannot run on MPS tensors (pytorch/pytorch#160732).
        raise UserError(f"trainer.device: mps runs one process, not {world_size}; launch without torchrun "
                        "(or --nproc-per-node 1), or use trainer.device=cpu for several ranks")
    if device.type == "cpu":  # share the cores among the ranks of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return World(rank, local_rank, world_size, local_world, device)


def join(world: World, timeout_s: float = 600, always_group: bool = False) -> World:
    """Join the process group (nccl on CUDA, gloo otherwise); `world` is `local`'s.

    always_group: create one even for a single process (FSDP's device mesh needs it); without
    torchrun's rendezvous it is a group of one over an in-memory store."""
    global _TIMEOUT
    _TIMEOUT = timedelta(seconds=timeout_s)
    if (world.world_size > 1 or always_group) and not dist.is_initialized():
        backend = "nccl" if world.device.type == "cuda" else "gloo"  # gloo: CPU (and MPS laptops, one process)
        torchrun = all(v in os.environ for v in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
        alone = {} if world.world_size > 1 or torchrun else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **alone)
    return world


def init(device_preference: str = "auto", timeout_s: float = 600, always_group: bool = False) -> World:
    """Read torchrun's environment and join the process group: `local`, then `join`."""
    return join(local(device_preference), timeout_s, always_group)


def dtensor_type() -> type | None:
    """DTensor (a shard of a tensor), or None while nothing has imported it, in which case no tensor can be
    one: lets the DDP path check for shards without paying torch.distributed.tensor's import (~1 s)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def any_true(world: World, *flags: bool) -> tuple[bool, ...]:
    """One small all-reduce: each flag is true on every rank if it is true on any rank."""
    if not world.distributed:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def all_sum(world: World, values: list[float]) -> list[float]:
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast(world: World, obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` on every rank (over `group`, a gloo group, when given)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=world.device if group is None else None, group=group)
    return box[0]


def on_main(world: World, fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn`; every rank gets its result, or raises the UserError it raised."""
    result: Any = None
    if world.is_main:
        try:
            result = fn()
        except UserError as e:
            result = e
    result = broadcast(world, result)
    if isinstance(result, UserError):
        result.same_on_every_rank = True
        raise result
    return result


class Ahead(Generic[T]):
    """`on_main` begun early: rank 0 runs `fn` in a thread from now on (the process group need not exist yet),
    while every rank goes on with its own work; `result()`, a collective, then gives every rank its value or
    raises on every rank the UserError it raised. What a start reads ahead of needing it (its checkpoint,
    verified while the group comes up and the imports run)."""

    def __init__(self, world: World, fn: Callable[[], T]):
        self.world = world
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, args=(fn,), name="prefix-ahead", daemon=True)
        if world.is_main:
            self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._outcome = (fn(), None)
        except BaseException as e:  # noqa: BLE001 (raised again by result(), on the caller's thread)
            self._outcome = (None, e)

    def result(self) -> T:
        def outcome() -> T:
            self._thread.join()
            value, error = self._outcome
            if error is not None:
                raise error
            return value

        return on_main(self.world, outcome)


def gather(world: World, obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere); over `group` when given."""
    if not world.distributed:
        return [obj]
    box: list[Any] | None = [None] * world.world_size if world.is_main else None
    dist.gather_object(obj, box, dst=0, group=group)
    return box or []


def barrier(world: World) -> None:
    if world.distributed:
        if world.device.type == "cuda":
            dist.barrier(device_ids=[world.local_rank])
        else:
            dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
