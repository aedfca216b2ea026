"""The command line: train → evaluate round trip, resolved config saved, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_image_folder

from advretrain.cli import cli
from advretrain.config import TrainJob, build_config
from advretrain.errors import ConfigError


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "advretrain", *args], capture_output=True, text=True, timeout=300)


def test_train_then_evaluate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image_folder(data, per_class=8, size=32)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "train",
            "--out",
            str(out),
            "--device",
            "cpu",
            f"data.dataset={data}",
            "train.epochs=1",
            "train.batch_size=8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["data"]["dataset"] == str(data) and saved["device"] == "cpu"
    expected = (f"data.dataset={data}", "train.epochs=1", "train.batch_size=8", "device=cpu")
    assert build_config(TrainJob, out / "config.yaml") == build_config(TrainJob, None, expected)
    evaluated = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(out), "--data", str(data)])
    assert evaluated.exit_code == 0 and "accuracy" in evaluated.output and "on 24 images" in evaluated.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        (["train", "train.lr=-1"], "config train.lr: Input should be greater than 0"),
        (["train", "trian.lr=1"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["train", "data.dataset=/no/such/place"], "dataset '/no/such/place' not found"),
        (["evaluate", "--checkpoint", "/no/model.safetensors"], "checkpoint /no/model.safetensors does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]  # one line, no traceback
    assert message in proc.stderr


def test_debug_shows_the_traceback() -> None:
    proc = run_cli("--debug", "train", "train.epoch=3")
    assert proc.returncode == 2 and "Traceback" in proc.stderr  # still the status of bad input
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'train.epoch'")


def test_datasets_lists_what_is_found() -> None:
    proc = run_cli("datasets")
    assert proc.returncode == 0
    assert "cifar10-sample" in proc.stdout and "5000 train / 1000 test, 10 classes, 32px" in proc.stdout
    assert "cifar10         missing" in proc.stdout


def test_config_file_and_overrides_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.1\nmodel:\n  name: vgg16\n")
    job = build_config(TrainJob, path, ["train.lr=0.2"])
    assert (job.train.epochs, job.train.lr, job.model.name, job.train.momentum) == (7, 0.2, "vgg16", 0.9)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(TrainJob, path)
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        build_config(TrainJob, None, ["train.epochs"])


def test_a_recorded_config_without_a_newer_key_still_matches(tmp_path: Path) -> None:
    from advretrain.config import ExperimentConfig
    from advretrain.runtime.rundir import record_config

    cfg = build_config(ExperimentConfig, "default")
    old = cfg.model_dump(mode="json")
    del old["compile"]  # as written by a version before the key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    record_config(tmp_path, cfg)  # accepted: the missing key takes its default
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["compile"] is False


def test_configs_lists_every_shipped_config_in_one_line_each() -> None:
    proc = run_cli("configs")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    shipped = Path(__file__).parents[1] / "src" / "advretrain" / "configs"
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in shipped.glob("*.yaml"))
    assert any(line.startswith("cpu-quick") and "2-core CPU" in line for line in lines)


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path: Path) -> None:
    import yaml

    proc = run_cli("run", "--print-config", "--config", "cpu-quick", "train.epochs=3", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["epochs"] == 3 and printed["data"]["train_per_class"] == 800
    assert printed["threats"]["query"] == ["square"] and not (tmp_path / "r").exists()
    proc = run_cli("train", "--print-config", "train.lr=0.1")
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["train"]["lr"] == 0.1


def test_tensorboard_tracking_logs_every_epoch_as_metrics_json_has_it(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, per_class=8, size=32)
    out = tmp_path / "out"
    args = ["-q", "train", "--device", "cpu", "--out", str(out), f"data.dataset={data}", "train.epochs=2"]
    proc = run_cli(*args, "train.batch_size=8", "tracking=tensorboard")
    assert proc.returncode == 0, proc.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    for key in ("loss", "train_accuracy", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history], key
    assert [e.value for e in events.Scalars("summary/test_accuracy")] == [
        pytest.approx(json.loads((out / "metrics.json").read_text())["test_accuracy"], rel=1e-6)
    ]


def test_tracking_without_its_library_is_one_line_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advretrain.errors import ConfigError
    from advretrain.tracking import open_tracker

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"pip install 'advretrain\[tracking\]'"):
        open_tracker("tensorboard", tmp_path)
