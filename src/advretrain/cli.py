"""The `advretrain` command. Bad input ends with one line, `error: <what> ; <fix>`, and exit status 2."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import click
import torch
import yaml
from pydantic import BaseModel

from . import __version__
from .advset import craft_adversarial_set, load_adversarial_set
from .attacks import ATTACKS, get_attack
from .checkpoint import load_model, train_resumable
from .config import TrainJob, build_config, packaged_configs, parse_overrides, to_yaml_dict
from .data import NAMED, data_root, load_dataset, resolve, to_float
from .data.download import REMOTES, download, md5sum
from .errors import AdvretrainError, printable
from .fooling import noise_images
from .labeler import KNNLabeler, label_report
from .metrics import attack_metrics, evaluate
from .pipeline import load_split, resolve_config, run
from .pipeline.run import require_out
from .report import write_report
from .runtime.device import resolve_device
from .runtime.distributed import init as init_distributed
from .runtime.distributed import is_main, shutdown
from .runtime.io import read_safetensors, save_safetensors, save_state, write_json
from .runtime.rundir import record_config, run_lock
from .tracking import open_tracker
from .train import check_recipe

log = logging.getLogger("advretrain")


def fresh_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="advretrain")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings only.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Does retraining a classifier on adversarial images defend it, and against which attacks?"""
    ctx.obj = {"debug": debug, "quiet": quiet}
    # The root logger passes INFO on (the run log file wants it); the console shows warnings only when quiet.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING if quiet else logging.INFO)


@cli.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (see configs/).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder; rerun with it to resume.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Overrides the config's device.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML) and exit.")
@click.argument("overrides", nargs=-1)
@click.pass_context
def train_cmd(
    ctx: click.Context,
    config_path: str | None,
    out: str | None,
    device: str | None,
    print_config: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train a classifier. OVERRIDES are section.key=value, e.g. train.epochs=5 data.dataset=cifar10."""
    job = build_config(TrainJob, config_path, (*overrides, *([f"device={device}"] if device else [])))
    if print_config:
        click.echo(yaml_text(job), nl=False)
        return
    dev = init_distributed(resolve_device(job.device))  # under torchrun: DDP over the ranks
    require_out(out)
    out_dir = Path(out) if out else fresh_dir("train")
    train_set, test_set = load_split(job.data, "train"), load_split(job.data, "test")
    torch.manual_seed(job.train.seed)
    model = job.model.build(train_set.num_classes, train_set.image_size)
    check_recipe(model, job.train)  # refused before the folder is touched: a refused command writes nothing
    # the run's lock, and a folder trained with another config refused before anything in it is overwritten
    with run_lock(out_dir) if is_main() else contextlib.nullcontext():
        if is_main():
            record_config(out_dir, job)
        log.info(
            "training %s on %s (%d images, %d classes) on %s → %s",
            job.model.name,
            train_set.source,
            len(train_set),
            train_set.num_classes,
            dev,
            out_dir,
        )
        quiet = ctx.obj["quiet"]
        tracker = open_tracker(job.tracking, out_dir)
        try:
            args = (dev, out_dir, test_set, not quiet, job.compile)
            result = train_resumable(model, train_set, job.train, *args, on_record=partial(tracker.epoch, "train"))
            tracker.summary("train", {"test_accuracy": result.test_accuracy or float("nan")})
        finally:
            tracker.close()
    main_rank = is_main()  # asked before the process group is gone
    shutdown()
    if main_rank:
        click.echo(
            f"test accuracy {result.test_accuracy:.4f} ({len(test_set)} images); model: {out_dir / 'model.safetensors'}"
        )


@cli.command("run")
@click.option(
    "--config",
    "config_name",
    default="default",
    show_default=True,
    help="A packaged config (default, cpu-quick, paper-cifar10, paper-tinyimagenet) or a YAML file.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory; rerun with it to resume.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Overrides the config's device.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML) and exit.")
@click.argument("overrides", nargs=-1)
@click.pass_context
def run_cmd(
    ctx: click.Context,
    config_name: str,
    out: str | None,
    device: str | None,
    print_config: bool,
    overrides: tuple[str, ...],
) -> None:
    """The paper's whole protocol: baseline, attacks, labels, retraining, evaluation, Tables 1-7 and figures."""
    every = (*overrides, *([f"device={device}"] if device else []))
    if print_config:
        click.echo(yaml_text(resolve_config(config_name, every)), nl=False)
        return
    require_out(out)
    run_dir = Path(out) if out else fresh_dir("run")
    run(config_name, run_dir, every, not ctx.obj["quiet"])
    main_rank = is_main()  # asked before the process group is gone: after it, every process looks like rank 0
    shutdown()
    if main_rank:
        click.echo(f"run finished: open {run_dir / 'report.html'} (also tables.md, figure_*.png, results.json)")


@cli.command("configs")
def configs_cmd() -> None:
    """The shipped configs, one line each: name and what it is for (`--config NAME` takes them)."""
    for name, path in packaged_configs().items():
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "#")
        click.echo(f"{name:30s} {first.lstrip('# ').strip()}")


def yaml_text(config: BaseModel) -> str:
    return yaml.safe_dump(to_yaml_dict(config), sort_keys=False)


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report_cmd(run_dir: str) -> None:
    """Rebuild the tables and figures of a finished run from its record."""
    if not (Path(run_dir) / "results.json").exists():
        raise AdvretrainError(f"{run_dir} has no results.json: the run has not finished; rerun `advretrain run --out`")
    write_report(Path(run_dir))
    click.echo(f"rebuilt {Path(run_dir) / 'tables.md'} and the figures")


# A checkpoint names its model; one built by a user's own code is loaded only when the user names that code too.
model_option = click.option(
    "--model",
    "builder",
    help="The checkpoint's own model builder (package.module:builder), when it holds a model of your code: "
    "loading it imports and runs that code, so a checkpoint never does it alone.",
)


@cli.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(), help="model.safetensors or a training folder.")
@model_option
@click.option("--data", "dataset", default="cifar10-sample", show_default=True, help="Dataset name or path.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "val"]))
@click.option("--data-root", type=click.Path(file_okay=False), help="Where named datasets lie.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1))
def evaluate_cmd(
    checkpoint: str, builder: str | None, dataset: str, split: str, data_root: str | None, device: str, batch_size: int
) -> None:
    """Top-1 accuracy of a trained model on a dataset split."""
    model = load_model(checkpoint, resolve_device(device), builder)
    data = load_dataset(dataset, split, data_root, model.spec.image_size)
    if data.num_classes > model.spec.num_classes:
        raise AdvretrainError(
            f"{dataset} has {data.num_classes} classes but the model predicts {model.spec.num_classes}; "
            "evaluate on the dataset it was trained for"
        )
    click.echo(
        f"accuracy {evaluate(model, data.images, data.labels, batch_size):.4f} on {len(data)} images of {data.source}"
    )


@cli.command("attack")
@click.option("--checkpoint", required=True, type=click.Path(), help="The attacked model (model.safetensors).")
@model_option
@click.option("--attack", "attack_name", required=True, help=f"One of {', '.join(ATTACKS)}, or package.module:Class.")
@click.option("--data", "dataset", default="cifar10-sample", show_default=True, help="Dataset name or path.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "val"]))
@click.option("--limit", type=click.IntRange(min=1), help="Attack only the first N images of the split.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The adversarial set folder.")
@click.option(
    "--fitted",
    "fitted_file",
    type=click.Path(dir_okay=False),
    help="A fitted attack's state (e.g. GAP's fitted.safetensors) to load instead of fitting.",
)
@click.option("--data-root", type=click.Path(file_okay=False), help="Where named datasets lie.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.argument("params", nargs=-1)
def attack_cmd(
    checkpoint: str,
    builder: str | None,
    attack_name: str,
    dataset: str,
    split: str,
    limit: int | None,
    out: str,
    fitted_file: str | None,
    data_root: str | None,
    device: str,
    params: tuple[str, ...],
) -> None:
    """Craft an adversarial set and print its metrics. PARAMS are attack keywords, e.g. eps=0.03 steps=20."""
    model = load_model(checkpoint, resolve_device(device), builder)
    kwargs = parse_overrides(params)
    spec = get_attack(attack_name)
    attack = spec.build(kwargs, progress=True)
    data = load_dataset(dataset, split, data_root, model.spec.image_size)
    if limit:
        data = data.subset(torch.arange(min(limit, len(data))))
    if spec.fitted and fitted_file:
        state = read_safetensors(fitted_file, f"fitted {attack_name}", "give the fitted.safetensors an attack wrote")
        attack.load_state_dict(*state)
    elif spec.fitted:
        log.info("fitting %s on the training split of %s", attack_name, dataset)
        attack.fit(model, load_dataset(dataset, "train", data_root, model.spec.image_size).images)
        save_state(Path(out) / "fitted.safetensors", attack)
    meta = {"attack": attack_name, "params": kwargs, "data": dataset, "split": split}
    craft_adversarial_set(attack, model, data.images, data.labels, out, meta)
    adv = load_adversarial_set(out)
    clean = to_float(data.images)
    targets = adv.targets if spec.targeted and bool((adv.targets >= 0).all()) else None
    metrics = attack_metrics(model, clean, adv.adversarial, adv.labels, targets)
    write_json(Path(out) / "metrics.json", metrics)
    for key, value in metrics.items():
        click.echo(f"{key:28s} {value:.4f}")


@cli.command("label")
@click.option("--adversarial", required=True, type=click.Path(file_okay=False), help="An adversarial set folder.")
@click.option(
    "--reference",
    default="cifar10-sample",
    show_default=True,
    help="Dataset whose train split is the clean reference set.",
)
@click.option("--pca-dims", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--k", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--fooling-percentile",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    help="Flag images whose PCA residual exceeds this percentile of clean held-out images.",
)
@click.option("--fooling-clusters", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "faiss"]))
@click.option("--data-root", type=click.Path(file_okay=False), help="Where named datasets lie.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Labels (.safetensors); a .json report is written beside it.",
)
def label_cmd(
    adversarial: str,
    reference: str,
    pca_dims: int,
    k: int,
    fooling_percentile: float | None,
    fooling_clusters: int,
    backend: str,
    data_root: str | None,
    device: str,
    out: str,
) -> None:
    """Label an adversarial set by PCA + k-NN against clean references, and report what the accuracy means."""
    adv = load_adversarial_set(adversarial)
    train_set = load_dataset(reference, "train", data_root)
    test_set = load_dataset(reference, "test", data_root)
    labeler = KNNLabeler(
        pca_dims,
        k,
        fooling_percentile,
        fooling_clusters,
        device=resolve_device(device),
        backend=backend,  # type: ignore[arg-type]
    )
    labeler.fit(train_set.images, train_set.labels)
    seen = adv.meta.get("split") == "train" and adv.meta.get("data") == reference  # sources are in the reference
    report = label_report(
        labeler,
        train_source=(adv.adversarial, adv.labels, adv.indices) if seen else None,
        test_source=None if seen else (adv.adversarial, adv.labels),
        clean_test=(test_set.images, test_set.labels),
        fooling=noise_images(1000, tuple(train_set.images.shape[1:])) if fooling_percentile else None,  # type: ignore[arg-type]
    )
    labels = labeler.predict(adv.adversarial)
    save_safetensors(out, {"labels": labels, "indices": adv.indices}, {"reference": reference})
    write_json(Path(out).with_suffix(".json"), report)
    click.echo(
        f"reference: {reference} train split ({len(train_set)} images); adversarial sources "
        f"{'IN the reference set (labels are found by retrieving the source)' if seen else 'unseen'}"
    )
    for key, value in report.items():
        click.echo(f"{key:36s} {value:.4f}")


@cli.command("datasets")
@click.option("--data-root", "root", type=click.Path(file_okay=False), help="Where named datasets lie.")
@click.option(
    "--download",
    "to_download",
    type=click.Choice(sorted(REMOTES)),
    multiple=True,
    help="Download (and verify) a named dataset.",
)
def datasets_cmd(root: str | None, to_download: tuple[str, ...]) -> None:
    """What is found where, verified: image counts, classes and archive checksums."""
    for name in to_download:
        download(REMOTES[name], data_root(root))
    click.echo(f"data root: {data_root(root)}")
    for name in NAMED:
        try:
            path = resolve(name, root, fetch=False)
            train_set, test_set = load_dataset(name, "train", root), load_dataset(name, "test", root)
        except AdvretrainError as exc:
            click.echo(f"  {name:15s} missing: {exc}")
            continue
        remote = REMOTES.get(name)
        check = ""
        if remote and path.name == remote.filename:
            check = ", md5 ok" if md5sum(path) == remote.md5 else ", md5 MISMATCH (download again)"
        click.echo(
            f"  {name:15s} {path}: {len(train_set)} train / {len(test_set)} test, "
            f"{train_set.num_classes} classes, {train_set.image_size}px{check}"
        )


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line like every other error, with where to look
        where = exc.ctx.command_path if exc.ctx else "advretrain"
        click.echo(f"error: {exc.format_message()}; see `{where} --help`", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AdvretrainError as exc:
        if debug:  # the traceback too, and still the status of bad input
            traceback.print_exc()
        click.echo(f"error: {printable(str(exc))}", err=True)  # one line, whatever names the message quotes
        sys.exit(2)
