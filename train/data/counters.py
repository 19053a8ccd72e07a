"""Small data parts shared by both splits of a worker: per-epoch counts, and the epoch."""

from __future__ import annotations

from common.errors import UserError
from train.data.cache import DecodedFile

Problem = tuple[int, str, bool]  # (sample index, what went wrong, whether it stops the run)


class DataCounters:
    """Samples skipped this epoch on this rank (data.skip_bad_files); a checkpointed rank part."""

    def __init__(self, skip_bad_files: bool):
        self.skip_bad_files = skip_bad_files
        self.skipped = 0
        self.fixed = 0  # files left out when the dataset was loaded into memory (rank 0 only)

    def met_bad(self, bad: list[Problem]) -> None:
        """Count unreadable samples of a batch, or stop with the first one's name."""
        if not bad:
            return
        for _, what, fatal in bad:
            if fatal:
                raise UserError(what)
        if not self.skip_bad_files:
            raise UserError(f"cannot decode {bad[0][1]}; fix or remove the file, or set "
                            f"data.skip_bad_files=true to skip unreadable files")
        self.skipped += len(bad)

    def values(self) -> dict[str, float]:
        return {"skipped_files": float(self.skipped + self.fixed)}

    def reset(self) -> None:
        self.skipped = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        self.skipped = state["skipped"] if state else 0

    def load_other_world(self, states: list[dict[str, int] | None]) -> None:
        self.skipped = 0  # another world size re-shards the rest of the epoch: counts restart


class DataClock:
    """The epoch both splits are in (evaluation is never told one) and their caches."""

    def __init__(self) -> None:
        self.epoch = 0
        self.caches: list[DecodedFile] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for cache in self.caches:
            cache.make_durable(epoch)
