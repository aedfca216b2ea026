"""Training learns, checkpoints each epoch, and a resumed run ends with exactly the uninterrupted weights."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from advretrain import CheckpointError, ConfigError, ImageDataset, TrainConfig, build_model, load_model, train
from advretrain.checkpoint import train_resumable
from advretrain.config import TrainJob, build_config
from advretrain.metrics import evaluate
from advretrain.train import TrainResult, augment, lr_factor, make_optimizer, mirrors, resize

CPU = torch.device("cpu")
checkpoint_module = importlib.import_module("advretrain.checkpoint")  # where the per-epoch checkpoint is saved


def blobs(n: int = 96, classes: int = 3, seed: int = 0) -> ImageDataset:
    """Separable toy images: each class is a distinct colour plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220]])[:classes]
    base = colours[labels][:, :, None, None].expand(n, 3, 32, 32).float()
    noise = torch.randint(-30, 30, (n, 3, 32, 32), generator=gen).float()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, [f"c{i}" for i in range(classes)], "blobs")


CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, schedule="onecycle", warmup_epochs=0.5, eval_batch_size=64)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_training_learns_a_separable_task(tmp_path: Path, optimizer: str) -> None:
    torch.manual_seed(0)
    data = blobs()
    cfg = CFG.model_copy(update={"optimizer": optimizer})
    result = train_resumable(build_model("small", 3), data, cfg, CPU, tmp_path, test=blobs(seed=1), progress=False)
    assert result.test_accuracy is not None and result.test_accuracy > 0.9
    assert len(result.history) == 3 and result.history[-1]["loss"] < result.history[0]["loss"]
    reloaded = load_model(tmp_path / "model.safetensors")
    assert evaluate(reloaded, data.images, data.labels) == evaluate(result.model, data.images, data.labels)
    assert (tmp_path / "train_state.pt").exists() and (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(("optimizer", "sizes"), [("sgd", []), ("muon", []), ("sgd", [16, 24])])
def test_interrupted_run_resumes_to_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, sizes: list[int]
) -> None:
    data = blobs()
    cfg = CFG.model_copy(update={"optimizer": optimizer, "progressive_sizes": sizes})
    torch.manual_seed(0)
    reference = train_resumable(build_model("small", 3), data, cfg, CPU, tmp_path / "a", progress=False).model

    real_save = checkpoint_module.save_torch
    saves = []

    def crash_after_two(path: Path, obj: object) -> None:
        real_save(path, obj)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies right after epoch 2's checkpoint

    monkeypatch.setattr(checkpoint_module, "save_torch", crash_after_two)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_resumable(build_model("small", 3), data, cfg, CPU, tmp_path / "b", progress=False)
    monkeypatch.setattr(checkpoint_module, "save_torch", real_save)
    torch.manual_seed(123)  # a different init must not matter: the checkpoint's weights are loaded
    resumed = train_resumable(build_model("small", 3), data, cfg, CPU, tmp_path / "b", progress=False)
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 3
    for (name, a), b in zip(reference.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    data = blobs()
    train_resumable(build_model("small", 3), data, CFG.model_copy(update={"epochs": 1}), CPU, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different training job"):
        train_resumable(
            build_model("small", 3), data, CFG.model_copy(update={"lr": 0.1}), CPU, tmp_path, progress=False
        )


def test_checkpoint_config_is_read_through_the_current_schema(tmp_path: Path) -> None:
    """A key added since the checkpoint, at its default, is the same job; a changed value is another."""
    data, cfg = blobs(), CFG.model_copy(update={"epochs": 2})

    def run() -> TrainResult:
        return train_resumable(build_model("small", 3), data, cfg, CPU, tmp_path, progress=False)

    run()
    path = tmp_path / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["progressive_sizes"]  # as written before the key existed
    torch.save(state, path)
    assert run().resumed_from_epoch == 2  # nothing retrained
    state["config"]["label_smoothing"] = 0.1  # a value (or a default) that changed since
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="different training job"):
        run()
    del state["config"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="different training job"):
        run()


def test_augment_is_a_shifted_window_and_a_mirror() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    mirror = torch.tensor([True, False])
    out = augment(images, padding=2, mirror=mirror, gen=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=gen), torch.randint(0, 5, (2,), generator=gen)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        window = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6]
        assert torch.equal(out[i], window.flip(-1) if mirror[i] else window)


def test_alternating_flips_show_both_versions_of_every_image_in_two_epochs() -> None:
    cfg = CFG.model_copy(update={"alternate_flip": True})
    gen = torch.Generator().manual_seed(0)
    first, second, third = (mirrors(cfg, 1000, epoch, gen) for epoch in range(3))
    assert first is not None and second is not None and third is not None
    assert torch.equal(second, ~first) and torch.equal(third, first) and 400 < int(first.sum()) < 600
    random = [mirrors(CFG, 1000, epoch, gen) for epoch in range(2)]
    assert random[0] is not None and random[1] is not None
    assert 400 < int((random[0] == random[1]).sum()) < 600  # random flips agree on about half the images
    assert mirrors(CFG.model_copy(update={"flip": False}), 10, 0, gen) is None


def test_progressive_resizing_trains_the_first_epochs_at_their_sizes() -> None:
    model = build_model("small", 3)
    seen: list[tuple[bool, int, int]] = []  # (training?, height, width) of every forward pass
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, *args[0].shape[-2:])))
    cfg = CFG.model_copy(update={"progressive_sizes": [16, 24]})
    result = train(model, blobs(), cfg, CPU, test=blobs(seed=1), progress=False)
    steps = 96 // CFG.batch_size
    sizes = [(h, w) for training, h, w in seen if training]
    assert sizes == [(16, 16)] * steps + [(24, 24)] * steps + [(32, 32)] * steps
    assert {(h, w) for training, h, w in seen if not training} == {(32, 32)}  # evaluated at the data's size
    assert result.test_accuracy is not None and result.test_accuracy > 0.9


def test_resize_keeps_images_in_range_and_leaves_their_own_size_alone() -> None:
    images = torch.rand(4, 3, 32, 32)
    assert resize(images, None) is images and resize(images, 32) is images
    small = resize(images, 20)
    assert small.shape == (4, 3, 20, 20) and float(small.min()) >= 0 and float(small.max()) <= 1
    flat = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(resize(flat, 17), torch.full((1, 3, 17, 17), 0.25))


def test_progressive_sizes_must_leave_the_last_epoch_at_full_size_and_fit_the_model() -> None:
    with pytest.raises(ConfigError, match=r"train.progressive_sizes: 2 sizes for 2 epochs: the last epoch"):
        build_config(TrainJob, None, ["train.epochs=2", "train.progressive_sizes=[16, 24]"])
    with pytest.raises(ConfigError, match=r"train.progressive_sizes.0: .* greater than or equal to 8 \(got 4\)"):
        build_config(TrainJob, None, ["train.epochs=3", "train.progressive_sizes=[4]"])
    cfg = build_config(TrainJob, None, ["train.epochs=2", "train.progressive_sizes=[16]"]).train
    too_small = r"model vgg16 needs images of at least 32px, got 16px; raise train\.progressive_sizes$"
    with pytest.raises(ConfigError, match=too_small):
        train(build_model("vgg16", 3), blobs(), cfg, CPU, progress=False)


def test_optimizer_skips_frozen_parameters_and_scales_batchnorm_lr() -> None:
    model = build_model("small", 3)
    optimizer = make_optimizer(model, CFG.model_copy(update={"bn_lr_scale": 64.0}))
    weights, norm, biases = optimizer.param_groups
    bn_shifts = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in norm["params"]] == [id(p) for p in bn_shifts]  # BN scales are frozen in `small`
    assert norm["lr"] == 64 * CFG.lr and weights["lr"] == biases["lr"] == CFG.lr
    assert weights["weight_decay"] == CFG.weight_decay and norm["weight_decay"] == biases["weight_decay"] == 0
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_fine_tuning_keeps_the_models_input_statistics() -> None:
    model = build_model("small", 3)
    model.set_normalization([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    train(model, blobs(), CFG.model_copy(update={"epochs": 1}), CPU, progress=False, init=False)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    train(model, blobs(), CFG.model_copy(update={"epochs": 1}), CPU, progress=False)
    assert model.normalize.mean.flatten().tolist() != pytest.approx([0.1, 0.2, 0.3])


def test_no_augmentation_is_identity() -> None:
    images = torch.rand(3, 3, 8, 8)
    assert torch.equal(augment(images, 0, None, torch.Generator()), images)


def test_schedules_warm_up_and_decay_to_zero() -> None:
    cosine, onecycle = lr_factor("cosine", 100, 10), lr_factor("onecycle", 100, 10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(100) == pytest.approx(0.0, abs=1e-9) and onecycle(55) == pytest.approx(0.5)


@pytest.mark.slow  # inductor compiles C++ for a minute or more on a CPU
def test_compiled_training_takes_the_same_steps(tmp_path: Path) -> None:
    one_epoch = CFG.model_copy(update={"epochs": 1})
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        runs.append(train(build_model("small", 3), blobs(), one_epoch, CPU, progress=False, compile=compile))
    eager, compiled = (r.model.state_dict() for r in runs)
    assert list(eager) == list(compiled)  # the compiled wrapper is not part of the saved model
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-4, msg=name)
