"""The attacks are proved against closed forms and invariants, not just run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from advretrain.attacks import ATTACKS, FGSM, GAP, AttackError, CarliniWagnerL2, DeepFool, build_attack
from advretrain.attacks.base import AttackResult
from advretrain.runtime.io import read_safetensors, save_state


class Affine(nn.Module):
    """f(x) = W·flatten(x) + b: every boundary is a hyperplane, so minimal perturbations have closed forms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(weight)
            self.lin.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x.flatten(1))
        return out


def affine(classes: int, seed: int = 0) -> Affine:
    gen = torch.Generator().manual_seed(seed)
    return Affine(torch.randn(classes, 48, generator=gen), torch.randn(classes, generator=gen) * 0.1).double()


def mid_images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Images near mid-grey: the minimal perturbations stay far from the [0,1] box."""
    gen = torch.Generator().manual_seed(seed)
    return (0.5 + 0.05 * torch.randn(n, 3, 4, 4, generator=gen)).to(dtype)


def tiny_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, classes)
    )


def closed_form_deepfool(model: Affine, x: torch.Tensor) -> torch.Tensor:
    """r* = (d_l + 1e-4) · w_l / ||w_l||, with l the nearest boundary of the predicted class."""
    w, f = model.lin.weight, model(x)
    k0 = f.argmax(1)
    out = []
    for i in range(x.shape[0]):  # reference computation in a plain loop: clarity over speed in a test
        diffs = w - w[k0[i]]
        dist = (f[i] - f[i, k0[i]]).abs() / diffs.norm(dim=1)
        dist[k0[i]] = float("inf")
        nearest = int(dist.argmin())
        out.append((dist[nearest] + 1e-4) * diffs[nearest] / diffs[nearest].norm())
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("classes", [2, 5])
def test_deepfool_matches_the_closed_form_on_an_affine_classifier(classes: int) -> None:
    model, x = affine(classes), mid_images(16)
    result = DeepFool(overshoot=0.02)(model, x, torch.zeros(16, dtype=torch.long))
    expected = 1.02 * closed_form_deepfool(model, x)
    assert result.success.all() and (result.iterations == 1).all()
    torch.testing.assert_close(result.adversarial - x, expected, atol=1e-9, rtol=1e-7)


def test_fgsm_equals_its_formula() -> None:
    model, x = tiny_cnn().eval(), torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    xg = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xg), y, reduction="sum").backward()
    expected = (x + 0.07 * xg.grad.sign()).clamp(0, 1)  # type: ignore[union-attr]
    assert torch.equal(FGSM(eps=0.07)(model, x, y).adversarial, expected)


def binary_cw_minimum(model: Affine, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For two classes the least-likely target is the other class; its boundary is one hyperplane away."""
    f = model(x)
    target = f.argmin(1)
    w = model.lin.weight
    normal = (w[1] - w[0]).norm()
    return (f[:, 0] - f[:, 1]).abs() / normal, target


def test_cw_lands_within_a_few_percent_of_the_minimal_l2() -> None:
    model, x = affine(2), mid_images(12)
    minimum, target = binary_cw_minimum(model, x)
    result = CarliniWagnerL2(binary_search_steps=9, steps=500, lr=0.01)(model, x, torch.zeros(12, dtype=torch.long))
    found = (result.adversarial - x).flatten(1).norm(dim=1)
    assert result.success.all() and torch.equal(result.targets, target)
    assert (model(result.adversarial).argmax(1) == target).all()
    assert (found >= minimum * (1 - 1e-6)).all() and (found <= minimum * 1.03).all(), found / minimum


def test_cw_keeps_the_smallest_successful_perturbation() -> None:
    """More search rounds start like fewer (same c schedule) and can only replace the best by a smaller one."""
    model, x = affine(5, seed=3), mid_images(10, seed=4)
    y = torch.zeros(10, dtype=torch.long)
    short = CarliniWagnerL2(binary_search_steps=1, steps=60, initial_const=1.0)(model, x, y)
    long = CarliniWagnerL2(binary_search_steps=4, steps=60, initial_const=1.0)(model, x, y)
    l2_short = (short.adversarial - x).flatten(1).norm(dim=1)
    l2_long = (long.adversarial - x).flatten(1).norm(dim=1)
    assert (long.success >= short.success).all()
    both = short.success & long.success
    assert both.float().mean() > 0.5 and (l2_long[both] <= l2_short[both] + 1e-12).all()
    assert (l2_long[both] < l2_short[both] - 1e-6).any()  # the later rounds did find smaller ones


def test_cw_abort_early_watches_the_batch_or_each_image() -> None:
    """The reference ends a round for the whole batch; per image, stalled images leave it and the rest go on."""
    model, x = affine(5, seed=3), mid_images(10, seed=4)
    y = torch.zeros(10, dtype=torch.long)
    batch = CarliniWagnerL2(binary_search_steps=3, steps=100, initial_const=1.0)(model, x, y)
    per_image = CarliniWagnerL2(binary_search_steps=3, steps=100, initial_const=1.0, per_image_abort=True)(model, x, y)
    assert batch.iterations is not None and per_image.iterations is not None
    assert (batch.iterations == batch.iterations[0]).all()  # every image ran every step of every round
    assert len(set(per_image.iterations.tolist())) > 1  # each image left when its own loss stalled
    assert torch.equal(per_image.success, batch.success)


def test_cw_failures_return_the_clean_image() -> None:
    model, x = affine(3), mid_images(4)
    result = CarliniWagnerL2(binary_search_steps=1, steps=2, initial_const=1e-6)(model, x, torch.zeros(4).long())
    assert not result.success.any() and torch.equal(result.adversarial, x)


BRIGHTNESS_MEANS = torch.tensor([0.44, 0.50, 0.57])


class BrightnessClassifier(nn.Module):
    """Gaussian class-conditional classifier on mean brightness: logits = -s (mean(x) - mu_c)^2.

    A uniform shift moves dark images to mid and mid to bright, so one universal perturbation can fool most images.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5000.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.scale * (x.mean((1, 2, 3))[:, None] - BRIGHTNESS_MEANS) ** 2


def brightness_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    level = BRIGHTNESS_MEANS[labels] + 0.006 * torch.randn(n, generator=gen)
    return (level[:, None, None, None] + 0.05 * torch.randn(n, 3, 16, 16, generator=gen)).clamp(0, 1), labels


def test_gap_learns_one_bounded_universal_perturbation() -> None:
    model = BrightnessClassifier()
    train_x, _ = brightness_task(600, seed=1)
    test_x, test_y = brightness_task(400, seed=2)
    assert (model(test_x).argmax(1) == test_y).float().mean() > 0.95
    gap = GAP(eps=10 / 255, lr=0.01, epochs=3, batch_size=32, holdout=100, ngf=8).fit(model, train_x)
    u = gap.perturbation
    assert u is not None and u.shape == (1, 3, 16, 16)
    assert torch.allclose(u.abs().amax(dim=(0, 2, 3)), torch.full((3,), 10 / 255))  # every channel at the bound
    result = gap(model, test_x, test_y)
    inside = (test_x + u > 0) & (test_x + u < 1)
    assert torch.allclose((result.adversarial - test_x)[inside], u.expand_as(test_x)[inside], atol=1e-6)
    fr = result.success.float().mean()
    sign = torch.sign(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))) * 10 / 255
    random_fr = (model((test_x + sign).clamp(0, 1)).argmax(1) != model(test_x).argmax(1)).float().mean()
    assert fr > 0.3 and fr > random_fr + 0.2, (fr, random_fr)


def test_gap_reports_its_saturation_and_a_saturated_generator_is_visible() -> None:
    model = BrightnessClassifier()
    train_x, _ = brightness_task(600, seed=1)
    test_x, test_y = brightness_task(400, seed=2)
    fits = {
        lr: GAP(lr=lr, epochs=3, batch_size=32, holdout=100, ngf=8, loss="untargeted").fit(model, train_x)
        for lr in (0.02, 0.002)
    }
    for gap in fits.values():
        assert [h["epoch"] for h in gap.history] == [1, 2, 3]
        assert all(0 <= h["saturation"] <= 1 for h in gap.history)
    assert fits[0.02].history[-1]["saturation"] > 0.9  # too large a step: the tanh saturates (METHOD.md 2.1)
    assert fits[0.002].history[-1]["saturation"] < 0.1
    # the untargeted loss pushes away from each clean prediction: it fools far more than a random sign pattern
    fr = fits[0.002](model, test_x, test_y).success.float().mean()
    sign = torch.sign(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))) * 10 / 255
    random_fr = (model((test_x + sign).clamp(0, 1)).argmax(1) != model(test_x).argmax(1)).float().mean()
    assert fr > random_fr + 0.2, (fr, random_fr)


def test_gap_state_round_trips_through_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = BrightnessClassifier()
    gap = GAP(epochs=1, batch_size=64, holdout=50, ngf=4).fit(model, brightness_task(200)[0])
    save_state(tmp_path / "gap.safetensors", gap)
    loaded = GAP().load_state_dict(*read_safetensors(tmp_path / "gap.safetensors", "GAP", "fit it again"))
    x, y = brightness_task(20, seed=5)
    assert torch.equal(loaded(model, x, y).adversarial, gap(model, x, y).adversarial)
    assert loaded.history == gap.history and "saturation" in loaded.history[0]
    with pytest.raises(AttackError, match="not fitted"):
        GAP()(model, x, y)


# Small budgets for the registry-wide tests (tiny images, CPU): each attack's keywords, the rest its defaults.
FAST: dict[str, dict[str, float | int]] = {
    "fgsm": {"eps": 0.05},
    "pgd": {"eps": 0.03, "step_size": 0.01, "steps": 3},
    "deepfool": {"steps": 10},
    "cw": {"binary_search_steps": 2, "steps": 20},
    "gap": {"epochs": 1, "batch_size": 16, "holdout": 8, "ngf": 4},
    "square": {"eps": 0.05, "max_queries": 50},
    "apgd-ce": {"eps": 0.05, "steps": 10},
    "apgd-t": {"eps": 0.05, "steps": 10, "targets": 3},
    "fab-t": {"eps": 0.05, "steps": 10, "targets": 3},
    "autoattack": {"eps": 0.05, "steps": 10, "targets": 3, "queries": 50},
}


def build(name: str, model: nn.Module, **extra: Any) -> Any:
    """Attack `name` from the registry with its FAST keywords, fitted first when its spec says so."""
    spec = ATTACKS[name]
    attack = spec.build({**FAST.get(name, {}), **extra})
    if spec.fitted:
        attack.fit(model, torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(7)))
    return attack


def budget(name: str) -> float | None:
    """The L-inf bound of an attack that has one (an `eps` keyword), else None."""
    return getattr(ATTACKS[name].configure(FAST.get(name)), "eps", None)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_respects_range_budget_inputs_and_model_state(name: str) -> None:
    model = tiny_cnn().train()  # left in train mode: the attack must use eval mode and restore train mode
    model[0].weight.requires_grad_(True)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    x_copy, running_mean = x.clone(), model[1].running_mean.clone()
    result = build(name, tiny_cnn())(model, x, y)
    assert isinstance(result, AttackResult)
    assert result.adversarial.shape == x.shape and result.success.shape == (6,) and result.success.dtype == torch.bool
    assert torch.isfinite(result.adversarial).all()
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    if (eps := budget(name)) is not None:
        assert (result.adversarial - x).abs().max() <= eps + 1e-6
    assert torch.equal(x, x_copy), "inputs modified"
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert torch.equal(model[1].running_mean, running_mean), "BN statistics changed: not run in eval mode"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_batch_equals_its_images_one_by_one(name: str) -> None:
    model = tiny_cnn().eval()
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    # A random start is drawn per batch, so only the deterministic part of the loop can equal its single images.
    deterministic = {"random_start": False} if "random_start" in ATTACKS[name].settings.model_fields else {}
    attack = build(name, model, **deterministic)
    whole = attack(model, x, y).adversarial
    single = torch.cat([attack(model, x[i : i + 1], y[i : i + 1]).adversarial for i in range(5)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=0)


def test_out_of_range_or_misshapen_input_is_rejected() -> None:
    model = tiny_cnn()
    with pytest.raises(AttackError, match=r"must lie in \[0,1\].*divide uint8 images by 255"):
        FGSM()(model, torch.rand(2, 3, 8, 8) * 255, torch.zeros(2, dtype=torch.long))
    with pytest.raises(AttackError, match="labels must have shape"):
        DeepFool()(model, torch.rand(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AttackError, match="float N×C×H×W"):
        FGSM()(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


def test_registry_builds_every_attack_by_name() -> None:
    assert set(ATTACKS) == {
        *("fgsm", "deepfool", "cw", "gap", "pgd", "square", "apgd-ce", "apgd-t", "fab-t", "autoattack")
    }
    assert build_attack("fgsm").eps == 0.07 and build_attack("pgd").steps == 10
    assert build_attack("cw").binary_search_steps == 9 and build_attack("deepfool").overshoot == 0.02
    assert build_attack("gap").eps == pytest.approx(10 / 255)
    with pytest.raises(AttackError, match="unknown attack 'fgm'"):
        build_attack("fgm")
    with pytest.raises(AttackError, match=r"attack fgsm: unknown keyword 'epsilon'; its keywords are eps, batch_size"):
        build_attack("fgsm", epsilon=0.1)
    with pytest.raises(AttackError, match=r"attack pgd: steps: .*integer"):
        build_attack("pgd", steps=2.5)


def test_every_spec_reads_its_defaults_from_the_class() -> None:
    for name, spec in ATTACKS.items():
        defaults = spec.configure().model_dump()
        built = spec.build()
        for key, value in defaults.items():
            assert getattr(built, key) == value, (name, key)
    assert ATTACKS["gap"].fitted and ATTACKS["gap"].threat == "universal"
    assert ATTACKS["cw"].targeted and not ATTACKS["fgsm"].targeted


def test_deepfool_pushes_misclassified_images_too() -> None:
    model, x = affine(3), mid_images(8)
    wrong_labels = (model(x).argmax(1) + 1) % 3
    result = DeepFool()(model, x, wrong_labels)
    assert result.success.all()  # the prediction changes whatever the label: the fooling ratio can reach 1
