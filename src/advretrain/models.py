"""The paper's classifiers, taking [0,1] pixels with the normalisation inside, in a plain name → builder registry.

- `vgg16`: the CIFAR VGG16 with BatchNorm (13 conv layers, 512 → classes head), the paper's CIFAR-10 target.
- `resnet18`: ResNet-18 for 64×64 TinyImageNet (3×3 stem, no max-pool; METHOD.md 1.1); works at 32×32 too.
- `small`: a fast CNN for CPU work (an airbench-style net: conv → max-pool → BN → GELU blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .data import to_float
from .data.limits import MAX_IMAGE_SIDE
from .errors import ConfigError
from .plugins import import_object

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    name: str
    num_classes: int
    image_size: int = 32
    flip_average: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so a checkpoint carries the statistics it was trained with."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalise → features (N×D) → linear head (N×classes). Every registry model has this shape."""

    def __init__(self, spec: ModelSpec, features: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.features = features
        self.head = nn.Linear(feature_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N×3×H×W in [0,1]
        if self.spec.flip_average and not self.training:
            # Test-time augmentation inside the model, so attacks and metrics see the classifier that is reported:
            # the image and its mirror in one 2N batch, their logits averaged (training sees flips as augmentation).
            both = self.logits(torch.cat([x, x.flip(3)]))  # 2N×classes
            return (both[: x.shape[0]] + both[x.shape[0] :]) / 2
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on the image alone (no mirror averaging): N×3×H×W in [0,1] → N×classes."""
        out: torch.Tensor = self.head(self.features(self.normalize(x)))
        return out

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.normalize.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
        self.normalize.std.copy_(torch.tensor(std).view(1, -1, 1, 1))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, sample: int = 5000) -> None:
        """Data-dependent initialisation of a fresh model: the input statistics, then any whitening stem.

        images: N×C×H×W, uint8 or float [0,1]; the first `sample` are enough for the 12×12 patch covariance.
        """
        self.set_normalization(*channel_stats(images))
        x = to_float(images[:sample].to(self.normalize.mean.device))
        for module in self.features.modules():
            if isinstance(module, PatchWhitening):
                module.fit(self.normalize(x))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 or [0,1] N×C×H×W images, in [0,1] units (for the Normalize layer)."""
    flat = to_float(images.transpose(0, 1).reshape(images.shape[1], -1))  # C×(N·H·W)
    return flat.mean(1).tolist(), flat.std(1).tolist()


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out)]


# VGG16's 13 conv layers; "M" is a 2×2 max-pool (Simonyan & Zisserman, config D).
VGG16_LAYERS: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


def vgg16_features() -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    c_in = 3
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(item, int)
            layers += [*conv_bn(c_in, item), nn.ReLU(inplace=True)]
            c_in = item
    # 32×32 ends at 1×1; the pool makes 64×64 (2×2 at the end) and other sizes work with the same 512 → C head.
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(inplace=True), *conv_bn(c_out, c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18_features() -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [
        *conv_bn(3, 64),
        nn.ReLU(inplace=True),
    ]  # 3×3 stem, no max-pool: keeps 64×64 detail
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


class PatchWhitening(nn.Conv2d):
    """k×k conv whose 2·C·k² filters are ± the whitened principal directions of the training patches (airbench).

    The first layer then sees decorrelated inputs from the first step, which is worth about a third of the epochs
    on CIFAR-10 (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds"). Fixed, without a bias (airbench trains one for
    3 epochs): training needs no gradient below the first block then, 1.35x faster on the CPU.
    """

    def __init__(self, channels: int = 3, kernel: int = 2, stride: int = 1) -> None:
        super().__init__(channels, 2 * channels * kernel * kernel, kernel, stride=stride, bias=False)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """x: N×C×H×W normalised training images; the statistics of the patches the filters see (at its stride)."""
        c, k, s = x.shape[1], self.kernel_size[0], self.stride[0]
        patches = x.unfold(2, k, s).unfold(3, k, s)  # N×C×H'×W'×k×k
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()  # (N·H'·W')×(C·k·k), weight order
        eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / flat.shape[0])
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(c * k * k, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).float())


class Scale(nn.Module):
    """Multiplies by a constant."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def small_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    # Identity (dirac) init of the first c_in filters: each block starts close to passing its input through.
    nn.init.dirac_(conv.weight.data[: min(c_in, c_out)])
    return conv


def small_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.weight.requires_grad_(False)  # scale fixed at 1 (airbench): lets the shift train at a high learning rate
    return bn


def small_block(c_in: int, c_out: int) -> list[nn.Module]:
    # Pool right after the first conv (airbench): halves the cost of BN/GELU and of the second conv.
    return [
        small_conv(c_in, c_out),
        nn.MaxPool2d(2),
        small_bn(c_out),
        nn.GELU(),
        small_conv(c_out, c_out),
        small_bn(c_out),
        nn.GELU(),
    ]


def small_features(widths: tuple[int, int, int] = (32, 64, 128), stride: int = 1) -> tuple[nn.Module, int]:
    w1, w2, w3 = widths
    # airbench's stem: a whitening 2×2 conv (32 → 31 px) without BN, cheap at full resolution where CPU time goes.
    # At stride 2 it maps each 2×2 patch once (64 → 32 px): all of the pixels, whitened, at a quarter of the cost.
    stem = PatchWhitening(3, 2, stride)
    layers: list[nn.Module] = [stem, nn.GELU(), *small_block(stem.out_channels, w1), *small_block(w1, w2)]
    # Features scaled by 1/9 (airbench's logit scale): with label smoothing, keeps early logits soft.
    layers += [*small_block(w2, w3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), Scale(1 / 9)]
    return nn.Sequential(*layers), w3


def small64_features() -> tuple[nn.Module, int]:
    """`small` for 64 px images (TinyImageNet on a CPU): a stride-2 whitening stem, twice the width for 200 classes."""
    return small_features((64, 128, 256), stride=2)


MODELS: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "vgg16": vgg16_features,
    "resnet18": resnet18_features,
    "small": small_features,
    "small64": small64_features,
}
# The smallest input each keeps at least 1×1 after its poolings (vgg16: five halvings; small: 2×2 stem, three;
# small64: a stride-2 stem, three).
MIN_IMAGE_SIZE = {"vgg16": 32, "resnet18": 8, "small": 16, "small64": 16}


class ImportedClassifier(Classifier):
    """A user's network, built by `package.module:builder(num_classes=, image_size=)`, behind the same interface.

    The network maps [0,1] N×C×H×W images to logits and owns its normalisation, so nothing is fitted from data.
    """

    def __init__(self, spec: ModelSpec, net: nn.Module) -> None:
        nn.Module.__init__(self)  # no registry normalise → features → head: the network is whole
        self.spec = spec
        self.net = net

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def init_from_data(self, images: torch.Tensor, sample: int = 5000) -> None:
        """Nothing to fit: the user's network normalises its inputs itself."""


def imported_model(spec: ModelSpec) -> ImportedClassifier:
    """Call the builder named by `spec.name`; refuse, in one line, one that fails or returns no fitting network."""
    builder = import_object(spec.name, "model")
    try:
        net = builder(num_classes=spec.num_classes, image_size=spec.image_size)
    except Exception as exc:  # a user's builder may fail in any way
        raise ConfigError(f"model builder {spec.name} failed: {type(exc).__name__}: {exc}; fix the builder") from exc
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model builder {spec.name} returned a {type(net).__name__}, not a torch nn.Module; fix it")
    probe = torch.rand(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    try:
        with torch.no_grad():
            shape = tuple(net.eval()(probe).shape)
    except Exception as exc:
        raise ConfigError(
            f"model {spec.name} cannot take 2×3×{spec.image_size}×{spec.image_size} images in [0,1] "
            f"({type(exc).__name__}: {exc}); fix the builder"
        ) from exc
    finally:
        net.train(was_training)
    if shape != (2, spec.num_classes):
        raise ConfigError(f"model {spec.name} maps 2 images to {shape}, not (2, {spec.num_classes}) logits; fix it")
    return ImportedClassifier(spec, net)


@contextlib.contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """The model's conv weights in channels-last layout inside the block, its own layout restored after.

    Channels-last convolutions are faster on CPUs (oneDNN: a small-CNN training step 1.4x) and on GPUs. Attacks and
    metrics all run the model in this one layout, so their predictions agree to the last bit.
    """
    contiguous = [p.is_contiguous() for p in model.parameters() if p.ndim == 4]
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield model
    finally:
        if contiguous and all(contiguous):
            model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


# Bounds on the numbers that size a model (a checkpoint's metadata holds them): far above any real dataset
# (ImageNet-21k: 21,841 classes), far below what would exhaust memory before the model is even built.
MAX_CLASSES = 100_000


def require_image_size(name: str, image_size: int, fix: str) -> None:
    """Refuse images too small for model `name`'s poolings, with `fix` telling how to change them."""
    smallest = MIN_IMAGE_SIZE.get(name, 1)  # an imported model's builder is asked for the size instead
    if image_size < smallest:
        raise ConfigError(f"model {name} needs images of at least {smallest}px, got {image_size}px; {fix}")


def build_model(name: str, num_classes: int, image_size: int = 32, flip_average: bool = False) -> Classifier:
    """A registry model mapping float [0,1] N×3×image_size×image_size to N×num_classes logits.

    `flip_average` makes the model, in eval mode, average its logits on each image and its mirror image.

    Example:
        >>> model = build_model("small", num_classes=10)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if name not in MODELS and ":" not in name:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} or package.module:builder"
        )
    if not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"model {name}: {num_classes!r} classes; a classifier has 1..{MAX_CLASSES:,}")
    if not isinstance(image_size, int) or image_size > MAX_IMAGE_SIDE:
        raise ConfigError(f"model {name}: image size {image_size!r}; give whole pixels up to {MAX_IMAGE_SIDE}")
    require_image_size(name, image_size, "set data.image_size to resize them")
    if name not in MODELS:
        return imported_model(ModelSpec(name, num_classes, image_size, flip_average))
    features, dim = MODELS[name]()
    return Classifier(ModelSpec(name, num_classes, image_size, flip_average), features, dim)


def head_of(model: Classifier) -> tuple[nn.Module, str, nn.Linear]:
    """The classifier's head: the last linear layer with one output per class, with its parent and attribute."""
    heads = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == model.spec.num_classes
    ]
    if not heads:
        raise ConfigError(f"model {model.spec.name} has no linear layer with one output per class to grow")
    path, head = heads[-1]
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path), attr, head


def grow_head(model: Classifier, extra_classes: int) -> Classifier:
    """Add `extra_classes` outputs to the head (e.g. fooling-image classes), keeping the old classes' weights."""
    parent, attr, old = head_of(model)
    new = nn.Linear(old.in_features, old.out_features + extra_classes, bias=old.bias is not None)
    new = new.to(old.weight.device)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None and new.bias is not None:
            new.bias[: old.out_features] = old.bias
    setattr(parent, attr, new)
    model.spec = replace(model.spec, num_classes=new.out_features)
    return model
