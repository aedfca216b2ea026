"""Square is a query-only black-box attack: no gradient anywhere, the budget kept, queries counted, and it fools an
undefended CIFAR-10 model as the paper says a black-box attacker could."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advretrain import ExperimentConfig, build_config, build_model, load_dataset, train
from advretrain.attacks import ATTACKS, Square
from advretrain.metrics import attack_metrics, predict


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


def test_square_never_calls_autograd_and_keeps_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear_model()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = predict(model, x).argmax(1)
    x_copy = x.clone()
    no_autograd(monkeypatch)
    result = Square(eps=0.05, max_queries=200)(model, x, y)
    assert torch.equal(x, x_copy)
    assert (result.adversarial - x).abs().max() <= 0.05 + 1e-6
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


def test_square_fools_an_undefended_cifar_model_within_1000_queries() -> None:
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
    x, y = x[correct][:100], labels[correct][:100]
    result = Square(eps=8 / 255, max_queries=1000)(model, x, y)
    rate = float(result.success.float().mean())
    assert rate >= 0.9, rate
    metrics = attack_metrics(model, x, result.adversarial, y, queries=result.iterations)
    assert metrics["success_on_correct"] == pytest.approx(rate)
    assert 1 <= metrics["queries_median"] <= metrics["queries_mean"] * 3 and metrics["queries_mean"] < 1000


def test_square_is_a_query_attack_in_the_registry() -> None:
    spec = ATTACKS["square"]
    assert spec.threat == "query" and not spec.fitted and not spec.targeted
    assert spec.configure().model_dump() == {
        "eps": 8 / 255,
        "max_queries": 5000,
        "p_init": 0.8,
        "seed": 0,
        "batch_size": 512,
    }


def test_the_window_shrinks_on_the_reference_schedule() -> None:
    attack = Square(max_queries=10000, p_init=0.8)
    sides = [attack.side(q, 32, 32) for q in (1, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)]
    assert sides == [29, 20, 14, 10, 7, 5, 4, 3, 2, 1]
