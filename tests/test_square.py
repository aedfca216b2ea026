"""Square is a query-only black-box attack: no gradient anywhere, the budget kept, queries counted, and it fools an
undefended CIFAR-10 model as the paper says a black-box attacker could."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advretrain import ExperimentConfig, build_config, build_model, load_dataset, train
from advretrain.attacks import ATTACKS, AttackError, Square
from advretrain.attacks.square import centred_rectangle, l2_pattern
from advretrain.metrics import attack_metrics, norms, predict
from advretrain.pipeline.threats import probes


def no_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any backward pass or gradient request raises from here on."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Square used autograd")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)


def linear_model(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.05), ("l2", 0.5)])
def test_square_never_calls_autograd_and_keeps_its_budget(
    monkeypatch: pytest.MonkeyPatch, norm: str, eps: float
) -> None:
    model = linear_model()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = predict(model, x).argmax(1)
    x_copy = x.clone()
    no_autograd(monkeypatch)
    result = Square(eps=eps, max_queries=200, norm=norm)(model, x, y)  # type: ignore[arg-type]
    assert torch.equal(x, x_copy)
    l2, linf = norms(x, result.adversarial)
    assert (linf if norm == "linf" else l2).max() <= eps + 1e-5
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert result.iterations is not None and result.iterations.dtype == torch.long
    assert (result.iterations >= 1).all() and (result.iterations <= 200).all()
    fooled = predict(model, result.adversarial).argmax(1) != y
    assert torch.equal(fooled, result.success) and fooled.any()
    assert (result.iterations[~result.success] == 200).all()  # unfooled images spend the whole budget


def test_a_misclassified_image_costs_one_query() -> None:
    model = linear_model()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    wrong = (predict(model, x).argmax(1) + 1) % 4
    result = Square(eps=1e-3, max_queries=50)(model, x, wrong)
    assert result.success.all() and (result.iterations == 1).all()


def test_each_image_draws_the_same_windows_alone_or_in_any_batch() -> None:
    model = linear_model()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y = predict(model, x).argmax(1)
    attack = Square(eps=0.03, max_queries=100, batch_size=4)
    whole = attack(model, x, y)
    reversed_order = attack(model, x.flip(0), y.flip(0))
    assert torch.equal(whole.adversarial, reversed_order.adversarial.flip(0))
    assert torch.equal(whole.iterations, reversed_order.iterations.flip(0))
    other_seed = Square(eps=0.03, max_queries=100, seed=1)(model, x, y)
    assert not torch.equal(whole.adversarial, other_seed.adversarial)


def reference_rectangle(height: int, width: int) -> torch.Tensor:
    """The reference's `eta_rectangles` (fra31/auto-attack, square.py), loop for loop: the oracle for ours."""
    delta = torch.zeros(height, width)
    centre = [height // 2, width // 2]
    for k in range(max(height // 2 + 1, width // 2 + 1)):
        top, left = centre[0] - k, centre[1] - k
        delta[max(top, 0) : min(top + 2 * k + 1, height), max(left, 0) : min(left + 2 * k + 1, width)] += (
            1 / (k + 1) ** 2
        )
    return delta / delta.square().sum().sqrt()


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 3), (2, 5), (3, 5), (4, 9), (14, 29), (15, 29)])
def test_the_l2_pattern_is_the_references(height: int, width: int) -> None:
    assert torch.allclose(centred_rectangle(height, width), reference_rectangle(height, width), atol=1e-6)
    pattern = l2_pattern(width)  # top half a centred rectangle, bottom half its negative, unit norm
    assert pattern.shape == (width, width) and pattern.square().sum().item() == pytest.approx(1, abs=1e-5)
    if width > 1:
        assert (pattern[: width // 2] >= 0).all() and (pattern[width // 2 :] < 0).all()


def test_l2_windows_are_odd_and_at_least_three_pixels() -> None:
    attack = Square(norm="l2", max_queries=10000, p_init=0.8)
    sides = [attack.side(q, 32, 32) for q in (1, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)]
    assert sides == [29, 21, 15, 11, 7, 5, 5, 3, 3, 3]
    assert attack.side(1, 2, 2) == 1  # an image too small for a 3×3 window still gets one pixel


def test_square_refuses_an_l_inf_budget_above_one() -> None:
    with pytest.raises(AttackError, match="eps"):
        ATTACKS["square"].build({"eps": 2.0})
    assert ATTACKS["square"].build({"eps": 2.0, "norm": "l2"}).eps == 2.0  # an L2 norm over 3,072 pixels may be


def test_an_l2_square_is_one_named_column_of_the_threat_table() -> None:
    cfg = build_config(ExperimentConfig, "default", ["attack.square.norm=l2", "attack.square.eps=0.5"])
    keys = [p.key for p in probes(cfg) if p.kind == "query"]
    assert keys == ["square@L2 0.5"]  # the extra budgets are L-inf ones: not applied to an L2 attack


@pytest.fixture(scope="module")
def undefended() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The default run's baseline recipe on 1,500 sample images (about 55%) and 100 test images it gets right."""
    data = load_dataset("cifar10-sample", "train").stratified(150)
    test = load_dataset("cifar10-sample", "test")
    cfg = build_config(ExperimentConfig, "default").train  # the default run's baseline recipe (about 55% here)
    torch.manual_seed(0)
    model = train(build_model("small", 10), data, cfg, torch.device("cpu"), progress=False).model
    subset = test.stratified(30)  # 300 images of every class
    images, labels = subset.images, subset.labels
    x = images.float() / 255
    correct = predict(model, x).argmax(1) == labels
    assert correct.sum() >= 60, "the model should be better than chance for the test to mean something"
    return model, x[correct][:100], labels[correct][:100]


def test_square_fools_an_undefended_cifar_model_within_1000_queries(
    undefended: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = undefended
    result = Square(eps=8 / 255, max_queries=1000)(model, x, y)
    rate = float(result.success.float().mean())
    assert rate >= 0.9, rate
    metrics = attack_metrics(model, x, result.adversarial, y, queries=result.iterations)
    assert metrics["success_on_correct"] == pytest.approx(rate)
    assert 1 <= metrics["queries_median"] <= metrics["queries_mean"] * 3 and metrics["queries_mean"] < 1000


def test_l2_square_fools_an_undefended_cifar_model_within_1000_queries(
    undefended: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    """At L2 0.5 the search, not its start, does the fooling (measured: 9% after the first query, 80% after 1,000;
    Gaussian noise of that norm fools 29%; torchattacks' Square 84% against our 84% on 200 images, 10 seeds)."""
    model, x, y = undefended
    start = Square(eps=0.5, norm="l2", max_queries=1)(model, x, y)
    result = Square(eps=0.5, norm="l2", max_queries=1000)(model, x, y)
    rate, start_rate = float(result.success.float().mean()), float(start.success.float().mean())
    assert rate >= 0.75 and rate >= start_rate + 0.5, (rate, start_rate)
    assert norms(x, result.adversarial)[0].max() <= 0.5 + 1e-5


def test_square_is_a_query_attack_in_the_registry() -> None:
    spec = ATTACKS["square"]
    assert spec.threat == "query" and not spec.fitted and not spec.targeted
    assert spec.configure().model_dump() == {
        "eps": 8 / 255,
        "max_queries": 5000,
        "p_init": 0.8,
        "norm": "linf",
        "seed": 0,
        "batch_size": 512,
    }


def test_the_window_shrinks_on_the_reference_schedule() -> None:
    attack = Square(max_queries=10000, p_init=0.8)
    sides = [attack.side(q, 32, 32) for q in (1, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)]
    assert sides == [29, 20, 14, 10, 7, 5, 4, 3, 2, 1]
