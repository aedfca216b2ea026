"""The evaluation beyond the paper: fooling-image classes, the PCA sweep, cross-attack, robustness curves and the
reference defence, each checked for what it claims rather than for the files it writes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from advretrain import build_config
from advretrain.attacks import build_attack
from advretrain.config import AdversarialTraining, ExperimentConfig
from advretrain.data import ImageDataset, load_dataset
from advretrain.fooling import fooling_images
from advretrain.metrics import evaluate
from advretrain.models import build_model
from advretrain.pipeline.cross_attack import robustness_curve
from advretrain.pipeline.pca_sweep import fits, sweep_point
from advretrain.report_evaluation import curve_accuracy
from advretrain.train import train


def test_fooling_images_reach_the_confidence_they_claim() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    with torch.no_grad():
        model[1].weight.mul_(10)  # logits that 15 steps of 1/255 can move by a few units
    targets = torch.arange(3).repeat_interleave(8)
    images, reached = fooling_images(model, targets, (3, 8, 8), steps=15, confidence=0.9)
    assert images.min() >= 0 and images.max() <= 1
    assert reached.any() and not reached.all()  # a budget some images meet and some do not
    with torch.no_grad():
        p = torch.softmax(model(images), 1).gather(1, targets[:, None]).squeeze(1)
    assert bool((p[reached] >= 0.9).all())  # every image marked as reached is that confident in its target
    assert bool((p[~reached] < 0.9).all())  # and none that is marked as not


def adversarial_set(adversarial: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(adversarial=adversarial, labels=labels, indices=indices)


def test_pca_sweep_full_row_is_exact_nearest_neighbour_in_pixel_space() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(80, 3, 4, 4, generator=gen)
    labels = torch.randint(0, 4, (80,), generator=gen)
    idx = torch.randperm(80, generator=gen)[:30]
    pool = adversarial_set((x[idx] + 0.02 * torch.randn(30, 3, 4, 4, generator=gen)).clamp(0, 1), labels[idx], idx)
    test_x = torch.rand(25, 3, 4, 4, generator=gen)
    static = adversarial_set(test_x, torch.randint(0, 4, (25,), generator=gen), torch.arange(25))
    art: Any = SimpleNamespace(name="a", pool=pool, static=static)
    flat = x.flatten(1)
    fitted = fits(flat, [5, 48, "full"])
    rows = {(r.dims, r.k): r for d, f in fitted.items() for r in sweep_point(d, f, [1, 3], flat, labels, [art], 4)}
    # by hand: the nearest training image in pixel space, its label
    for name, images, truth in (
        ("train_source", pool.adversarial, pool.labels),
        ("test_source", test_x, static.labels),
    ):
        nearest = torch.cdist(images.flatten(1), flat).argmin(1)
        expected = float((labels[nearest] == truth).float().mean())
        assert rows[("full", 1)].metrics[f"a/{name}_accuracy"] == pytest.approx(expected)
        assert rows[(48, 1)].metrics[f"a/{name}_accuracy"] == pytest.approx(expected)  # a full rotation: same
    nearest = torch.cdist(pool.adversarial.flatten(1), flat).argmin(1)
    assert rows[("full", 1)].metrics["a/exact_source_retrieval"] == pytest.approx(
        float((nearest == idx).float().mean())
    )
    assert rows[(5, 1)].fit_seconds == rows[(48, 3)].fit_seconds  # one eigendecomposition serves every size


def test_robustness_curve_is_the_hand_share_and_never_rises() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    images = torch.rand(40, 3, 2, 2)
    labels = torch.randint(0, 3, (40,))
    test = ImageDataset(images, labels, ["a", "b", "c"], "t")
    result = build_attack("deepfool", steps=20)(model, images, labels)
    crafted: Any = SimpleNamespace(adversarial=result.adversarial)
    curve = robustness_curve(SimpleNamespace(model=model), crafted, test, 64)  # type: ignore[arg-type]
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
        fooled = model(result.adversarial).argmax(1) != labels
    norms = (result.adversarial - images).flatten(1).norm(dim=1)
    assert curve["total"] == 40 and len(curve["norms"]) == int(correct.sum())
    for eps in (0.0, 0.05, 0.1, 0.3, 1.0):
        by_hand = int((correct & (~fooled | (norms > eps))).sum()) / 40
        assert curve_accuracy(curve, eps) == pytest.approx(by_hand)
    grid = [i / 50 for i in range(60)]
    values = [curve_accuracy(curve, e) for e in grid]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[0] == pytest.approx(float(correct.float().mean()))  # at ε = 0: clean accuracy


def test_cross_attack_diagonal_is_the_adaptive_column_and_f0_row_the_initial(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    cross = results["evaluation"]["cross"]
    assert set(cross) == {"f0", "f1 gap N=20", "f1 deepfool N=20", "f1 cw N=20", "f1 fgsm N=20", "reference fgsm-rs"}
    for name, attack in results["attacks"].items():
        largest = max(attack["retrain"], key=lambda r: r["n"])
        assert cross[f"f1 {name} N={largest['n']}"][name] == largest["adaptive"]
        assert cross["f0"][name] == attack["initial"]
    assert all("pgd" in row for row in cross.values())
    tables = (finished_run / "tables.md").read_text()
    for heading in ("Fooling images", "PCA dimensions", "Cross-attack", "Robustness curves", "Reference defence"):
        assert f"## {heading}" in tables
    assert "| reference fgsm-rs |" in tables.split("## Threat models")[1].split("##")[0]  # a threat-model row too


def test_robustness_table_is_the_stored_norms(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    curves, eps = results["evaluation"]["curves"], results["evaluation"]["curve_eps"]
    assert set(curves["f0"]) == {"deepfool", "cw"}  # the run's minimal-norm attacks
    tables = (finished_run / "tables.md").read_text().split("## Robustness curves")[1].split("\n## ")[0]
    for label, by_attack in curves.items():
        for name, curve in by_attack.items():
            shares = [sum(1 for v in curve["norms"] if v is None or v > e) / curve["total"] for e in eps]
            cells = " | ".join(f"{100 * s:.1f}%" for s in shares)
            assert f"| {label} | {name} | " in tables and cells in tables


def test_experiments_switch_off_and_are_known_names() -> None:
    cfg = build_config(ExperimentConfig, "default", ["experiments=[]"])
    assert cfg.experiments == []
    with pytest.raises(Exception, match="experiments"):
        build_config(ExperimentConfig, "default", ["experiments=[cross-atack]"])


PGD = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 5}


def pgd_accuracy(adversarial: AdversarialTraining | None) -> float:
    """The default config's recipe on the bundled sample (1,500 images, 4 epochs), then PGD on 200 test images."""
    cfg = build_config(ExperimentConfig, "default")
    data = load_dataset("cifar10-sample", "train").stratified(150)
    test = load_dataset("cifar10-sample", "test").stratified(20)
    torch.manual_seed(0)
    recipe = cfg.train.model_copy(update={"adversarial": adversarial})
    trained = train(build_model("small", 10), data, recipe, torch.device("cpu"), progress=False).model
    attacked = build_attack("pgd", **PGD)(trained, test.images.float() / 255, test.labels).adversarial
    return evaluate(trained, attacked, test.labels)


@pytest.fixture(scope="module")
def baseline_pgd_accuracy() -> float:
    return pgd_accuracy(None)


@pytest.mark.parametrize("method", ["fgsm-rs", "pgd"])
def test_adversarial_training_resists_pgd_better_than_the_baseline(method: str, baseline_pgd_accuracy: float) -> None:
    # the default config's reference defence (FGSM-RS at step eps/2), and PGD-AT with 3 steps for time
    cfg = build_config(ExperimentConfig, "default")
    defence = cfg.defence if method == "fgsm-rs" else AdversarialTraining(method="pgd", steps=3)
    assert pgd_accuracy(defence) > baseline_pgd_accuracy + 0.10
