"""The one typed configuration schema: every key once, with its type, default, constraint and
a comment.

`Annotated[T, ...]` carries what the engine (common/config.py) checks beside the key: a value
constraint (`Positive`, `AtLeast(16)`, ...) and `RUNTIME` for keys that change how a run is
launched or looked at, not what it computes (a run folder accepts the same run again with
other values of those; see train/identity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from common.constraints import RUNTIME, AtLeast, Check, NonNegative, Positive  # noqa: F401

PositiveInt = Annotated[int, Positive]


def _fraction_range(v: list[float]) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1] <= 1


def _ratio_range(v: list[float]) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1]
PositiveFloat = Annotated[float, Positive]


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
class SyntheticConfig:
    train_samples: PositiveInt = 24_000  # generated in memory from `seed`
    test_samples: PositiveInt = 5_000  # the test set, drawn from the same distribution
    channels: PositiveInt = 1  # 1x28x28 (Fashion-MNIST-shaped) or 3x32x32 (CIFAR-shaped)
    image_size: Annotated[int, AtLeast(16, "LeNet needs it")] = 28  # pixels per side
    num_classes: Annotated[int, AtLeast(2)] = 10  # one smooth random prototype per class


@dataclass
class ImageFolderConfig:
    """data.name=imagefolder: class folders of JPEG/PNG files (torchvision's ImageFolder layout)."""

    train: str = "train"  # the sub-folder of data.root holding the training images
    val: str = "val"  # the sub-folder holding the evaluation images (the same class folders)


@dataclass
class ImagenetRecipe:
    """data.augment=imagenet: RandomResizedCrop to data.image_size and a flip; evaluation
    resizes and center-crops at `eval_crop` of the image."""

    scale: Annotated[list[float], Check(_fraction_range, "must be [low, high] with "
                                        "0 < low <= high <= 1")] = field(
        default_factory=lambda: [0.08, 1.0])  # fraction of the image's area a crop covers
    ratio: Annotated[list[float], Check(_ratio_range, "must be [low, high] with "
                                        "0 < low <= high")] = field(
        default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect ratios (width / height)
    flip: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5  # probability
    eval_crop: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.875


@dataclass
class CifarRecipe:
    """data.augment=cifar: pad, random crop back to data.image_size, flip."""

    padding: Annotated[int, NonNegative] = 4  # zero pixels added on each side before the crop
    flip: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.5  # probability


@dataclass
class DataConfig:
    # synthetic | fashion_mnist | mnist | cifar10 | imagefolder | python
    name: str = "synthetic"
    # torchvision datasets are read from (and downloaded into) this folder; imagefolder: the
    # folder holding the train and val sub-folders
    root: str = "data"
    download: bool = True  # try to download torchvision datasets that are missing
    factory: str = ""  # data.name=python: module:callable returning (train, test) Datasets
    # memory: the dataset as one uint8 tensor per split, batches gathered by index; stream: a
    # DataLoader per worker; auto: memory when the decoded dataset fits in data.memory_gb
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_gb: PositiveFloat = 4.0  # what auto holds in memory per worker (decoded), GiB
    on_device: bool = True  # hold the whole in-memory dataset on the worker's GPU when it fits
    normalize: bool = True  # zero mean, unit variance per channel (training-set statistics)
    # images of a stream dataset the statistics are computed from (a fixed random subset)
    stats_samples: PositiveInt = 1000
    # training resolution in pixels; null: the dataset's own (imagefolder and python: 224)
    image_size: Annotated[int | None, AtLeast(8)] = None
    augment: Literal["none", "cifar", "imagenet"] = "none"  # the recipe (data.<recipe>.*)
    imagenet: ImagenetRecipe = field(default_factory=ImagenetRecipe)
    cifar: CifarRecipe = field(default_factory=CifarRecipe)
    # decoded: the first epoch decodes each image once at a fixed size into a memory-mapped
    # uint8 file in data.cache_dir; later epochs gather from it by index (stream path)
    cache: Literal["none", "decoded"] = "none"
    # where decoded files live (a fast local disk; one file per node and split); "": the
    # system's temp folder
    cache_dir: Annotated[str, RUNTIME] = ""
    # JPEG decoder: pil (decodes at reduced size when the target is smaller: measured fastest
    # here); nvjpeg: batches decoded on the GPU (torchvision.io, GPUs only)
    decoder: Literal["pil", "nvjpeg"] = "pil"
    # stream loader processes per worker; null: usable cores per worker - 1 (at least 1)
    num_workers: Annotated[int | None, NonNegative, RUNTIME] = None
    pin_memory: Annotated[bool | None, RUNTIME] = None  # page-locked batches; null: with GPUs
    persistent_workers: Annotated[bool, RUNTIME] = True  # loader processes live across epochs
    prefetch_factor: Annotated[int, Positive, RUNTIME] = 2  # batches each loader process readies
    # skip (and count, per epoch) image files that cannot be decoded instead of stopping
    skip_bad_files: Annotated[bool, RUNTIME] = False
    imagefolder: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


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
    # fused (one kernel), foreach (batched) or loop; auto: fused on GPUs, torch's default on CPU
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # after the warmup
    warmup_steps: Annotated[int, NonNegative] = 0  # linear warmup from 0 to `lr`, in steps
    warmup_epochs: Annotated[float, NonNegative] = 0.0  # the same in epochs (not both)
    min_lr: Annotated[float, NonNegative] = 0.0  # where the cosine schedule ends
    # schedule=step: epochs at which the lr is multiplied by `gamma` (torchvision: 30, 60, 80)
    milestones: Annotated[list[int], Check(lambda v: all(m > 0 for m in v) and v == sorted(v),
                                           "must be increasing positive epochs")] = field(
        default_factory=lambda: [30, 60, 80])
    gamma: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.1
    scale_lr: Literal["none", "linear", "sqrt"] = "none"  # lr x workers, or x sqrt(workers)
    # timm's rule: lr = optim.lr x global batch / lr_base_batch (null: lr as given)
    lr_base_batch: PositiveInt | None = None
    # clip gradients to this global L2 norm (all ranks, all micro-batches); null: no clipping
    clip_grad_norm: Annotated[float | None, Positive] = None


@dataclass
class PerfConfig:
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 adds a GradScaler (GPU)
    # NHWC memory format for model and inputs; null (auto): on for CPU workers, where oneDNN's
    # NHWC convolutions made LeNet's forward+backward 20% faster here, off on GPUs.
    channels_last: bool | None = None
    # torch.compile; auto: runs of at least compile_min_steps steps
    compile: Annotated[Literal["auto", "on", "off"], RUNTIME] = "auto"
    compile_mode: Annotated[Literal["default", "reduce-overhead", "max-autotune",
                                    "max-autotune-no-cudagraphs"], RUNTIME] = "default"
    # auto compiles runs this long (LeNet breaks even at ~1,600)
    compile_min_steps: Annotated[int, NonNegative, RUNTIME] = 2000
    cudnn_benchmark: Annotated[bool, RUNTIME] = True  # cuDNN picks the fastest conv algorithms


@dataclass
class DDPConfig:
    bucket_cap_mb: PositiveFloat = 25.0  # gradients per allreduce bucket
    gradient_as_bucket_view: bool = True  # gradients live in the buckets: no copy, less memory
    static_graph: bool = False  # the graph never changes: DDP may skip per-step bookkeeping
    find_unused_parameters: bool = False  # for models whose forward leaves parameters unused
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"  # compress the gradients
    powersgd_rank: PositiveInt = 1  # PowerSGD's matrix approximation rank
    powersgd_start_step: int = 10  # plain allreduce before this step (PowerSGD warm start)


@dataclass
class ScratchConfig:
    algorithm: Literal["naive", "ring"] = "ring"  # naive: sum on rank 0 (the book's); ring
    # gradients are flattened into buckets of at most this many MiB
    bucket_mb: Annotated[float, Check(
        lambda v: v > 0, "must be positive (MiB per bucket)",
        "for one allreduce per parameter set scratch.per_parameter=true")] = 25.0
    per_parameter: bool = False  # one allreduce per parameter tensor (the book's way)


@dataclass
class CheckpointConfig:
    every_steps: Annotated[int, NonNegative, RUNTIME] = 0  # also every N steps (0: epoch ends)
    keep: Annotated[int, Positive, RUNTIME] = 2  # how many recent checkpoints stay on disk
    resume: Annotated[bool, RUNTIME] = True  # continue from the latest valid one in run.dir
    allow_changes: Annotated[bool, RUNTIME] = False  # resume with another config or world size


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


@dataclass
class RunConfig:
    name: Annotated[str, RUNTIME] = ""  # default: run.dir's last part, else the config's stem
    dir: Annotated[str, RUNTIME] = ""  # the run's output folder; default: runs/<name>
    overwrite: Annotated[bool, RUNTIME] = False  # replace a different run already in `dir`


@dataclass
class DistConfig:
    device: Annotated[Literal["auto", "cpu", "cuda"], RUNTIME] = "auto"  # auto: cuda if visible
    backend: Annotated[Literal["auto", "nccl", "gloo"], RUNTIME] = "auto"  # auto: by device
    timeout_s: Annotated[float, Positive, RUNTIME] = 600.0  # a collective waiting longer fails
    # how long node 0 waits for the other nodes to join
    rendezvous_timeout_s: Annotated[float, Positive, RUNTIME] = 600.0
    # threads per CPU worker; 0: usable cores / workers on this node
    cpu_threads: Annotated[int, NonNegative, RUNTIME] = 0
    cpu_flush_denormal: Annotated[bool, RUNTIME] = True  # denormals to zero on CPU (3x faster)


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
    mode: Literal["ddp", "dp", "scratch"] = "ddp"  # how gradients are synchronized
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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
