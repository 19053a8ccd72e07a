"""`python -m tools.convert_checkpoint RUN [--out FILE]`: a sharded checkpoint as one plain file.

Mode fsdp saves the model and optimizer in pieces, one file per rank, in a folder beside each
step file (`checkpoints/step_00000032/`: `.metadata`, `__0_0.distcp`, `__1_0.distcp`, ...).
This reads every piece in one process (no process group, no GPU) and writes one `torch.save`
file holding `model` (a plain state_dict, as DDP's checkpoints have it) and `optimizer` (its
state keyed by parameter name, and its hyperparameters from the step file), loadable with
`torch.load(..., weights_only=True)`: what `torch.distributed.checkpoint.format_utils.
dcp_to_torch_save` writes, read through `train.run.sharded.read_whole` instead, whose
reader lets `.metadata` (a pickle) name DCP's own records only, and which adds the step file's
hyperparameters in the same single write.

RUN is a run folder (its newest valid checkpoint), a step file (`checkpoints/step_*.pt`) or a
DCP folder (`checkpoints/step_*/`). The default output is `<the DCP folder>.full.pt` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError, outside
from common.files import atomic_write
from common.host import leave
from train.run.checkpoint import Checkpoints, CorruptCheckpoint, load
from train.run.sharded import SHARDED_KEY, VALUES_KEY, folder_damage, read_whole


def sharded_step(path: Path) -> tuple[Path, dict[str, Any]]:
    """The complete DCP folder that `path` (a run folder, a step file, a DCP folder) names,
    and what its step file holds besides tensors ({} when there is none)."""
    if (path / ".metadata").exists() or (path.is_dir() and path.name.startswith("step_")):
        problem = folder_damage(path)
        if problem:
            raise UserError(f"{path} is not a complete sharded checkpoint: {problem}")
        step_file = path.with_name(path.name + ".pt")
        try:
            return path, load(step_file).get(VALUES_KEY, {}) if step_file.is_file() else {}
        except CorruptCheckpoint:
            return path, {}  # the pieces are whole; only the hyperparameters are missing
    if (path / "checkpoints").is_dir():
        found = Checkpoints(path / "checkpoints", keep=1).load_latest()
        if found is None:
            raise UserError(f"{path} holds no checkpoint")
        step_file, state = found
    elif path.is_file():
        step_file = path
        try:
            with outside(f"reading {path}", passing=(CorruptCheckpoint,)):  # no permission
                state = load(path)
        except CorruptCheckpoint as exc:
            raise UserError(f"{path} is damaged: {exc}") from None
    else:
        raise UserError(f"{path} is neither a run folder, a checkpoint file nor a DCP folder")
    if SHARDED_KEY not in state:
        raise UserError(f"{step_file} is a single-file checkpoint already (mode "
                        f"{state.get('config', {}).get('mode', 'ddp')}): its `model` is a plain "
                        f"state_dict, nothing to convert")
    return step_file.parent / state[SHARDED_KEY], state.get(VALUES_KEY, {})


def convert(source: Path, out: Path | None = None) -> Path:
    """Write the sharded checkpoint that `source` names as one torch.save file; its path."""
    folder, values = sharded_step(source)
    whole = read_whole(folder, values=values)
    out = out or folder.with_name(folder.name + ".full.pt")
    with outside(f"writing {out}"):  # a full disk is exit 4, other causes 2
        atomic_write(out, lambda p: torch.save(whole, p))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_checkpoint",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("source", metavar="RUN",
                        help="a run folder, a step file (checkpoints/step_*.pt) or a DCP folder")
    parser.add_argument("--out", default=None, help="the file to write (default: beside the "
                                                    "DCP folder, <folder>.full.pt)")
    args = parser.parse_args(argv)
    try:
        out = convert(Path(args.source), Path(args.out) if args.out else None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    leave(main())  # without the interpreter's teardown (common/host.py)
