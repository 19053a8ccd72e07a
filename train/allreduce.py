"""Gradient synchronization written by hand, on point-to-point messages only.

Dive into Deep Learning's multi-GPU chapter sums every device's gradients on one device and
copies the sum back (`allreduce`). Here the devices are torchrun workers, and the only
primitives are `send`/`recv`/`isend`/`irecv`: no collective from torch.distributed. Two
algorithms: `naive` (the book's: everything to rank 0 and back; rank 0 moves 2(n-1)·S
bytes) and `ring` (reduce-scatter then all-gather around a ring; every rank moves
2(n-1)/n·S bytes, whatever n is). Works on CPU tensors with gloo and CUDA tensors with NCCL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist


def _world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, rank: int) -> int:
    """A rank of `group` as the global rank that send/recv expect."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> None:
    """Send to one neighbour while receiving from the other (both at once: no deadlock)."""
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, _peer(group, dst), group))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, _peer(group, src), group))
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()


def _in_place(tensor: torch.Tensor, algorithm: Callable[[torch.Tensor, object], None],
              group) -> None:
    """Run `algorithm` on a flat contiguous view; copy back if `tensor` was not contiguous."""
    if tensor.is_contiguous():
        algorithm(tensor.view(-1), group)
    else:
        flat = tensor.contiguous().view(-1)
        algorithm(flat, group)
        tensor.copy_(flat.view_as(tensor))


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> None:
    """In place: every rank ends with `src`'s values (src sends to each rank in turn)."""
    rank, world = _world(group)
    if world == 1 or tensor.numel() == 0:
        return
    if rank == src:
        requests = [dist.isend(tensor.contiguous(), _peer(group, dst), group)
                    for dst in range(world) if dst != src]
        for request in requests:
            request.wait()
    elif tensor.is_contiguous():
        dist.recv(tensor, _peer(group, src), group)
    else:
        incoming = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        dist.recv(incoming, _peer(group, src), group)
        tensor.copy_(incoming)


def _naive(flat: torch.Tensor, group) -> None:
    rank, world = _world(group)
    if rank != 0:
        # Every rank sends its data to rank 0, then waits for the sum.
        dist.send(flat, _peer(group, 0), group)
        dist.recv(flat, _peer(group, 0), group)
        return
    # Rank 0 adds everyone's data to its own...
    incoming = torch.empty_like(flat)
    for src in range(1, world):
        dist.recv(incoming, _peer(group, src), group)
        flat += incoming
    # ...and copies the sum back to every rank.
    requests = [dist.isend(flat, _peer(group, dst), group) for dst in range(1, world)]
    for request in requests:
        request.wait()


def allreduce_naive(tensor: torch.Tensor, group=None) -> None:
    """In-place SUM across ranks, the book's way: all to rank 0, the sum back to all."""
    if dist.get_world_size(group) > 1 and tensor.numel():
        _in_place(tensor, _naive, group)


def _ring(flat: torch.Tensor, group) -> None:
    rank, world = _world(group)
    chunks = list(flat.tensor_split(world))  # sizes differ by at most one element
    right, left = (rank + 1) % world, (rank - 1) % world
    incoming = torch.empty_like(chunks[0])  # the first chunk is a largest one
    # Reduce-scatter: after n-1 steps rank r holds the full sum of chunk (r+1) mod n.
    for step in range(world - 1):
        send, recv = (rank - step) % world, (rank - step - 1) % world
        buffer = incoming[:chunks[recv].numel()]
        _exchange(chunks[send], right, buffer, left, group)
        chunks[recv] += buffer
    # All-gather: pass the finished sums around the ring, straight into place.
    for step in range(world - 1):
        send, recv = (rank - step + 1) % world, (rank - step) % world
        _exchange(chunks[send], right, chunks[recv], left, group)


def allreduce_ring(tensor: torch.Tensor, group=None) -> None:
    """In-place SUM across ranks: ring reduce-scatter, then ring all-gather."""
    if dist.get_world_size(group) > 1 and tensor.numel():
        _in_place(tensor, _ring, group)


ALGORITHMS: dict[str, Callable[..., None]] = {"naive": allreduce_naive, "ring": allreduce_ring}


def split_batch(images: torch.Tensor, labels: torch.Tensor,
                parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The book's split_batch: `parts` micro-batches along dim 0, sizes differing by at most
    one (here for gradient accumulation, inside one worker's share of the batch)."""
    if not 1 <= parts <= images.shape[0]:
        raise ValueError(f"cannot split a batch of {images.shape[0]} into {parts} parts")
    return list(zip(images.tensor_split(parts), labels.tensor_split(parts), strict=True))


def _buckets(params: list[torch.nn.Parameter],
             bucket_mb: float | None) -> list[list[torch.nn.Parameter]]:
    """Parameters in reverse registration order (their gradients are ready last to first),
    grouped by dtype and device into buckets of at most `bucket_mb` MiB."""
    if bucket_mb is None:
        return [[p] for p in reversed(params)]
    cap = bucket_mb * 2**20
    buckets: list[list[torch.nn.Parameter]] = []
    open_bucket: dict[tuple, list[torch.nn.Parameter]] = {}
    sizes: dict[tuple, int] = {}
    for p in reversed(params):
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        if key in open_bucket and sizes[key] + nbytes > cap:
            del open_bucket[key]
        if key not in open_bucket:
            open_bucket[key] = []
            buckets.append(open_bucket[key])
            sizes[key] = 0
        open_bucket[key].append(p)
        sizes[key] += nbytes
    return buckets


class GradientSync:
    """Averages gradients across ranks with one of ALGORITHMS, bucket by bucket."""

    def __init__(self, params: Iterable[torch.nn.Parameter], algorithm: str,
                 bucket_mb: float | None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown allreduce algorithm {algorithm!r}; "
                             f"choose one of {', '.join(ALGORITHMS)}")
        if bucket_mb is not None and bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive; got {bucket_mb}")
        self.allreduce = ALGORITHMS[algorithm]
        self.per_parameter = bucket_mb is None
        self.buckets = _buckets([p for p in params if p.requires_grad], bucket_mb)
        # One flat buffer per bucket, allocated once and reused every step.
        self.buffers = [torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype,
                                    device=b[0].device) for b in self.buckets]

    @property
    def bucket_sizes(self) -> list[int]:
        return [buffer.numel() for buffer in self.buffers]

    def sync(self) -> None:
        world = dist.get_world_size()
        if world == 1:
            return
        for params, buffer in zip(self.buckets, self.buffers, strict=True):
            if self.per_parameter:
                self._sync_one(params[0], world)
            else:
                self._sync_bucket(params, buffer, world)

    def _sync_one(self, p: torch.nn.Parameter, world: int) -> None:
        # The book's way: one allreduce per gradient tensor, in place.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        self.allreduce(p.grad)
        p.grad.div_(world)

    def _sync_bucket(self, params: list[torch.nn.Parameter], buffer: torch.Tensor,
                     world: int) -> None:
        # Flatten: the bucket's gradients into one contiguous buffer (missing ones as zeros).
        offset = 0
        for p in params:
            part = buffer[offset:offset + p.numel()]
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.reshape(-1))  # logical order, also for channels_last grads
            offset += p.numel()
        # Allreduce: one message exchange for the whole bucket, then the mean.
        self.allreduce(buffer)
        buffer.div_(world)
        # Copy back INTO each gradient tensor; rebinding p.grad to a temporary instead is
        # how the book's replicas once drifted apart silently (d2l #955).
        offset = 0
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
