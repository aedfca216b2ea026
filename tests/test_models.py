"""Every registry model maps [0,1] images of 32×32 and 64×64 to logits for any class count, and trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from advretrain import MODELS, ConfigError, build_model, grow_head, load_model, save_model
from advretrain.config import ModelConfig
from advretrain.models import ModelSpec, PatchWhitening, channels_last


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("size", "classes"), [(32, 10), (64, 200), (32, 3)])
def test_forward_backward_every_parameter_gets_a_gradient(name: str, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, classes, image_size=size)
    x = torch.rand(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [] and trainable


def test_small_freezes_only_its_whitening_stem_and_batchnorm_scales() -> None:
    model = build_model("small", 10)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    scales = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert frozen == {"features.0.weight"} | scales and len(scales) == 6


def test_whitening_stem_decorrelates_training_patches() -> None:
    """After init_from_data, the stem's first half maps 2×2 patches to (nearly) unit, uncorrelated outputs."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.rand(64, 3, 8, 8, generator=gen).repeat_interleave(4, 2).repeat_interleave(4, 3)  # correlated
    images = (smooth * 0.8 + torch.rand(64, 3, 32, 32, generator=gen) * 0.2).mul(255).to(torch.uint8)
    model = build_model("small", 10)
    model.init_from_data(images)
    stem = model.features[0]
    assert isinstance(stem, PatchWhitening) and torch.equal(stem.weight[:12], -stem.weight[12:])
    with torch.no_grad():
        out = stem(model.normalize(images.float() / 255))[:, :12]  # N×12×31×31
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / flat.shape[0]
    # eigenvalue λ comes out as λ / (λ + 5e-4): 1 up to the regulariser for the directions the data fills
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-3)
    assert (cov.diagonal() > 0.9).sum() >= 10 and (cov.diagonal() < 1 + 1e-6).all()
    raw = torch.nn.functional.unfold(model.normalize(images.float() / 255), 2).transpose(1, 2).reshape(-1, 12)
    raw_cov = raw.T.double() @ raw.double() / raw.shape[0]
    assert (raw_cov - torch.diag(raw_cov.diagonal())).abs().max() > 0.5  # the input patches were correlated


def test_channels_last_context_restores_the_layout() -> None:
    model = build_model("small", 10)
    conv = model.features[2]
    assert isinstance(conv, nn.Conv2d) and conv.weight.is_contiguous()
    with channels_last(model):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous()
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with channels_last(model):
        pass
    assert not conv.weight.is_contiguous()  # a channels-last model stays so


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


def test_flip_average_averages_image_and_mirror_in_eval_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ModelConfig(flip_average=True).build(10).eval()  # a config passes every model key on
    assert model.spec == ModelSpec("small", 10, 32, flip_average=True)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    averaged = model(x)
    assert torch.allclose(averaged, (model.logits(x) + model.logits(x.flip(3))) / 2, atol=1e-6)
    assert torch.allclose(model(x.flip(3)), averaged, atol=1e-5)  # the classifier is mirror-symmetric
    assert not torch.allclose(model.logits(x), averaged, atol=1e-3)
    averaged.sum().backward()  # attacks differentiate through both passes: the mirror's gradient is the mirror
    mirror = x.detach().flip(3).requires_grad_(True)
    model(mirror).sum().backward()
    assert x.grad is not None and mirror.grad is not None and torch.allclose(mirror.grad, x.grad.flip(3), atol=1e-6)
    grow_head(model, 1)  # the labeler's extra class keeps the averaging, and so does a checkpoint
    save_model(tmp_path / "model.safetensors", model)
    reloaded = load_model(tmp_path / "model.safetensors")
    assert reloaded.spec.flip_average and reloaded.spec.num_classes == 11
    assert torch.allclose(reloaded(x), model(x), atol=1e-6)
    model.train()  # training sees mirrors as augmentation, never averaged
    assert torch.equal(model(x), model.logits(x))


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg61'; choose one of"):
        build_model("vgg61", 10)
