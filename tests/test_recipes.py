"""Derived recipes: a fine-tuning of a trained model, the attacker's surrogate budget, the fine-tuned reference
defence — what the CPU profiles use where a training from scratch costs too much."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_run import TINY

import advretrain
from advretrain.config import ExperimentConfig, TrainConfig, build_config
from advretrain.errors import ConfigError


def test_a_finetuning_trains_at_full_size_without_warmup_from_a_share_of_the_peak() -> None:
    recipe = TrainConfig(epochs=9, progressive_sizes=[16, 16, 24], warmup_epochs=1.5, lr=0.6, muon_lr=0.12)
    tuned = recipe.finetuning(2, 0.1)
    assert (tuned.epochs, tuned.progressive_sizes, tuned.warmup_epochs) == (2, [], 0.0)
    assert tuned.lr == pytest.approx(0.06) and tuned.muon_lr == pytest.approx(0.012)
    assert tuned.batch_size == recipe.batch_size and tuned.schedule == recipe.schedule


def test_surrogate_changes_are_checked_like_the_recipe() -> None:
    cfg = build_config(ExperimentConfig, "default", ["threats.surrogate_train={epochs: 2, batch_size: 64}"])
    assert cfg.train.updated(cfg.threats.surrogate_train, "x").epochs == 2
    for override, message in (
        ("threats.surrogate_train={epochs: 0}", "threats.surrogate_train.epochs"),
        ("threats.surrogate_train={epoch: 2}", "threats.surrogate_train.epoch"),
        ("threats.surrogate_train={seed: 5}", "threats.surrogate_seed"),
        ("threats.surrogate_train={progressive_sizes: [16, 16, 16, 16]}", "the last epoch must train at the data"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config(ExperimentConfig, "default", [override])


def epochs_trained(folder: Path) -> int:
    return len(json.loads((folder / "metrics.json").read_text())["history"])


def test_finetuned_retraining_surrogate_and_reference_start_from_what_they_should(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advretrain import checkpoint

    starts: dict[str, list[torch.Tensor]] = {}
    original = checkpoint.train_resumable

    def spy(model: torch.nn.Module, data: object, cfg: TrainConfig, *args: object, **kwargs: object) -> object:
        starts[str(args[1])] = [p.detach().clone() for p in model.parameters()]  # args[1]: the stage folder
        return original(model, data, cfg, *args, **kwargs)  # type: ignore[arg-type]

    for module in ("advretrain.pipeline.stages", "advretrain.pipeline.cross_attack"):
        monkeypatch.setattr(f"{module}.train_resumable", spy)
    overrides = [
        *TINY,
        "attacks=[fgsm]",
        "retrain.sizes={fgsm: [20]}",
        "retrain.mode=finetune",
        "retrain.finetune_epochs=1",
        "threats.query=[]",
        "threats.transfer=[fgsm]",
        "threats.surrogate_train={epochs: 1, progressive_sizes: []}",
        "experiments=[reference-defence]",
        "defence.finetune_epochs=2",
    ]
    results = advretrain.run("default", tmp_path / "r", overrides)
    stages = tmp_path / "r" / "stages"
    f0_folder = next(stages.glob("baseline-*"))
    f0 = [p.detach() for p in advretrain.load_model(f0_folder).parameters()]
    assert epochs_trained(f0_folder) == 3  # TINY's recipe
    assert epochs_trained(next(stages.glob("surrogate-*"))) == 1  # the attacker's smaller budget
    for kind, epochs in (("retrain-fgsm-N20-*", 1), ("reference-*", 2)):
        folder = next(stages.glob(kind))
        assert epochs_trained(folder) == epochs
        assert all(torch.equal(a, b) for a, b in zip(starts[str(folder)], f0, strict=True)), f"{kind}: not from f0"
    assert results.evaluation.defence is not None and results.evaluation.defence["finetune_epochs"] == 2
    assert "reference fgsm-rs (f0 fine-tuned 2 ep.)" in results.evaluation.cross  # type: ignore[operator]


def test_amp_cpu_trains_in_bf16_only_where_the_cpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    train = importlib.import_module("advretrain.train")
    cpu, a = torch.device("cpu"), torch.ones(4, 4)
    on, off = TrainConfig(amp_cpu=True), TrainConfig(amp_cpu=False)
    train.native_cpu_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with train.training_autocast(cpu, on):
        assert (a @ a).dtype == torch.bfloat16
    with train.training_autocast(cpu, off):
        assert (a @ a).dtype == torch.float32
    train.native_cpu_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING"), train.training_autocast(cpu, on):
        assert (a @ a).dtype == torch.float32
    assert "no native bf16" in caplog.text
    train.native_cpu_bf16.cache_clear()
