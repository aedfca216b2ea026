"""Every registry model maps [0,1] images of 32×32 and 64×64 to logits for any class count, and trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advretrain import MODELS, ConfigError, build_model, grow_head


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("size", "classes"), [(32, 10), (64, 200), (32, 3)])
def test_forward_backward_every_parameter_gets_a_gradient(name: str, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, classes, image_size=size)
    x = torch.rand(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_vgg16_is_the_paper_architecture() -> None:
    model = build_model("vgg16", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and model.head.in_features == 512 and model.head.out_features == 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13


def test_resnet18_has_a_3x3_stem_and_no_max_pool() -> None:
    model = build_model("resnet18", 200, image_size=64)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_normalisation_is_inside_the_model() -> None:
    model = build_model("small", 10).eval()
    model.set_normalization([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x))


def test_grow_head_keeps_old_class_weights() -> None:
    torch.manual_seed(0)
    model = build_model("small", 10).eval()
    x = torch.rand(4, 3, 32, 32)
    before = model(x)
    grow_head(model, 2)
    after = model(x)
    assert after.shape == (4, 12) and model.spec.num_classes == 12
    assert torch.allclose(after[:, :10], before, atol=1e-6)


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg61'; choose one of"):
        build_model("vgg61", 10)
