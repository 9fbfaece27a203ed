"""The processes one command runs in: one by default, or the ranks `torchrun` / `accelerate launch` started.

Under a launcher (WORLD_SIZE > 1) fsclip is data-parallel: each rank encodes its part of the images and
trains on its part of every global batch, the ranks exchange what they computed, and all of them end
with the same result; only the main process writes outputs and prints. The process group and its
collectives are Accelerate's (`PartialState`, `gather_object`, `broadcast_object_list`); a training step
is wrapped in DDP by `Accelerator.prepare_model` (`DataParallel`).

In one process (the default) nothing here starts a process group or builds an `Accelerator`: every
helper hands back its input. `alone()` makes one rank act as a single process, for work it does by
itself (the runs of an evaluation sweep it was given).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch
from torch import nn

from fsclip.errors import AdapterError, FsclipError, UsageError

__all__ = [
    "DataParallel",
    "alone",
    "batch_part",
    "broadcast",
    "device",
    "gather",
    "gather_results",
    "is_local_main",
    "is_main",
    "launch_rank",
    "launched",
    "leave",
    "map_parts",
    "part",
    "rank",
    "raised_on_every_rank",
    "setup",
    "size",
]

T = TypeVar("T")
R = TypeVar("R")

_alone = 0  # depth of `alone()` blocks
_cpu: bool | None = None  # set by `setup`; None: gloo only where there is no GPU
# launcher settings that would make Accelerate shard or compile the model instead of plain DDP
_UNSUPPORTED = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP",
                "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def launched() -> bool:
    """Whether a launcher started several processes for this command (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def launch_rank() -> int:
    """This process's rank as the launcher numbered it (RANK), without joining the process group."""
    try:
        return int(os.environ.get("RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def _state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = _cpu if _cpu is not None else not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    return PartialState(cpu=cpu)  # the first call joins the process group; later ones return it


def setup(device: str = "auto") -> None:
    """Join the launcher's process group before a model loads: gloo for `cpu`, NCCL for GPUs.

    Each rank takes its own GPU (LOCAL_RANK), so under a launcher `device` is `auto`, `cuda` or `cpu`.

    Raises:
        UsageError: another device, or an Accelerate config that asks for DeepSpeed, FSDP or Megatron-LM.
    """
    global _cpu
    if not launched():
        return
    if str(device) not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {device} under torchrun / accelerate launch: each rank takes its own GPU "
                         "(LOCAL_RANK); use --device auto, cuda or cpu")
    if str(device) == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available")
    from accelerate.utils import parse_flag_from_env

    chosen = [name for flag, name in _UNSUPPORTED.items() if parse_flag_from_env(flag)]
    if chosen:
        raise UsageError(f"fsclip trains data-parallel (DDP); the Accelerate config asks for {chosen[0]}: "
                         "run `accelerate config` again and choose multi-GPU (or multi-CPU)")
    _cpu = str(device) == "cpu" or not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    _state()


def leave() -> None:
    """Leave the process group with the other ranks: wait until every rank gets here, then destroy it.

    torchrun stops every rank as soon as one exits with an error, so a rank that left first could cut
    the main process off while it reports; and a process group left to interpreter exit can abort a
    rank whose peers are gone. The wait is bounded on gloo (a rank that never comes reported for itself).
    """
    if not launched() or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    try:
        if torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            _state().wait_for_everyone()
    except RuntimeError:
        pass
    _state().destroy_process_group()


def size() -> int:
    """Number of processes working together (1 in one process, and inside `alone()`)."""
    return 1 if _alone or not launched() else _state().num_processes


def rank() -> int:
    return 0 if size() == 1 else _state().process_index


def is_main() -> bool:
    """The process that writes outputs and prints (always, in one process)."""
    return rank() == 0


def is_local_main() -> bool:
    """The first process on this machine: it writes the machine's caches."""
    return size() == 1 or _state().local_process_index == 0


def device() -> torch.device:
    """This rank's device (`cuda:LOCAL_RANK` or cpu); in one process Accelerate's best local device."""
    if not launched():
        from accelerate import PartialState

        return PartialState().device
    return _state().device


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within the block this process works by itself: every helper acts as in one process."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def broadcast(value: T) -> T:
    """Rank 0's `value`, on every rank: decisions taken from measurements (a step's time, the budget
    left) are rank 0's, so every rank runs the same schedule."""
    if size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if size() == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def part(n: int, of_rank: int | None = None) -> range:
    """A rank's contiguous part of `range(n)`, as `numpy.array_split` cuts it (empty where n < size).

    Parts in rank order concatenate to `range(n)`: results gathered from the parts keep the order."""
    world = size()
    r = rank() if of_rank is None else of_rank
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def batch_part(n: int) -> tuple[range, float]:
    """This rank's part of a global batch of `n`, and the weight of its mean loss.

    The weight is the part's share of the batch times the number of ranks, so the average of the
    ranks' weighted gradients (what DDP computes) is the gradient of the global batch's mean loss,
    whatever the split. A rank left without a sample (n < ranks) gets the first one at weight 0: it
    still runs the step, so random streams drawn during the loss (LoRA's prompt template) stay in step.
    """
    own = part(n)
    if size() == 1:
        return own, 1.0
    if not own:
        return range(0, 1), 0.0
    return own, size() * len(own) / n


def raised_on_every_rank(error: BaseException) -> bool:
    """Whether every rank raised this error (then only the main process needs to report it)."""
    return getattr(error, "fsclip_every_rank", False)


def gather_results(fn: Callable[[], R]) -> list[R]:
    """`fn()` on this rank; every rank's result, in rank order, on every rank.

    An `FsclipError` on any rank (an unreadable image in its part) is raised on every rank, once all
    have finished their work, so they stop together instead of waiting for each other.
    """
    if size() == 1:
        return [fn()]
    try:
        result, error = fn(), None
    except FsclipError as e:
        result, error = None, (type(e), str(e))
    gathered = gather((result, error))
    for _, error in gathered:
        if error is not None:
            exc = error[0](error[1])
            exc.fsclip_every_rank = True
            raise exc
    return [result for result, _ in gathered]


def map_parts(n: int, fn: Callable[[range], R]) -> list[R]:
    """`fn` on this rank's part of `range(n)`; every rank's result, in rank order, on every rank
    (errors as in `gather_results`)."""
    return gather_results(lambda: fn(part(n)))


def _checksum(params: dict[str, nn.Parameter]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Step(nn.Module):
    """The trained parameters as one module whose forward is the step's loss: what DDP wraps."""

    def __init__(self, params: dict[str, nn.Parameter], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.trained = nn.ParameterList(list({id(p): p for p in params.values()}.values()))
        self.loss_fn = loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(inputs, targets)


class DataParallel:
    """The loss of a training step, with the trained parameters' gradients averaged over the ranks.

    Methods compute their loss through backend calls (`forward_images`, the text tower, ...) rather
    than one module's forward, so the module DDP wraps (`Accelerator.prepare_model`) is the trained
    parameters themselves with the loss as its forward: DDP broadcasts rank 0's starting values and,
    during backward, averages the gradients in buckets, overlapped with the backward pass.
    `find_unused`: parameters may drop out of the graph during training (gradual unfreezing).

    Each rank draws from its own torch random stream while training (dropout masks differ per rank,
    as per sample in one process); the stream every rank shares is restored by `close`.
    In one process this is `loss_fn` itself: nothing is wrapped and no random stream changes.
    """

    def __init__(self, params: dict[str, nn.Parameter], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 find_unused: bool = False):
        self.params, self.loss_fn = params, loss_fn
        self.module: nn.Module | None = None
        self._accelerator = None
        self._stack = contextlib.ExitStack()
        if size() == 1:
            return
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        where = next(iter(params.values())).device
        self._stack.enter_context(torch.random.fork_rng(devices=[where] if where.type == "cuda" else []))
        torch.manual_seed((torch.initial_seed() + rank()) % 2**63)
        # mixed precision stays fsclip's own (--dtype, bf16 autocast on GPUs), whatever the launch config says
        self._accelerator = Accelerator(
            cpu=where.type == "cpu", mixed_precision="no", device_placement=False, dynamo_backend="no",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
        self.module = self._accelerator.prepare_model(_Step(params, loss_fn), device_placement=False)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The loss of this rank's part of the batch, times its `batch_part` weight."""
        if self.module is None:
            return self.loss_fn(inputs, targets)  # one process: the weight is 1
        return self.module(inputs, targets) * weight

    def check_same(self) -> None:
        """Every rank must end with the same weights (DDP keeps them so); anything else is a bug to report.

        Raises:
            AdapterError: the ranks' trained weights differ.
        """
        if self.module is None:
            return
        sums = gather(_checksum(self.params))
        if len(set(sums)) > 1:
            error = AdapterError(f"the {len(sums)} ranks ended training with different weights "
                                f"({', '.join(sorted(set(sums)))}); data-parallel training went wrong, please report it")
            error.fsclip_every_rank = True
            raise error

    def close(self) -> None:
        """Drop the DDP wrapper (Accelerate keeps a reference to it) and restore the shared random stream."""
        if self._accelerator is not None:
            self._accelerator.free_memory()
            self._accelerator = self.module = None
        self._stack.close()
