"""What a user adds without touching advretrain: an attack (registered, or named by an import path) and a model
(an import-path builder) run through the whole protocol, into the tables, and back from their checkpoints."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_run import TINY, finish
from tiny_run import advretrain as advretrain_cli
from torch import nn

import advretrain
from advretrain.attacks import ATTACKS, AttackResult, AttackSpec, check_inputs, register_attack
from advretrain.errors import ConfigError
from advretrain.models import build_model

ONE_N = ["retrain.sizes={random_signs: [20], fgsm: [20]}"]


class RandomSigns:
    """Random signs in an L-inf ball: x + eps · s, s uniform in {-1, +1}, clipped to [0,1] (a query-free baseline)."""

    def __init__(self, *, eps: float = 8 / 255, seed: int = 0) -> None:
        self.eps, self.seed = eps, seed

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        check_inputs(images, labels)
        gen = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, images.shape, generator=gen).to(images) * 2 - 1  # N×C×H×W in {-1, +1}
        adversarial = (images + self.eps * signs).clamp(0, 1)
        with torch.no_grad():
            success = model(adversarial).argmax(1) != model(images).argmax(1)
        return AttackResult(adversarial, success)


def tiny_net(num_classes: int, image_size: int) -> nn.Module:
    """A user's own classifier: its own normalisation, [0,1] N×3×H×W images in, logits out."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def not_a_model(num_classes: int, image_size: int) -> str:
    return "a string"


def paper_columns(tables: str, title: str) -> list[str]:
    """The last column (the paper's figures) of every row of the table under `title`."""
    section = tables.split(title)[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Adv.")]
    return [row.strip("| ").split(" | ")[-1] for row in rows]


@pytest.fixture
def random_signs() -> Iterator[AttackSpec]:
    spec = register_attack("random_signs", RandomSigns, title="Random signs (L-inf 8/255)", threat="query")
    yield spec
    del ATTACKS["random_signs"]


def test_a_registered_attack_runs_through_the_protocol_into_the_tables(
    random_signs: AttackSpec, tmp_path: Path
) -> None:
    results = advretrain.run("default", tmp_path / "r", [*TINY, "attacks=[random_signs, fgsm]", *ONE_N])
    assert list(results.attacks) == ["random_signs", "fgsm"]
    ours = results.attacks["random_signs"]
    assert ours.threat == "query" and ours.params == {"eps": 8 / 255, "seed": 0}
    assert 0 <= ours.initial["fooling_ratio"] <= 1 and ours.retrain[0].n == 20
    assert not ours.initial["linf_median"] > 8 / 255 + 1e-6  # NaN when nothing was fooled
    tables = (tmp_path / "r" / "tables.md").read_text()
    assert "## Table —: Random signs (L-inf 8/255)" in tables and "## Table 5: FGSM" in tables
    assert paper_columns(tables, "Random signs (L-inf 8/255)") == ["—"]
    assert "Initial FR against f0:" in tables.split("Random signs")[1] and "(paper —;" in tables
    with open(tmp_path / "r" / "tables.csv") as fh:
        cells = [row for row in csv.reader(fh) if row[1] == "random_signs"]
    assert cells and all(row[0] in ("—", "7") for row in cells)
    assert ["—", "random_signs", "20", "paper: acc. orig / acc. adv / FR", "—"] in cells
    assert (tmp_path / "r" / "figure_random_signs.png").read_bytes()[:4] == b"\x89PNG"


def test_an_attack_named_by_import_path_runs_from_the_cli(tmp_path: Path) -> None:
    path = "test_extensions:RandomSigns"
    args = [*TINY, f"attacks=[{path}]", f"retrain.sizes={{{path}: [20]}}", f"attack={{{path}: {{eps: 0.02}}}}"]
    finish(advretrain_cli("run", "--out", str(tmp_path / "r"), *args))
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    ours = results["attacks"][path]
    assert ours["params"] == {"eps": 0.02, "seed": 0} and ours["threat"] == "white-box"
    tables = (tmp_path / "r" / "tables.md").read_text()
    assert "## Table —: Random signs in an L-inf ball: x + eps · s, s uniform in {-1, +1}, clipped to [0,1]" in tables
    assert (tmp_path / "r" / "figure_test_extensions_RandomSigns.png").exists()


def test_an_unknown_attack_keyword_fails_before_any_work(tmp_path: Path) -> None:
    proc = advretrain_cli("run", "--out", str(tmp_path / "r"), *TINY, "attack.fgsm.epsilon=0.1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "attack fgsm: unknown keyword 'epsilon'; its keywords are eps, batch_size" in err
    assert not (tmp_path / "r" / "stages").exists()


def test_a_model_builder_by_import_path_is_trained_attacked_retrained_and_reloaded(tmp_path: Path) -> None:
    results = advretrain.run(
        "default",
        tmp_path / "r",
        [*TINY, "attacks=[fgsm]", "retrain.sizes={fgsm: [20]}", "model.name=test_extensions:tiny_net"],
    )
    assert results.model == "test_extensions:tiny_net" and 0 <= results.attacks["fgsm"].retrain[0].clean_accuracy <= 1
    retrained = next((tmp_path / "r" / "stages").glob("retrain-fgsm-N20-*"))
    model = advretrain.load_model(retrained, builder="test_extensions:tiny_net")  # the user names their code
    assert model.spec.name == "test_extensions:tiny_net" and isinstance(model.net, nn.Sequential)
    images = torch.rand(4, 3, 32, 32)
    assert model(images).shape == (4, 10)
    # the reloaded model is the retrained one: its predictions on the test images match the recorded accuracy
    test = advretrain.load_dataset("cifar10-sample", "test")
    row = results.attacks["fgsm"].retrain[0]
    assert row.clean_accuracy == pytest.approx(
        advretrain.evaluate(model, *evaluation_images(test, results.test_images)), abs=1e-9
    )


def test_a_builder_that_returns_no_network_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError, match="model builder test_extensions:not_a_model returned a str, not a torch"):
        build_model("test_extensions:not_a_model", 10)
    with pytest.raises(
        ConfigError, match=r"model test_extensions:ten_outputs maps 2 images to \(2, 10\), not \(2, 3\)"
    ):
        build_model("test_extensions:ten_outputs", 3)
    with pytest.raises(ConfigError, match="model 'test_extensions:missing': test_extensions has no missing"):
        build_model("test_extensions:missing", 3)


def ten_outputs(num_classes: int, image_size: int) -> nn.Module:
    return tiny_net(10, image_size)


def evaluation_images(test: advretrain.ImageDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's evaluation subset (seeded, as the protocol draws it)."""
    from advretrain.config import ExperimentConfig
    from advretrain.pipeline.protocol import evaluation_subset

    subset = evaluation_subset(ExperimentConfig(test_images=n), test)
    return subset.images, subset.labels


def test_a_trained_model_is_used_as_f0_without_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from advretrain.metrics import evaluate
    from advretrain.pipeline import load_split, resolve_config

    cheap = [*TINY, "attacks=[fgsm]", "retrain.sizes={fgsm: [20]}", "threats.query=[]", "threats.transfer=[]"]
    cfg = resolve_config("default", cheap)
    train_set, test_set = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    torch.manual_seed(5)
    mine = cfg.model.build(train_set.num_classes, train_set.image_size).eval()
    state_file = tmp_path / "mine.pt"
    torch.save(mine.state_dict(), state_file)  # a plain state_dict, as a training script saves it
    expected = evaluate(mine, test_set.images, test_set.labels)
    caplog.set_level(logging.INFO, logger="advretrain")
    results = advretrain.run("default", tmp_path / "r", [*cheap, f"model.checkpoint={state_file}"])
    assert results.baseline_accuracy == expected
    f0_folder = next((tmp_path / "r" / "stages").glob("baseline-*"))
    assert not (f0_folder / "train_state.pt").exists()  # nothing was trained
    assert "(not trained here)" in caplog.text
    f0 = advretrain.load_model(f0_folder)
    assert all(torch.equal(a, b) for a, b in zip(f0.state_dict().values(), mine.state_dict().values(), strict=True))
    # a model trained by `advretrain train`, given by its folder
    trained = tmp_path / "trained"
    recipe = [f"data.dataset={cfg.data.dataset}", "data.train_per_class=20", "train.epochs=1", "train.batch_size=32"]
    finish(advretrain_cli("train", "--device", "cpu", "--out", str(trained), *recipe))
    again = advretrain.run("default", tmp_path / "r2", [*cheap, f"model.checkpoint={trained}"])
    by_train = advretrain.load_model(trained)
    assert again.baseline_accuracy == evaluate(by_train, test_set.images, test_set.labels)
    assert again.baseline_accuracy == json.loads((trained / "metrics.json").read_text())["test_accuracy"]


def test_a_checkpoint_of_another_architecture_names_the_first_key(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    other(torch.rand(1, 3, 32, 32))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    proc = advretrain_cli("run", "--out", str(tmp_path / "r"), *TINY, f"model.checkpoint={tmp_path / 'other.pt'}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "other.pt: does not fit a small with 10 classes (missing key" in err and "Traceback" not in err
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04not a state dict")
    proc = advretrain_cli("run", "--out", str(tmp_path / "r2"), *TINY, f"model.checkpoint={tmp_path / 'evil.pt'}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "loads with weights_only=True" in err, err
