"""`make eval` and `make export` on a real run: the same numbers as the run's last epoch, the
files they write, and their one-line errors."""

import hashlib
import json

import pytest
import torch

from tests.helpers import REPO, run_cli, run_workers

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two epochs of LeNet with an EMA, trained by two workers (their own `main` in gloo
    processes forked by the harness: the run folder is theirs); `make eval` runs as users run
    it."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_workers(2, CONFIG, f"run.dir={folder}", "wandb.mode=disabled",
                         "data.synthetic.train_samples=1024", "data.synthetic.test_samples=333",
                         "train.epochs=2", "train.batch_size=128", "train.eval_batch_size=50",
                         "train.ema_decay=0.9")
    assert result.returncode == 0, result.stderr
    return folder


def last_record(folder):
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def test_eval_gives_the_last_epochs_numbers_with_top5_and_per_class(run_dir):
    result = run_cli("train.after.evaluate", str(run_dir), "--workers", "2", "--cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "eval.json").read_text())
    record = last_record(run_dir)
    # two workers, as in training: the same batches, the same sums
    assert summary["loss"] == record["test_loss"]
    assert summary["top1_accuracy"] == record["test_accuracy"]
    assert summary["samples"] == 333 and summary["step"] == record["step"]
    assert summary["top1_accuracy"] <= summary["top5_accuracy"] <= 1
    confusion = torch.tensor(summary["confusion"])
    assert confusion.sum() == 333 and confusion.trace() / 333 == pytest.approx(
        summary["top1_accuracy"])
    rows = confusion.sum(1)
    for i, (name, accuracy) in enumerate(summary["per_class_accuracy"].items()):
        assert name == str(i) and accuracy == pytest.approx(confusion[i, i] / rows[i])
    assert (run_dir / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert f"top-1 {record['test_accuracy']:.2%}" in result.stdout
    # what was evaluated, resolved: last.pt moves on with the next step, runs/latest too
    step_file = run_dir / "checkpoints" / f"step_{record['step']:08d}.pt"
    assert summary["run"] == str(run_dir.resolve())
    assert summary["checkpoint"] == str(step_file.resolve())
    assert summary["checkpoint_sha256"] == hashlib.sha256(step_file.read_bytes()).hexdigest()


def test_the_confusion_figure_writes_each_count_beside_a_colour_bar(run_dir):
    from train.after.evaluate import confusion_figure

    summary = json.loads((run_dir / "eval.json").read_text())
    fig = confusion_figure(summary)
    matrix, bar = fig.axes  # the matrix and its colour bar
    assert bar.get_ylabel() == "test samples"
    assert bar.get_ylim()[1] >= max(map(max, summary["confusion"]))
    written = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text())
               for t in matrix.texts}
    assert written == {(i, j): count for i, row in enumerate(summary["confusion"])
                       for j, count in enumerate(row)}


def test_eval_of_the_ema_on_one_worker(run_dir):
    result = run_cli("train.after.evaluate", str(run_dir), "--ema", "--cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "eval.json").read_text())
    record = last_record(run_dir)
    assert summary["weights"] == "ema" and summary["workers"] == 1
    # one worker sums the same samples in another order
    assert summary["loss"] == pytest.approx(record["test_loss_ema"], rel=1e-6)
    assert summary["top1_accuracy"] == pytest.approx(record["test_accuracy_ema"])


def test_export_writes_a_state_dict_a_program_and_what_inputs_need(run_dir, tmp_path):
    from models import build_model

    result = run_cli("train.after.export", str(run_dir), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input"] == [1, 28, 28]
    assert len(meta["normalization"]["mean"]) == 1 and meta["program"] == "model.pt2"
    net = build_model("lenet", 1, 10, 28)
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    program = torch.export.load(tmp_path / "model.pt2").module()
    images = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(program(images), net.eval()(images))


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere holds no run (no config.yaml)"),
    (["RUN", "--checkpoint", "missing.pt"], "no checkpoint missing.pt"),
    (["RUN", "--workers", "0"], "--workers must be at least 1"),
])
def test_eval_bad_input_is_one_line(run_dir, args, message):
    result = run_cli("train.after.evaluate", *[str(run_dir) if a == "RUN" else a for a in args])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
