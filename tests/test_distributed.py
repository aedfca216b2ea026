"""torchrun with the gloo backend on the CPU: a sharded attack gives exactly the single-process set, and a DDP
training step is the single-process step on the same global batch (BatchNorm statistics per rank, as DDP keeps
them: the single-process reference runs each rank's half through the model separately)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import ONE_STEP, data, fit_gap

from advretrain.advset import craft_adversarial_set, load_adversarial_set
from advretrain.attacks import GAP, DeepFool
from advretrain.checkpoint import load_model
from advretrain.models import build_model
from advretrain.runtime.distributed import block
from advretrain.runtime.io import read_safetensors
from advretrain.train import lr_factor, make_optimizer


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    worker = Path(__file__).parent / "ddp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_contiguous_blocks_cover_every_item_once() -> None:
    for count in (0, 1, 5, 37):
        for ranks in (1, 2, 3, 8):
            blocks = [block(count, r, ranks) for r in range(ranks)]
            assert [i for b in blocks for i in b] == list(range(count))
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_two_process_sharded_attack_equals_the_single_process_set(two_ranks: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    victim = build_model("small", 4, 16).eval()
    images = torch.rand(37, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(37) % 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: oneDNN's channels-last kernels sum in a thread-dependent order
    try:
        craft_adversarial_set(DeepFool(steps=10), victim, images, labels, tmp_path / "set", {}, shard_size=5)
    finally:
        torch.set_num_threads(threads)
    one, two = load_adversarial_set(tmp_path / "set"), load_adversarial_set(two_ranks / "set")
    assert len(list((two_ranks / "set").glob("shard-*"))) == 8  # 37 images in shards of 5, each written once
    assert torch.equal(one.adversarial, two.adversarial) and torch.equal(one.success, two.success)
    assert torch.equal(two.indices, torch.arange(37)) and one.meta == two.meta


def test_gap_fitted_by_two_processes_equals_one_process(two_ranks: Path) -> None:
    torch.manual_seed(1)
    one = fit_gap(build_model("small", 4, 16).eval())
    two = GAP().load_state_dict(*read_safetensors(two_ranks / "gap.safetensors", "GAP", "fit it again"))
    assert one.perturbation is not None and two.perturbation is not None
    # the same steps on the same global batches; only the order of the loss sums differs
    torch.testing.assert_close(two.perturbation, one.perturbation, rtol=0, atol=1e-5)


def test_ddp_step_equals_the_single_process_step(two_ranks: Path) -> None:
    torch.manual_seed(0)
    model = build_model("small", 4, 16)
    initial = model.head.weight.detach().clone()
    dataset = data()
    model.init_from_data(dataset.images)
    optimizer = make_optimizer(model, ONE_STEP)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(ONE_STEP.schedule, 1, 0))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(ONE_STEP.seed * 1_000_003))
    x, y = dataset.images[order].float() / 255, dataset.labels[order]
    model.train()
    for rank in range(2):  # each rank's half through the model on its own (its own BatchNorm statistics)
        part = block(16, rank, 2)
        logits = model(x[part.start : part.stop])
        loss = torch.nn.functional.cross_entropy(logits, y[part.start : part.stop], reduction="sum") / 16
        loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    scheduler.step()
    ddp = load_model(two_ranks / "step")
    for (name, expected), got in zip(model.state_dict().items(), ddp.state_dict().values(), strict=True):
        if "running" not in name and "num_batches" not in name:  # DDP keeps rank 0's BatchNorm buffers
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ddp.head.weight, initial)  # the step did move the weights


def test_the_protocol_runs_under_torchrun(finished_run: Path, tmp_path: Path) -> None:
    """`torchrun -m advretrain run` completes with one writer; what does not depend on the trained models (the
    data, the labeler) equals the single-process run, the rest differs only as DDP's per-rank BatchNorm makes it."""
    from tiny_run import TINY

    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "advretrain", "-q", "run", "--out", str(run_dir), *TINY]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run finished") == 1  # rank 0 alone reports (and writes)
    two = json.loads((run_dir / "results.json").read_text())
    one = json.loads((finished_run / "results.json").read_text())
    assert json.loads((run_dir / "environment.json").read_text())["processes"] == 2
    assert two.keys() == one.keys() and two["attacks"].keys() == one["attacks"].keys()
    for name, attack in two["attacks"].items():
        assert [row["n"] for row in attack["retrain"]] == [row["n"] for row in one["attacks"][name]["retrain"]]
        assert attack["labels"]["clean_test_accuracy"] == one["attacks"][name]["labels"]["clean_test_accuracy"]
        assert attack["labels"]["exact_source_retrieval"] == 1.0
    assert (run_dir / "tables.md").exists() and not list(run_dir.glob("stages/*/.*.tmp"))
