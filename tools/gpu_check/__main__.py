"""`python -m tools.gpu_check [--out reports/gpu-check] [--budget-s 470]` (`make gpu-check`).

Runs with whatever python starts it (`make gpu-check PY=python3`: the machine's own, no venv,
nothing downloaded), prints each part's progress, keeps going past a failing part, and writes
report.md and report.json. Exit 0 when no part failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from tools.gpu_check import FAIL, Context, Part, run_parts, write_report
from tools.gpu_check.exact import nccl_bandwidth, parity, sigterm_and_resume
from tools.gpu_check.parts import REPO, check_environment, run_gpu_tests, train_on_every_gpu

PARTS = [  # budgets in seconds; together about 8 minutes on one GPU
    Part("torch on this machine", check_environment, 30, needs_gpu=False),
    Part("gpu tests (pytest -m gpu)", run_gpu_tests, 250),
    Part("make train on every GPU", train_on_every_gpu, 45),
    Part("SIGTERM and resume", sigterm_and_resume, 60),
    Part("1 GPU vs all GPUs parity", parity, 45),
    Part("NCCL allreduce bandwidth", nccl_bandwidth, 30),
]


def machine_facts() -> dict[str, Any]:
    """What the report is about: the software versions and the GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = "n/a"
    if gpus:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "CUDA": torch.version.cuda or "none (CPU build)",
            "cuDNN": torch.backends.cudnn.version() if gpus else "n/a", "NCCL": nccl,
            "GPUs": f"{gpus}" + (f" x {', '.join(names)}" if names else "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                     description="Check the GPU path on this machine.")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=470,
                        help="seconds for all parts together (default 470: under 8 minutes)")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    for stale in ("runs", "pytest"):  # a run folder left from last time would resume
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print("gpu-check: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    gpus = int(facts["GPUs"].split()[0])
    results = run_parts(PARTS, Context(gpus, out, facts), args.budget_s,
                        say=lambda line: print(line, flush=True))
    report = write_report(results, facts, out)
    failed = [r.name for r in results if r.status == FAIL]
    print(f"gpu-check: {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
