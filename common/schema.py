"""The one typed configuration schema: every key once, with its type, default, constraint and
a comment.

`Annotated[T, ...]` carries what the engine (common/config.py) checks beside the key: a value
constraint (`Positive`, `AtLeast(16)`, ...) and `RUNTIME` for keys that change how a run is
launched or looked at, not what it computes (a run folder accepts the same run again with
other values of those; see train/run/identity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from common.constraints import (  # noqa: F401 - re-exported: the schema's one import
    RUNTIME,
    AtLeast,
    Check,
    NonNegative,
    Positive,
    PositiveFloat,
    PositiveInt,
    StepRange,
    parse_step_range,
)
from common.schema_data import (  # noqa: F401 - the data section, in a file of its own
    CifarRecipe,
    DataConfig,
    ImageFolderConfig,
    ImagenetRecipe,
    SyntheticConfig,
)


@dataclass
class ModelConfig:
    # lenet | resnet18 (the book's) | torchvision.<builder> | timm.<name> (timm installed) |
    # python:module:callable (called with num_classes, in_channels, image_size)
    name: str = "lenet"
    pretrained: bool = False  # torchvision's (timm's) published weights; a new head keeps its init
    # start from this checkpoint (its "model") or state_dict file: weights_only, keys must match
    init_from: str = ""
    sync_bn: bool = False  # SyncBatchNorm across GPUs (ResNet; off as in the book: per-device)
    # the book's models: book: N(0, 0.01) weights; torch: its defaults (others: their own)
    init: Literal["book", "torch"] = "torch"


@dataclass
class TrainConfig:
    epochs: PositiveInt = 6  # passes over the training set
    batch_size: PositiveInt = 256  # GLOBAL batch per optimizer step, split evenly across workers
    max_steps: PositiveInt | None = None  # stop after this many optimizer steps (smoke runs)
    grad_accum_steps: PositiveInt = 1  # micro-batches per optimizer step (sync on the last only)
    eval_batch_size: PositiveInt = 1024  # per worker; evaluation does no gradient sync
    # the target's share spread over the other classes (0.1 in the ImageNet recipes)
    label_smoothing: Annotated[float, Check(lambda v: 0 <= v < 1, "must be in [0, 1)")] = 0.0
    # mixup's Beta(alpha, alpha) (0: off); one mixing factor per step, seeded by (seed, step)
    mixup_alpha: Annotated[float, NonNegative] = 0.0
    cutmix_alpha: Annotated[float, NonNegative] = 0.0  # CutMix's Beta(alpha, alpha) (0: off)
    # with both on: the probability that a step uses CutMix rather than mixup
    cutmix_prob: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5
    # an exponential moving average of the weights, evaluated beside them (null: off)
    ema_decay: Annotated[float | None, Check(lambda v: 0 < v < 1, "must be in (0, 1)")] = None
    # the average's decay ramps up as min(ema_decay, (1 + n) / (10 + n)) after n updates
    ema_warmup: bool = True


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: PositiveFloat = 0.1  # peak learning rate (after warmup)
    momentum: Annotated[float, NonNegative] = 0.9  # SGD momentum
    # SGD: L2 penalty added to the gradient; AdamW: decoupled decay (lr x weight_decay)
    weight_decay: Annotated[float, NonNegative] = 5e-4
    nesterov: bool = False  # Nesterov momentum (SGD)
    betas: Annotated[list[float], Check(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                        "must be [beta1, beta2], each in [0, 1)")] = field(
        default_factory=lambda: [0.9, 0.999])  # AdamW's moment decays
    eps: PositiveFloat = 1e-8  # AdamW's denominator term
    # decay biases and norm layers' weights too; null: false for AdamW (as timm), true for SGD
    decay_norm_and_bias: bool | None = None
    # fused (one kernel), foreach (batched) or loop; auto: fused on GPUs (foreach for SGD in
    # mode fsdp: torch has no sharded fused SGD), torch's default (a loop) on the CPU
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # after the warmup
    warmup_steps: Annotated[int, NonNegative] = 0  # linear warmup from 0 to `lr`, in steps
    warmup_epochs: Annotated[float, NonNegative] = 0.0  # the same in epochs (not both)
    min_lr: Annotated[float, NonNegative] = 0.0  # where the cosine schedule ends
    # schedule=step: epochs at which the lr is multiplied by `gamma` (torchvision: 30, 60, 80)
    milestones: Annotated[list[int], Check(lambda v: all(m > 0 for m in v) and v == sorted(v),
                                           "must be increasing positive epochs")] = field(
        default_factory=lambda: [30, 60, 80])
    # schedule=step: the lr's factor at each milestone
    gamma: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.1
    # lr x global batch / lr_base_batch (linear, timm's rule) or x its square root (sqrt);
    # never by the worker count: a config trains the same on 2 and 8 GPUs
    scale_lr: Literal["none", "linear", "sqrt"] = "none"
    # the global batch optim.lr was tuned for (null: 256); set alone, it scales linearly
    lr_base_batch: PositiveInt | None = None
    # clip gradients to this global L2 norm (all ranks, all micro-batches); null: no clipping
    clip_grad_norm: Annotated[float | None, Positive] = None


@dataclass
class PerfConfig:
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 adds a GradScaler (GPU)
    # NHWC memory format for model and inputs; null (auto): on for CPU workers, where oneDNN's
    # NHWC convolutions are faster (docs/performance.md), off on GPUs
    channels_last: bool | None = None
    # torch.compile; auto: runs of at least compile_min_steps steps
    compile: Annotated[Literal["auto", "on", "off"], RUNTIME] = "auto"
    # torch.compile's mode
    compile_mode: Annotated[Literal["default", "reduce-overhead", "max-autotune",
                                    "max-autotune-no-cudagraphs"], RUNTIME] = "default"
    # torch.compile's backend; aot_eager captures graphs and AOTAutograd without generating
    # kernels (seconds, not a C++ build per graph: the test matrix's compiled runs)
    compile_backend: Annotated[Literal["inductor", "aot_eager"], RUNTIME] = "inductor"
    # auto compiles runs this long (LeNet's break-even: docs/performance.md)
    compile_min_steps: Annotated[int, NonNegative, RUNTIME] = 2000
    cudnn_benchmark: Annotated[bool, RUNTIME] = True  # cuDNN picks the fastest conv algorithms
    # TF32 (10-bit mantissa) for fp32 work on Ampere+ GPUs. torch: its defaults, as in torch,
    # timm and Lightning (convolutions in TF32, matmuls in full fp32); on: matmuls too (fp32
    # Linear layers several times faster on H100); off: neither (fp32 exactness everywhere)
    tf32: Literal["torch", "on", "off"] = "torch"
    # bitwise-repeatable GPU kernels (deterministic cuDNN/cuBLAS algorithms, cudnn_benchmark
    # off): slower; for debugging and for comparing a resumed run with an uninterrupted one
    deterministic: Annotated[bool, RUNTIME] = False
    # torch.profiler trace of these steps on every rank ("A-B", 1-based) into run.dir/profile
    profile_steps: Annotated[str, StepRange, RUNTIME] = ""


@dataclass
class DDPConfig:
    bucket_cap_mb: PositiveFloat = 25.0  # gradients per allreduce bucket
    gradient_as_bucket_view: bool = True  # gradients live in the buckets: no copy, less memory
    static_graph: bool = False  # the graph never changes: DDP may skip per-step bookkeeping
    find_unused_parameters: bool = False  # for models whose forward leaves parameters unused
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"  # compress the gradients
    powersgd_rank: PositiveInt = 1  # PowerSGD's matrix approximation rank
    # plain allreduce before this step (PowerSGD warm start; torch's needs two plain ones)
    powersgd_start_step: Annotated[int, AtLeast(2, "torch's PowerSGD compresses from DDP's "
                                                   "third iteration")] = 10
    # ZeroRedundancyOptimizer: each rank keeps the optimizer state of its share of the
    # parameters, steps them, and broadcasts them (parameters and gradients stay whole). The
    # same arithmetic as without it, bitwise, and the same checkpoint: a run may switch it.
    zero: Annotated[bool, RUNTIME] = False


@dataclass
class ScratchConfig:
    # naive: every rank sends to rank 0, which sums (the book's); ring: reduce-scatter, all-gather
    algorithm: Literal["naive", "ring"] = "ring"
    # gradients are flattened into buckets of at most this many MiB
    bucket_mb: Annotated[float, Check(
        lambda v: v > 0, "must be positive (MiB per bucket)",
        "for one allreduce per parameter set scratch.per_parameter=true")] = 25.0
    per_parameter: bool = False  # one allreduce per parameter tensor (the book's way)


@dataclass
class FSDPConfig:
    # free each block's gathered parameters after its forward (gathered again for backward):
    # the least memory; false keeps them from forward to backward (one all-gather fewer)
    reshard_after_forward: Annotated[bool, RUNTIME] = True
    # at the run's end, gather the whole model into checkpoints/last.pt as a plain state_dict
    # (as DDP's runs have it); false for models too large for the main worker's memory
    consolidate: Annotated[bool, RUNTIME] = True


@dataclass
class CheckpointConfig:
    every_steps: Annotated[int, NonNegative, RUNTIME] = 0  # also every N steps (0: epoch ends)
    keep: Annotated[int, Positive, RUNTIME] = 2  # how many recent checkpoints stay on disk
    resume: Annotated[bool, RUNTIME] = True  # continue from the latest valid one in run.dir
    allow_changes: Annotated[bool, RUNTIME] = False  # resume with another config or world size
    keep_best: Annotated[bool, RUNTIME] = False  # also keep the best epoch's: checkpoints/best.pt
    # the epoch record's key that ranks epochs: test_accuracy, test_loss, train_* (+ _ema)
    best_metric: Annotated[str, RUNTIME] = "test_accuracy"
    best_mode: Annotated[Literal["auto", "max", "min"], RUNTIME] = "auto"  # auto: min for losses


@dataclass
class CheckConfig:
    # compare a parameter checksum across ranks every N steps (0: off)
    sync_every_steps: Annotated[int, NonNegative, RUNTIME] = 0
    # record and check which samples each rank saw, per epoch
    sample_ledger: Annotated[bool, RUNTIME] = False


@dataclass
class LogConfig:
    # auto: a bar on a terminal, plain lines elsewhere
    progress: Annotated[Literal["auto", "bar", "lines", "off"], RUNTIME] = "auto"
    every_steps: Annotated[int, Positive, RUNTIME] = 20  # per-step metrics every N steps
    # TensorBoard event files of the same scalars as wandb, in run.dir/tensorboard (main worker)
    tensorboard: Annotated[bool, RUNTIME] = False
    # estimate DDP's sync hidden in backward: a forward+backward with and one without sync (two
    # extra passes) at epoch ends, as often as that costs at most 3% of an epoch, else once per
    # run; never in runs shorter than an epoch. false: records say n/a (train/loop/trainer.py)
    sync_probe: Annotated[bool, RUNTIME] = True


@dataclass
class DebugConfig:
    """Faults planted on purpose, so tests can show they are caught. Never set in real runs."""

    # this rank sleeps `stall_seconds` inside step `stall_step` (1-based)
    stall_rank: Annotated[int, RUNTIME] = -1
    stall_step: Annotated[int, RUNTIME] = 0  # see stall_rank
    stall_seconds: Annotated[float, RUNTIME] = 0.0  # see stall_rank
    desync_rank: Annotated[int, RUNTIME] = -1  # perturbs its parameters after `desync_step`
    desync_step: Annotated[int, RUNTIME] = 0  # see desync_rank
    unused_parameter: bool = False  # give the model a parameter its forward never uses
    skip_set_epoch: bool = False  # forget sampler.set_epoch: every epoch the same order
    pad_eval: bool = False  # evaluate with DistributedSampler's padding (duplicates)
    sigterm_rank: Annotated[int, RUNTIME] = -1  # sends itself SIGTERM after `sigterm_step`
    sigterm_step: Annotated[int, RUNTIME] = 0  # see sigterm_rank (a preemption at a known step)
    # the checkpoint of this step fails half-way with ENOSPC, as on a full disk (0: never)
    disk_full_step: Annotated[int, NonNegative, RUNTIME] = 0
    # checkpoint writes from this step on pause half-way for `slow_save_seconds` (0: never): a
    # preemption whose grace period is shorter than a checkpoint write
    slow_save_step: Annotated[int, NonNegative, RUNTIME] = 0
    slow_save_seconds: Annotated[float, NonNegative, RUNTIME] = 0.0  # see slow_save_step


@dataclass
class RunConfig:
    # default: the config's stem (plus model and data names when overrides change them), else
    # run.dir's last part
    name: Annotated[str, RUNTIME] = ""
    # the run's output folder; default: runs/<name>-<8 hex digits of the run's identity and
    # worker count> (train/run/location.py), so the same command resumes and another gets its own
    dir: Annotated[str, RUNTIME] = ""
    overwrite: Annotated[bool, RUNTIME] = False  # replace a different run already in `dir`


@dataclass
class DistConfig:
    device: Annotated[Literal["auto", "cpu", "cuda"], RUNTIME] = "auto"  # auto: cuda if visible
    backend: Annotated[Literal["auto", "nccl", "gloo"], RUNTIME] = "auto"  # auto: by device
    timeout_s: Annotated[float, Positive, RUNTIME] = 600.0  # a collective waiting longer fails
    # how long node 0 waits for the other nodes to join
    rendezvous_timeout_s: Annotated[float, Positive, RUNTIME] = 600.0
    # elastic --nnodes MIN:MAX: once MIN nodes are there, wait this long for more (torchrun's
    # last_call_timeout); also after a node left, before the group restarts without it
    rendezvous_last_call_s: Annotated[int, NonNegative, RUNTIME] = 30
    # seconds between the launchers' heartbeats; a node silent for 3 of them has left (a group
    # restarts without it only then). torchrun's keep_alive_interval
    node_heartbeat_s: Annotated[int, Positive, RUNTIME] = 5
    # threads per CPU worker; 0: usable cores / workers on this node
    cpu_threads: Annotated[int, NonNegative, RUNTIME] = 0
    # denormals to zero on CPU (x86 handles them in microcode: docs/performance.md)
    cpu_flush_denormal: Annotated[bool, RUNTIME] = True
    # freed heap memory a CPU worker keeps for its next step instead of returning it to the OS
    # (glibc's malloc trim threshold; blocks up to 32 MiB from the heap); 0: glibc's defaults
    cpu_malloc_keep_mb: Annotated[int, NonNegative, RUNTIME] = 512


@dataclass
class WandbConfig:
    # auto: online with credentials (WANDB_API_KEY or `wandb login`), else offline into
    # run.dir/wandb
    mode: Annotated[Literal["auto", "online", "offline", "disabled"], RUNTIME] = "auto"
    project: Annotated[str, RUNTIME] = "dptrain"  # the wandb project
    entity: Annotated[str | None, RUNTIME] = None  # team or user; default: your default entity
    name: Annotated[str | None, RUNTIME] = None  # default: run.name
    group: Annotated[str | None, RUNTIME] = None  # runs of one group sit side by side
    tags: Annotated[list[str], RUNTIME] = field(default_factory=list)  # free labels


@dataclass
class Config:
    # how gradients are synchronized; fsdp also shards parameters and optimizer state
    mode: Literal["ddp", "dp", "scratch", "fsdp"] = "ddp"
    seed: int = 0  # model init, synthetic data and shuffling
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
