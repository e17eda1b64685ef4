"""
One process or many: data-parallel training and evaluation under `torchrun` (torch.distributed).

    torchrun --nproc_per_node 4 train.py ...          # 4 GPUs of one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...

torchrun starts one process per GPU and tells each its RANK, LOCAL_RANK and WORLD_SIZE. Each
process loads the frozen model itself (it is never synchronised), takes a share of every step's
sequences, and after backward the gradients of the learned numbers are summed across processes:
each process divides its summed loss by the target tokens of the whole step, so the sum is the
gradient a single process gets from the whole step, and every process then takes the same
optimizer step from the same numbers. (PyTorch's DistributedDataParallel does this summing with
hooks that overlap it with backward; the learned numbers are few, so one all-reduce after
backward is as fast here, and plainer.) Process 0 alone writes --out and prints.

A failure in one process must not leave the others waiting for it: `together` runs a piece of
work on every process and makes them agree on whether it went well; if not, every process raises
(process 0 with the failing one's message). Collective operations time out after TIMEOUT.
Without torchrun all of this is a single process and does nothing.
"""

import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as td

from mini_gpt2 import UserError

TIMEOUT = timedelta(minutes=30)  # long enough for process 0 to write a fine-tuned model while the others wait
rank, world = 0, 1


class Elsewhere(UserError):
    """Raised on every process when another one failed; its message is that one's."""


class PeerGone(UserError):
    """A collective operation failed: another process has ended (or cannot be reached), as `detail` says."""

    def __init__(self, detail):
        super().__init__(f"another process ended ({detail})")


def collective(op, *args):
    """op(*args), one of torch.distributed's; what its failure raises (often a bare RuntimeError) as PeerGone."""
    try:
        return op(*args)
    except RuntimeError as e:
        raise PeerGone(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def close():
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def setup(device):
    """
    Join the processes torchrun started, if it did: -> this process's device (cuda:LOCAL_RANK on
    CUDA). NCCL between GPUs, gloo between CPUs. Processes other than 0 print nothing.
    """
    global rank, world
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    td.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", timeout=TIMEOUT)
    rank, world = td.get_rank(), td.get_world_size()
    if rank:  # process 0 speaks for all; a bug's traceback still shows, from any process
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *info: traceback.print_exception(*info, file=sys.__stderr__)
        os.environ["TQDM_DISABLE"] = "1"
    return device


def is_main():
    return rank == 0


def together(fn):
    """
    fn() on every process; if it fails on any, it fails on all: the failing process raises its
    own exception, the others an Elsewhere with its message ("process 1: ..."). -> fn()'s result.
    For what may go differently on each process (a file, the memory, the GPU); a check that every
    process computes alike from the same inputs needs none: each raises the same error itself.
    """
    failure = result = None
    try:
        result = fn()
    except Exception as e:  # Ctrl-C and signals are each process's own (cli.run)
        failure = e
    if world > 1:
        said = [None] * world
        collective(td.all_gather_object, said, None if failure is None else str(failure).splitlines()[0] or type(failure).__name__)
        if failure is None and any(s is not None for s in said):
            k = next(i for i, s in enumerate(said) if s is not None)
            raise Elsewhere(f"process {k}: {said[k]}")
    if failure is not None:
        raise failure
    return result


def in_turn(fn):
    """fn() on process 0 first (it may download into the cache), then on the others."""
    if rank == 0:
        result = together(fn)
        together(lambda: None)
        return result
    together(lambda: None)
    return together(fn)


def share(items):
    """This process's share of a list that every process holds alike: every world-th item."""
    return items[rank::world]


def sum_(tensor):
    """The tensor summed over every process (in place, returned)."""
    if world > 1:
        collective(td.all_reduce, tensor)
    return tensor


BUCKET = 1 << 25  # numbers per all-reduce of gradients: all of a prefix's in one; a fine-tuned model's in pieces


def sum_gradients(module):
    """Each learned number's gradient summed over every process, in as few all-reduces as fit BUCKET."""
    if world == 1:
        return
    for p in module.parameters():  # a process whose share was empty has no gradient yet: zero, for the sum
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads, bucket = [p.grad for p in module.parameters()], []
    for i, g in enumerate(grads):
        bucket.append(g)
        if i == len(grads) - 1 or sum(b.numel() for b in bucket) + grads[i + 1].numel() > BUCKET:
            flat = sum_(torch.cat([b.flatten() for b in bucket]))
            for b, piece in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(piece.view_as(b))
            bucket = []


def gather(items):
    """Every process's list, one after the other: each process gets all of them."""
    if world == 1:
        return [items]
    said = [None] * world
    collective(td.all_gather_object, said, items)
    return said
