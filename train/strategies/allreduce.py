"""Gradient synchronization written by hand, on point-to-point messages only.

Dive into Deep Learning's multi-GPU chapter sums every device's gradients on one device and
copies the sum back (`allreduce`). Here the devices are torchrun workers, and the only
primitives are `send`/`recv`/`isend`/`irecv`: no collective from torch.distributed. Two
algorithms, for a tensor of S bytes on n ranks: `naive` (the book's: everything to rank 0 and
back; rank 0 sends and receives (n-1)·S bytes each) and `ring` (reduce-scatter then all-gather
around a ring; every rank sends 2(n-1)/n·S bytes, whatever n is). CPU tensors with gloo and
CUDA tensors with NCCL alike, no `.item()`; CUDA tensors on gloo (whose send/recv read host
memory only) travel through a host copy.

Every message goes through `batch_isend_irecv`, alone or with others: NCCL runs messages
posted one by one one after another, and may carry a lone send/recv on another communicator
than a batched one (which then never meet). gloo answers a batch with one Work per message,
NCCL with ONE Work for all: callers wait on whatever came back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist


def _world(group) -> tuple[int, int]:
    """(this rank, number of ranks) in `group`; None is the default group."""
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, rank: int) -> int:
    """A rank of `group` as the global rank that send/recv expect."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _post(ops: list) -> list:
    """Post `ops` together; the Works that came back (one per op on gloo, ONE on NCCL)."""
    return dist.batch_isend_irecv(ops) if ops else []


def _wait_all(works: list) -> None:
    for work in works:
        work.wait()


def _alone(op: Callable, tensor: torch.Tensor, peer: int, group) -> None:
    """One message (`dist.isend` or `dist.irecv`), posted as a batch of one, awaited."""
    _wait_all(_post([dist.P2POp(op, tensor, _peer(group, peer), group)]))


def _as_they_arrive(ops: list, receives: int) -> Iterator[int]:
    """Post `ops`, whose last `receives` are receives; yield each receive's index once its data
    is in place (gloo: as each completes, the others still in flight; NCCL: all after its one
    Work, on the GPU's stream), then wait for the sends."""
    works = _post(ops)
    sends = len(ops) - receives
    if len(works) != len(ops):
        _wait_all(works)
        yield from range(receives)
        return
    for i, work in enumerate(works[sends:]):
        work.wait()
        yield i
    _wait_all(works[:sends])


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> None:
    """Send to one neighbour while receiving from the other.

    Both are posted together: two blocking sends facing each other would deadlock, and NCCL
    runs a batch as one group so that neither waits for the other. Empty chunks are skipped on
    both sides alike (a chunk has the same size on every rank).
    """
    ops = [dist.P2POp(dist.isend, send, _peer(group, dst), group)] if send.numel() else []
    ops += [dist.P2POp(dist.irecv, recv, _peer(group, src), group)] if recv.numel() else []
    _wait_all(_post(ops))


SEGMENT = 2**19  # elements: a chunk travels in pieces so that adding one overlaps the next


def _exchange_and_add(send: torch.Tensor, dst: int, buffer: torch.Tensor, src: int,
                      target: torch.Tensor, group) -> None:
    """`_exchange`, then `target += buffer`, in segments: on gloo each received segment is
    added while the next ones are still in flight (gloo moves them on its own threads). Both
    neighbours cut a chunk alike, since a chunk has the same size on every rank."""
    sends = send.split(SEGMENT) if send.numel() else ()
    parts = []
    if buffer.numel():
        parts = list(zip(buffer.split(SEGMENT), target.split(SEGMENT), strict=True))
    ops = [dist.P2POp(dist.isend, s, _peer(group, dst), group) for s in sends]
    ops += [dist.P2POp(dist.irecv, part, _peer(group, src), group) for part, _ in parts]
    for i in _as_they_arrive(ops, len(parts)):
        part, into = parts[i]
        into += part


def _in_place(tensor: torch.Tensor, algorithm: Callable[[torch.Tensor, object], None],
              group) -> None:
    """Run `algorithm` on a flat contiguous view; copy back if `tensor` was not contiguous.

    CUDA tensors on gloo go through host memory: gloo's send/recv hand the tensor's pointer to
    its TCP transport, which reads host memory only (its collectives stage CUDA tensors)."""
    if tensor.device.type == "cuda" and dist.get_backend(group) == "gloo":
        host = tensor.detach().to("cpu", memory_format=torch.contiguous_format)
        algorithm(host.view(-1), group)
        tensor.copy_(host)
    elif tensor.is_contiguous():
        algorithm(tensor.view(-1), group)
    else:
        flat = tensor.contiguous().view(-1)
        algorithm(flat, group)
        tensor.copy_(flat.view_as(tensor))


def _broadcast(flat: torch.Tensor, group, src: int) -> None:
    rank, world = _world(group)
    if rank != src:
        _alone(dist.irecv, flat, src, group)
        return
    # The source sends to every other rank at once, as one batch: n-1 messages of the tensor.
    _wait_all(_post([dist.P2POp(dist.isend, flat, _peer(group, dst), group)
                     for dst in range(world) if dst != src]))


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> None:
    """In place: every rank ends with the values of rank `src` (a rank of `group`)."""
    world = dist.get_world_size(group)
    if not 0 <= src < world:
        raise ValueError(f"broadcast source {src} is not a rank of a group of {world}")
    if world > 1 and tensor.numel():
        _in_place(tensor, functools.partial(_broadcast, src=src), group)


_RECEIVE_BUFFERS: dict[tuple, torch.Tensor] = {}


def _receive_buffer(like: torch.Tensor, copies: int = 1) -> torch.Tensor:
    """A reused flat buffer for `copies` tensors shaped like `like`, for incoming data.

    A fresh 32 MiB tensor per call costs page faults on every first touch: here that doubled
    the time of a 64 MiB ring allreduce. Gradient buckets come in the same few sizes every
    step, so a handful of buffers are kept (the most recent 8 shapes).
    """
    key = (like.numel() * copies, like.dtype, like.device)
    buffer = _RECEIVE_BUFFERS.pop(key, None)
    if buffer is None:
        buffer = torch.empty(key[0], dtype=like.dtype, device=like.device)
        if len(_RECEIVE_BUFFERS) >= 8:
            del _RECEIVE_BUFFERS[next(iter(_RECEIVE_BUFFERS))]
    _RECEIVE_BUFFERS[key] = buffer  # most recently used last
    return buffer


def _naive(flat: torch.Tensor, group) -> None:
    rank, world = _world(group)
    if rank != 0:
        # Every other rank sends its data to rank 0, then waits for the sum.
        _alone(dist.isend, flat, 0, group)
        _alone(dist.irecv, flat, 0, group)
        return
    # Rank 0 receives everyone's data, all messages posted as one batch (NCCL would run them
    # one after another otherwise), and adds them to its own, rank by rank (the book's GPU 0)...
    incoming = _receive_buffer(flat, world - 1).view(world - 1, -1)
    ops = [dist.P2POp(dist.irecv, incoming[src - 1], _peer(group, src), group)
           for src in range(1, world)]
    for i in _as_they_arrive(ops, world - 1):
        flat += incoming[i]
    # ...and sends the sum back to every rank, again as one batch.
    _wait_all(_post([dist.P2POp(dist.isend, flat, _peer(group, dst), group)
                     for dst in range(1, world)]))


def allreduce_naive(tensor: torch.Tensor, group=None) -> None:
    """In-place SUM across ranks, the book's way: all to rank 0, the sum back to all."""
    if dist.get_world_size(group) > 1 and tensor.numel():
        _in_place(tensor, _naive, group)


def _ring(flat: torch.Tensor, group) -> None:
    rank, world = _world(group)
    chunks = list(flat.tensor_split(world))  # sizes differ by at most one; the first are larger
    right, left = (rank + 1) % world, (rank - 1) % world
    incoming = _receive_buffer(chunks[0])
    # Reduce-scatter: after n-1 steps rank r holds the full sum of chunk (r+1) mod n.
    for step in range(world - 1):
        send, recv = (rank - step) % world, (rank - step - 1) % world
        buffer = incoming[:chunks[recv].numel()]
        _exchange_and_add(chunks[send], right, buffer, left, chunks[recv], group)
    # All-gather: pass the finished sums around the ring, received straight into place.
    for step in range(world - 1):
        send, recv = (rank - step + 1) % world, (rank - step) % world
        _exchange(chunks[send], right, chunks[recv], left, group)


def allreduce_ring(tensor: torch.Tensor, group=None) -> None:
    """In-place SUM across ranks: ring reduce-scatter, then ring all-gather."""
    if dist.get_world_size(group) > 1 and tensor.numel():
        _in_place(tensor, _ring, group)


ALGORITHMS: dict[str, Callable[[torch.Tensor], None]] = {
    "naive": allreduce_naive, "ring": allreduce_ring}


def allreduce(tensor: torch.Tensor, algorithm: str = "ring", group=None) -> None:
    """The book's `allreduce`, across ranks: in place, every rank ends with the SUM."""
    ALGORITHMS[algorithm](tensor, group)


def _buckets(params: list[torch.nn.Parameter],
             bucket_mb: float | None) -> list[list[torch.nn.Parameter]]:
    """Parameters in reverse registration order (backward produces their gradients roughly
    last to first, as DDP assumes) in buckets of one dtype and device, each of at most
    `bucket_mb` MiB unless one parameter alone is larger; None: one bucket per parameter."""
    cap = None if bucket_mb is None else bucket_mb * 2**20  # bytes
    buckets: list[list[torch.nn.Parameter]] = []
    filling: dict[tuple, list[torch.nn.Parameter]] = {}  # (dtype, device) -> open bucket
    filled: dict[tuple, int] = {}  # bytes in it
    for p in reversed(params):
        key, nbytes = (p.dtype, p.device), p.numel() * p.element_size()
        if key not in filling or cap is None or filled[key] + nbytes > cap:
            filling[key], filled[key] = [], 0
            buckets.append(filling[key])
        filling[key].append(p)
        filled[key] += nbytes
    return buckets


class GradientSync:
    """Averages gradients across ranks with one of ALGORITHMS, bucket by bucket.

    Every rank must build it from the same parameters in the same order: the messages of the
    allreduce pair up by position.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], algorithm: str,
                 bucket_mb: float | None):
        """`bucket_mb`: MiB of gradients per allreduce; None: one allreduce per parameter."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown allreduce algorithm {algorithm!r}; "
                             f"choose one of {', '.join(ALGORITHMS)}")
        if bucket_mb is not None and not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive (MiB); got {bucket_mb}")
        self.algorithm = algorithm
        # One flat buffer per bucket, allocated once and reused every step.
        trained = [p for p in params if p.requires_grad]
        self.buckets = [_new_bucket(bucket) for bucket in _buckets(trained, bucket_mb)]

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements (not bytes) per bucket, in the order they are synchronized."""
        return [buffer.numel() for buffer, _ in self.buckets]

    def sync(self) -> None:
        """Replace every gradient by its mean over the ranks (after the step's last backward)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            return
        for buffer, views in self.buckets:
            # Flatten: the bucket's gradients into its buffer.
            _flatten(views)
            # Allreduce: one exchange of messages for the whole bucket, then the mean.
            allreduce(buffer, self.algorithm)
            buffer.div_(world)
            # Copy back INTO each gradient tensor: rebinding p.grad to a temporary instead is
            # how the book's replicas once drifted apart silently (d2l #955).
            _copy_back(views)


def _new_bucket(params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list[tuple]]:
    """Room for the gradients of `params` end to end (uninitialized, on their device), and
    (parameter, its slice of it viewed in the parameter's shape) for each."""
    buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                         device=params[0].device)
    parts = buffer.split([p.numel() for p in params])
    return buffer, [(p, part.view(p.shape)) for p, part in zip(params, parts, strict=True)]


def _flatten(views: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Each gradient into its slice of the bucket; a missing gradient counts as zeros."""
    for p, view in views:
        if p.grad is None:
            view.zero_()  # not last step's values: the buffer is reused
        else:
            view.copy_(p.grad)


def _copy_back(views: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Each slice of the bucket into its gradient tensor, which stays the same object.

    A parameter that got no gradient on this rank gets one only if another rank's was not
    zero: one that no rank used keeps none, so SGD leaves it alone, as with DDP."""
    for p, view in views:
        if p.grad is None:
            if not view.any():  # a device sync, but only on this rare path
                continue
            p.grad = torch.empty_like(p)
        p.grad.copy_(view)
