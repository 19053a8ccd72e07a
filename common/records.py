"""What a run folder holds, by name: shared by the workers that write it and the tools and
checks that read it."""

PHASES = ("data", "compute", "sync", "optim")  # a step's time, in `time_<phase>_ms` keys
CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one record per epoch
SUMMARY_FILE = "summary.json"  # written when a run finishes
CHECKPOINT_DIR = "checkpoints"  # step_<step>.pt (+ .sha256) and last.pt
LEDGER_FILE = "sample_ledger.jsonl"  # with check.sample_ledger=true
NCCL_TRACE_PREFIX = "nccl_trace_rank_"  # + rank: NCCL flight-recorder dumps on a timeout
LOCK_FILE = "job.lock"  # held by the job using the folder (common/lock.py)
# The run being replaced (run.overwrite, or starting over), moved here until the new run has
# written its first checkpoint; REPLACING while the move is under way.
REPLACED_DIR = "replaced"
REPLACING_DIR = "replaced.partial"
HANG_DIR = "hang"  # rank_<r>.json + rank_<r>.txt: where each rank was when a job hung
PROFILE_DIR = "profile"  # rank_<r>.trace.json (torch.profiler) + top_ops.txt
CLASSES_FILE = "classes.json"  # class index -> name, as the model's outputs are numbered
VAL_SPLIT_FILE = "val_split.json"  # data.val_fraction: the validation files held out of train/
BEST_FILE = "best.pt"  # checkpoint.keep_best: in checkpoints/, the best epoch's step file
BEST_RECORD = "best.json"  # in checkpoints/ beside it: metric, value, epoch, step, file
# The epoch record's keys checkpoint.best_metric may name, and which way is better.
BEST_METRICS = {"test_accuracy": "max", "test_loss": "min", "train_accuracy": "max",
                "train_loss": "min", "test_accuracy_ema": "max", "test_loss_ema": "min"}
