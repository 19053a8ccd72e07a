"""What a run folder holds, by name: shared by the workers that write it and the tools and
checks that read it."""

PHASES = ("data", "compute", "sync", "optim")  # a step's time, in `time_<phase>_ms` keys
CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one record per epoch
SUMMARY_FILE = "summary.json"  # written when a run finishes
CHECKPOINT_DIR = "checkpoints"  # step_<step>.pt (+ .sha256) and last.pt
LEDGER_FILE = "sample_ledger.jsonl"  # with check.sample_ledger=true
CLASSES_FILE = "classes.json"  # class index -> name, as the model's outputs are numbered
