"""Metrics on hand-checked cases; adversarial sets survive a reload exactly and resume shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from advretrain import build_model, save_model
from advretrain.advset import craft_adversarial_set, is_complete, load_adversarial_set, model_fingerprint
from advretrain.attacks import FGSM
from advretrain.cli import cli
from advretrain.errors import AdvretrainError
from advretrain.metrics import (
    accuracy,
    attack_metrics,
    fooling_ratio,
    quantize8,
    success_on_correct,
    targeted_success,
)


def test_metric_definitions_on_a_hand_checked_case() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 0, 3])  # image 2 misclassified
    adv = torch.tensor([1, 1, 2, 0])  # 0 and 3 fooled; 2 changed (to the right class!)
    assert fooling_ratio(clean, adv) == 0.75  # every prediction change counts, over all images
    assert success_on_correct(clean, adv, labels) == pytest.approx(2 / 3)
    assert accuracy(adv, labels) == 0.5
    assert targeted_success(adv, torch.tensor([1, 0, 2, 0])) == 0.75


def test_quantize8_rounds_to_the_nearest_level() -> None:
    x = torch.tensor([0.0, 0.5 / 255, 0.6 / 255, 1.0, 127.4 / 255])
    assert torch.allclose(quantize8(x) * 255, torch.tensor([0.0, 0.0, 1.0, 255.0, 127.0]))  # 0.5 rounds to even


class Threshold(nn.Module):
    """Class 1 iff the mean pixel exceeds 0.499: a perturbation just across it dies under 8-bit rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1000.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3)) - 0.499
        return torch.stack([-self.w * m, self.w * m], 1)


def test_attack_metrics_reports_float_and_8bit_and_norms() -> None:
    clean = torch.full((2, 3, 4, 4), 127 / 255)  # 0.49804: class 0
    adv = clean.clone()
    adv[0] += 0.0012  # 0.49924 crosses 0.499 in float; 8-bit rounding takes it back to 127/255
    labels = torch.zeros(2, dtype=torch.long)
    m = attack_metrics(Threshold(), clean, adv, labels)
    assert m["fooling_ratio"] == 0.5 and m["fooling_ratio_8bit"] == 0.0
    assert m["l2_median"] == pytest.approx(0.0012 * 48**0.5, rel=1e-3)
    assert m["linf_median"] == pytest.approx(0.0012, rel=1e-3)
    assert m["clean_accuracy"] == 1.0 and m["adversarial_accuracy"] == 0.5


def test_adversarial_set_roundtrip_is_exact_and_resumable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("small", 10).eval()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    attack = FGSM(eps=0.03)
    folder = craft_adversarial_set(attack, model, images, labels, tmp_path / "s.advset", {"attack": "fgsm"}, 4)
    loaded = load_adversarial_set(folder)
    direct = attack(model, images.float() / 255, labels)
    assert torch.equal(loaded.adversarial, direct.adversarial) and torch.equal(loaded.success, direct.success)
    assert loaded.indices.tolist() == list(range(10)) and torch.equal(loaded.labels, labels)
    assert (loaded.targets == -1).all() and loaded.meta["model_fingerprint"] == model_fingerprint(model)
    assert sorted(p.name for p in folder.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    averaged = build_model("small", 10, flip_average=True)
    averaged.load_state_dict(model.state_dict())  # the same weights, another classifier: not the attacked model
    assert model_fingerprint(averaged) != model_fingerprint(model)

    # A killed run: shard 1 and the completion marker missing. The rerun writes only what is missing.
    (folder / "meta.json").unlink()
    (folder / "shard-00001.safetensors").unlink()
    before = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    assert not is_complete(folder)
    with pytest.raises(AdvretrainError, match="not a complete adversarial set"):
        load_adversarial_set(folder)
    craft_adversarial_set(attack, model, images, labels, folder, {"attack": "fgsm"}, 4)
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert torch.equal(load_adversarial_set(folder).adversarial, direct.adversarial)
    with pytest.raises(AdvretrainError, match="another attack, model or data"):
        craft_adversarial_set(FGSM(eps=0.01), model, images, labels, folder, {"attack": "fgsm", "eps": 0.01}, 4)


def test_attack_command_writes_a_set_and_prints_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("small", 10)
    save_model(tmp_path / "model.safetensors", model)
    out = tmp_path / "adv"
    result = CliRunner().invoke(
        cli,
        [
            "attack",
            "--checkpoint",
            str(tmp_path / "model.safetensors"),
            "--attack",
            "deepfool",
            "--limit",
            "6",
            "--out",
            str(out),
            "--device",
            "cpu",
            "steps=5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fooling_ratio" in result.output and "l2_median" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and 0 <= metrics["fooling_ratio"] <= 1
    assert load_adversarial_set(out).meta["params"] == {"steps": 5}


def test_label_command_reports_source_retrieval(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(tmp_path / "model.safetensors", build_model("small", 10))
    adv = tmp_path / "adv"
    runner = CliRunner()
    crafted = runner.invoke(
        cli,
        [
            "attack",
            "--checkpoint",
            str(tmp_path / "model.safetensors"),
            "--attack",
            "fgsm",
            "--split",
            "train",
            "--limit",
            "30",
            "--out",
            str(adv),
            "--device",
            "cpu",
            "eps=0.03",
        ],
    )
    assert crafted.exit_code == 0, crafted.output
    result = runner.invoke(
        cli,
        [
            "label",
            "--adversarial",
            str(adv),
            "--reference",
            "cifar10-sample",
            "--pca-dims",
            "50",
            "--fooling-percentile",
            "99",
            "--out",
            str(tmp_path / "labels.safetensors"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "labels.json").read_text())
    assert "IN the reference set" in result.output
    assert report["exact_source_retrieval"] == 1.0 and report["train_source_accuracy"] >= 0.9
    assert report["flag_rate_fooling"] == 1.0 and report["clean_test_accuracy"] < 0.6  # unseen: plain 1-NN
