"""APGD and AutoAttack proved on behaviour: the schedule, the DLR loss, the best point kept, APGD at least as strong as
a long PGD, and the ensemble's rule that an image is robust only when every member failed."""

from __future__ import annotations

import pytest
import torch
from test_attacks import tiny_cnn
from torch import nn

from advretrain import build_model, load_dataset, train
from advretrain.attacks import APGD, APGDT, PGD, AttackError, AutoAttack
from advretrain.attacks.apgd import apgd, ce_loss, checkpoints, dlr_loss, project, random_start
from advretrain.attacks.base import AttackResult, frozen
from advretrain.attacks.square import image_keys
from advretrain.config import AdversarialTraining, TrainConfig
from advretrain.data import to_float


def test_the_checkpoints_follow_the_papers_schedule() -> None:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06): windows of 22, 19, 16, ..., 6, 6 steps
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]


def test_dlr_is_invariant_to_shifting_and_scaling_the_logits() -> None:
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    targets = (labels + 3) % 10
    for loss in (lambda z: dlr_loss(z, labels), lambda z: dlr_loss(z, labels, targets)):
        torch.testing.assert_close(loss(logits), loss(7.5 * logits + 3.0), rtol=1e-4, atol=1e-5)
    # untargeted: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), worked by hand on one row
    z = torch.tensor([[3.0, 1.0, 0.5, -2.0]])
    assert float(dlr_loss(z, torch.tensor([0]))) == pytest.approx(-(3.0 - 1.0) / (3.0 - 0.5))
    assert float(dlr_loss(z, torch.tensor([2]))) == pytest.approx(-(0.5 - 3.0) / (3.0 - 0.5))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_and_random_start_stay_in_the_ball_and_the_box(norm: str) -> None:
    x0 = torch.rand(6, 3, 8, 8)
    eps = 0.1 if norm == "linf" else 0.5
    start = random_start(x0, eps, norm, image_keys(x0, 0), 0)  # type: ignore[arg-type]
    far = project(x0 + 3 * torch.randn_like(x0), x0, eps, norm)  # type: ignore[arg-type]
    for x in (start, far):
        delta = (x - x0).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-5).all() and x.min() >= 0 and x.max() <= 1
    assert not torch.equal(start, random_start(x0, eps, norm, image_keys(x0, 0), 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.1)])
def test_the_point_returned_holds_the_best_loss_and_the_best_loss_never_falls(norm: str, eps: float) -> None:
    model = tiny_cnn(classes=4).eval()
    x0, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    best_so_far: list[torch.Tensor] = []
    with frozen(model):
        out, fooled, best = apgd(
            model, x0, y, None, eps=eps, norm=norm, steps=30, loss_fn=ce_loss, rho=0.75,  # type: ignore[arg-type]
            keys=image_keys(x0, 0), restart=0, on_step=best_so_far.append,
        )  # fmt: skip
        losses = ce_loss(model(out), y)
    robust = ~fooled
    torch.testing.assert_close(losses[robust], best[robust], rtol=1e-4, atol=1e-5)  # the kept point is the best one
    trace = torch.stack(best_so_far)  # steps × N
    assert (trace[1:] >= trace[:-1] - 1e-6).all()
    delta = (out - x0).flatten(1)
    assert ((delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)) <= eps + 1e-5).all()


@pytest.fixture(scope="module")
def robust_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The `small` CNN adversarially trained (FGSM-RS at 4/255) for 3 epochs on 1,000 sample images, and 200 test
    images: about 35% clean accuracy, of which PGD-5 at 2/255 leaves about 30 points."""
    data = load_dataset("cifar10-sample", "train").stratified(100)
    test = load_dataset("cifar10-sample", "test").stratified(20)
    adversarial = AdversarialTraining(method="fgsm-rs", eps=4 / 255, step_size=2 / 255)
    recipe = TrainConfig(
        epochs=3, batch_size=100, lr=0.16, momentum=0.85, optimizer="muon", muon_lr=0.24, nesterov=True,
        weight_decay=1.5e-3, bn_lr_scale=64, schedule="onecycle", warmup_epochs=0.5, label_smoothing=0.2,
        adversarial=adversarial,
    )  # fmt: skip
    torch.manual_seed(0)
    model = train(build_model("small", 10), data, recipe, torch.device("cpu"), progress=False).model
    return model.eval(), to_float(test.images), test.labels


def accuracy(model: nn.Module, result: AttackResult, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(result.adversarial).argmax(1) == labels).float().mean())


def test_apgd_ce_keeps_no_more_accuracy_than_a_hundred_steps_of_pgd(
    robust_model: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = robust_model
    eps = 2 / 255
    pgd5 = accuracy(model, PGD(eps=eps, step_size=eps / 4, steps=5)(model, x, y), y)
    pgd100 = accuracy(model, PGD(eps=eps, step_size=eps / 4, steps=100)(model, x, y), y)
    apgd_ce = accuracy(model, APGD(eps=eps)(model, x, y), y)
    assert pgd5 > 0.2  # the test means something: a weak attack leaves accuracy to take
    assert apgd_ce <= pgd100, (apgd_ce, pgd100, pgd5)
    result = APGDT(eps=eps, targets=3)(model, x, y)
    assert accuracy(model, result, y) <= pgd5 and ((result.adversarial - x).abs().amax() <= eps + 1e-6)


def test_apgd_refuses_what_it_cannot_do() -> None:
    with pytest.raises(AttackError, match="needs at least 4 classes"):
        APGDT()(tiny_cnn(classes=3), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(AttackError, match="eps"):
        APGD(eps=2.0)


class Member:
    """An ensemble member that fools exactly the images of the given (global) indices and records what it saw."""

    def __init__(self, fools: set[int]) -> None:
        self.fools, self.seen = fools, torch.empty(0)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        index = images[:, 0, 0, 0].mul(100).round().long()  # each stub image carries its index in a pixel
        self.seen = index
        success = torch.tensor([int(i) in self.fools for i in index], dtype=torch.bool)
        adversarial = images.clone()
        adversarial[success, 1] = 0.0  # a visible, in-range change
        return AttackResult(adversarial, success)


class Constant(nn.Module):
    """Predicts class 0 for every image: labels 0 are classified correctly, the rest not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(x.shape[0], 4) + self.w


def test_autoattack_counts_an_image_robust_only_when_every_member_failed() -> None:
    x = torch.rand(6, 3, 4, 4)
    x[:, 0, 0, 0] = torch.arange(6) / 100
    y = torch.tensor([0, 0, 0, 0, 0, 1])  # image 5 is misclassified before any attack
    ensemble = AutoAttack()
    first, second, third = Member({1}), Member({2, 3}), Member({3, 4})
    ensemble.attacks = [first, second, third]
    result = ensemble(Constant(), x, y)
    assert first.seen.tolist() == [0, 1, 2, 3, 4]  # every correctly classified image
    assert second.seen.tolist() == [0, 2, 3, 4]  # only what the first left
    assert third.seen.tolist() == [0, 4]  # image 3 was broken by the second already
    assert result.success.tolist() == [False, True, True, True, True, True]
    assert result.member is not None and result.member.tolist() == [-1, 0, 1, 1, 2, -1]
    assert torch.equal(result.adversarial[0], x[0]) and torch.equal(result.adversarial[5], x[5])
    assert (result.adversarial[1:5, 1] == 0).all()


def test_autoattack_is_at_least_as_strong_as_each_member(
    robust_model: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = robust_model
    x, y = x[:60], y[:60]
    eps = 2 / 255
    ensemble = AutoAttack(eps=eps, steps=20, queries=200)(model, x, y)
    robust = accuracy(model, ensemble, y)
    assert robust <= accuracy(model, APGD(eps=eps, steps=20)(model, x, y), y)
    assert ensemble.member is not None and set(ensemble.member.tolist()) <= {-1, 0, 1, 2, 3}
    assert robust == pytest.approx(float((~ensemble.success).float().mean()))
