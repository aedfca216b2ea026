"""Every hyperparameter in one typed place, with the paper's default (or ours) and a one-line reason.

Configs are frozen pydantic models: a YAML file and `section.key=value` overrides set them; an unknown key or an
out-of-range value is a one-line error that names it (with a "did you mean" for typos).
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .data.limits import MAX_IMAGE_SIDE
from .errors import AdvretrainError, ConfigError
from .runtime.io import parse_yaml, read_text_file

if TYPE_CHECKING:
    from .models import Classifier

Device = Literal["auto", "cpu", "cuda"]
Tracking = Literal["none", "tensorboard"]  # advretrain.tracking


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(Frozen):
    dataset: str = Field("cifar10-sample", description="cifar10 | tinyimagenet | cifar10-sample | a path")
    root: str | None = Field(None, description="where named datasets lie or are downloaded to")
    image_size: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIDE, description="resize every image to this size; None: keep, all equal"
    )
    train_per_class: int | None = Field(None, ge=1, description="stratified subset of the training split")
    test_per_class: int | None = Field(None, ge=1, description="stratified subset of the test split")


def _known_model(name: str) -> str:
    from .models import MODELS  # models import nothing from here; the registry is the one truth

    if ":" in name:  # a user's builder: it must at least import (it is called, and checked, when built)
        from .plugins import import_object

        try:
            import_object(name, "model")
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return name
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model{hint}; choose one of {', '.join(sorted(MODELS))}")
    return name


class ModelConfig(Frozen):
    name: str = Field(
        "small", description="a key of advretrain.models.MODELS, or an import path package.module:builder"
    )
    flip_average: bool = Field(
        False, description="average the logits of each image and its mirror at inference (2 passes per image)"
    )
    checkpoint: str | None = Field(
        None,
        description="a trained model used as f0 instead of training one: a model written by `advretrain train`, "
        "or a safetensors or PyTorch state_dict of this architecture",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_model(name)

    def build(self, num_classes: int, image_size: int = 32) -> Classifier:
        """The model this section describes, every key passed on: the one place a config becomes a model."""
        from .models import build_model

        return build_model(self.name, num_classes, image_size, self.flip_average)


class AdversarialTraining(Frozen):
    """Adversarial training, the field's standard defence (METHOD.md 5 item 13): every batch replaced by adversarials
    of the model being trained. The reference the retraining defence is compared with."""

    # Wong et al. 2020 (FGSM from a uniform random start, step 1.25 eps): one extra gradient per batch, the CPU choice;
    # Madry et al. 2018 (PGD from a random start, 7 steps of eps/4 on CIFAR-10): the paper profiles' choice.
    method: Literal["fgsm-rs", "pgd"] = Field("fgsm-rs", description="fgsm-rs (Wong et al. 2020) or pgd (Madry 2018)")
    eps: float = Field(8 / 255, gt=0, le=1, description="L-inf budget in [0,1] pixels (CIFAR-10's standard 8/255)")
    step_size: float | None = Field(None, gt=0, description="None: 1.25 eps for fgsm-rs, eps/4 for pgd")
    steps: int = Field(7, ge=1, description="PGD steps per batch (fgsm-rs takes one)")

    @property
    def alpha(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return 1.25 * self.eps if self.method == "fgsm-rs" else self.eps / 4


class ReferenceDefence(AdversarialTraining):
    """The reference defence of the `reference-defence` experiment: the config's model and recipe adversarially
    trained from scratch, or — where that costs too much — f0 adversarially fine-tuned (Jeddi et al. 2020)."""

    finetune_epochs: int | None = Field(
        None, ge=1, description="None: trained from scratch; k: f0 fine-tuned k epochs (at retrain.finetune_lr)"
    )

    def training(self) -> AdversarialTraining:
        """What each training batch is replaced by."""
        return AdversarialTraining(**self.model_dump(exclude={"finetune_epochs"}))


class TrainConfig(Frozen):
    # METHOD.md 1.1 (VGG16 on CIFAR-10): SGD, momentum 0.9, wd 5e-4, batch 128, lr 0.05, cosine, ~100 epochs.
    epochs: int = Field(100, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=2, description="images per SGD step (BatchNorm needs two at least)")
    lr: float = Field(0.05, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    optimizer: Literal["sgd", "muon"] = Field("sgd", description="SGD, or Muon for conv filters and SGD for the rest")
    muon_lr: float = Field(0.12, gt=0, description="Muon's lr: the angle a filter bank turns per step at the peak")
    muon_momentum: float = Field(0.6, ge=0, lt=1, description="Muon's momentum (airbench94_muon: 0.6)")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty, not applied to BN and biases")
    schedule: Literal["cosine", "onecycle"] = Field("cosine", description="cosine decay, or linear up then down")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length (epochs)")
    bn_lr_scale: float = Field(1.0, gt=0, description="lr multiplier for BatchNorm parameters (airbench: 64)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    crop_padding: int = Field(4, ge=0, description="random-crop padding in pixels (0: no crop)")
    flip: bool = Field(True, description="random horizontal flips")
    alternate_flip: bool = Field(False, description="flip each image in every other epoch instead (airbench)")
    seed: int = Field(0, description="seeds initialisation, order and augmentation")
    eval_batch_size: int = Field(1024, ge=1, description="images per forward pass when evaluating")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    # oneDNN's bf16 convolutions on a CPU with AVX-512-BF16 or AMX: a small64 step at 64 px 1.8x, at 32 px 1.4x
    # (measured on this project's host); elsewhere bf16 is emulated, slower than float32, so it is skipped there.
    amp_cpu: bool = Field(False, description="bf16 autocast on CPUs with native bf16 too (training only)")
    channels_last: bool = Field(True, description="channels-last memory format (faster convs on CUDA and CPU)")
    # Progressive resizing (fast.ai's DAWNBench runs; EfficientNetV2): early epochs learn coarse features as well
    # from smaller, cheaper images; the last ones at full size fit the test images' scale and BatchNorm statistics.
    progressive_sizes: list[Annotated[int, Field(ge=8)]] = Field(
        default_factory=list, description="px of the first epochs' images, one per epoch; the rest: the data's size"
    )
    adversarial: AdversarialTraining | None = Field(None, description="train on adversarial batches (None: clean)")

    @field_validator("progressive_sizes")
    @classmethod
    def _before_the_last_epoch(cls, sizes: list[int], info: ValidationInfo) -> list[int]:
        epochs = info.data.get("epochs")
        if epochs is not None and len(sizes) >= epochs:
            raise ValueError(f"{len(sizes)} sizes for {epochs} epochs: the last epoch must train at the data's size")
        return sizes

    def finetuning(self, epochs: int, lr_share: float) -> TrainConfig:
        """This recipe as a fine-tuning of a trained model: `epochs` at the data's size (no progressive resizing),
        no warm-up, from `lr_share` of the peak learning rates (SGD's and Muon's) down on the same schedule."""
        return self.model_copy(
            update={
                "epochs": epochs,
                "progressive_sizes": [],
                "warmup_epochs": 0.0,
                "lr": self.lr * lr_share,
                "muon_lr": self.muon_lr * lr_share,
            }
        )

    def updated(self, changes: dict[str, Any], where: str) -> TrainConfig:
        """This recipe with some keys changed (a surrogate's budget, say), validated; an error names `where`."""
        try:
            return TrainConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}.{key}: {str(err['msg']).removeprefix('Value error, ')}") from exc


class TrainJob(Frozen):
    """`advretrain train`: one classifier on one dataset."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    device: Device = "auto"
    compile: bool = Field(False, description="torch.compile the training step (GPUs: faster after a warm-up)")
    tracking: Tracking = Field("none", description="log curves and results: none, or tensorboard (an extra)")

    @model_validator(mode="after")
    def _trains_from_scratch(self) -> TrainJob:
        if self.model.checkpoint is not None:
            raise ValueError("model.checkpoint gives `advretrain run` its f0; `train` trains from scratch, remove it")
        return self


def _paper_attacks() -> tuple[str, ...]:
    from .attacks import PAPER_ATTACKS

    return PAPER_ATTACKS


def _known_attack(name: str) -> str:
    from .attacks import AttackError, get_attack  # the registry is the one list of attacks

    try:
        get_attack(name)
    except AttackError as exc:
        raise ValueError(str(exc)) from exc
    return name


AttackSettings = dict[str, dict[str, Any]]


def _validate_attack_settings(settings: AttackSettings) -> AttackSettings:
    """Each attack's keywords checked against its spec's typed settings; kept as given (defaults stay in the class)."""
    from .attacks import AttackError, get_attack

    out = {}
    for name, values in settings.items():
        try:
            spec = get_attack(name)
            spec.build(values)  # the constructor's own range checks (eps >= 0, ...) fail here, before any work
            out[name] = spec.configure(values).model_dump(mode="json", exclude_unset=True)
        except AttackError as exc:
            raise ValueError(str(exc)) from exc
    return out


class RetrainConfig(Frozen):
    # METHOD.md 1.2: N for GAP and FGSM, N = the training-set size for DeepFool and C&W (CIFAR-10 values).
    # METHOD.md 1.2: each attack's default N is in its spec (the paper's CIFAR-10 values; else the training set).
    sizes: dict[str, list[int]] = Field(
        default_factory=dict, description="adversarial training images added, per attack (default: the attack's)"
    )
    mode: Literal["scratch", "finetune"] = Field("scratch", description="retrain from scratch (paper) or fine-tune f0")

    @field_validator("sizes")
    @classmethod
    def _sizes_of_known_attacks(cls, sizes: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, values in sizes.items():
            _known_attack(name)
            if not values:  # not "the default": that could silently mean four retrainings on the full training set
                raise ValueError(f"{name}: no N given; list at least one N, or remove {name} from attacks to skip it")
        return sizes

    finetune_epochs: int = Field(5, ge=1, description="epochs when fine-tuning")
    # A fine-tuning starts from a trained model: the recipe's peak rate would first undo much of what it learned.
    finetune_lr: float = Field(
        0.1, gt=0, le=1, description="a fine-tuning's peak learning rate: this share of the recipe's"
    )
    labels: Literal["oracle", "knn"] = Field("oracle", description="labels of adversarial training images")
    # Not in the paper (METHOD.md 5): does the defence hold when the attacker answers the retrained model?
    rounds: int = Field(1, ge=1, description="arms race: attack → retrain repeated; rounds after the first: largest N")


class LabelerConfig(Frozen):
    pca_dims: int = Field(300, ge=1, description="paper: 300 for CIFAR-10, 2000 for TinyImageNet")
    k: int = Field(1, ge=1, description="neighbours that vote (paper: 1)")
    fooling_percentile: float | None = Field(99.9, gt=0, lt=100, description="flag threshold percentile")
    backend: Literal["torch", "faiss"] = Field("torch", description="exact k-NN: chunked torch, or faiss (extra)")


def _query_attack(name: str) -> str:
    from .attacks import get_attack

    if get_attack(_known_attack(name)).threat != "query":
        raise ValueError(f"{name} is not a query-only attack; list it under threats.transfer or attacks instead")
    return name


def _white_box_attack(name: str) -> str:
    from .attacks import get_attack

    spec = get_attack(_known_attack(name))
    if spec.fitted:
        raise ValueError(
            f"{name} is fitted to each model (the protocol refits it as its adaptive column); list another"
        )
    return name


class ThreatConfig(Frozen):
    """Not in the paper (METHOD.md 2.6, 2.7, 2.8, 5 items 9 and 14): how f0 and every retrained f1 fare against the
    field's standard white-box evaluation (AutoAttack) and attackers without their gradients.

    Query and transfer attacks run at their own budget and at each of `budgets`; white-box evaluations at their own
    (the field's standard). Empty lists switch the threat-model table off.
    """

    white_box: list[Annotated[str, AfterValidator(_white_box_attack)]] = Field(
        default_factory=lambda: ["autoattack"],
        description="white-box evaluations run against each model (AutoAttack: the field's standard, Croce & Hein)",
    )

    query: list[Annotated[str, AfterValidator(_query_attack)]] = Field(
        default_factory=lambda: ["square"], description="query-only attacks, run against each model's outputs"
    )
    transfer: list[Annotated[str, AfterValidator(_known_attack)]] = Field(
        default_factory=lambda: ["pgd", "fgsm"], description="attacks crafted on the surrogate, submitted to each model"
    )
    # The paper's GAP (10/255) and FGSM (0.07) budgets, so that one budget compares black-box with white-box.
    budgets: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [10 / 255, 0.07], description="extra L-inf budgets for every attack with an eps"
    )
    surrogate_model: str | None = Field(None, description="the surrogate's model (None: the config's model)")
    surrogate_seed: int | None = Field(None, description="the surrogate's training seed (None: train.seed + 1)")
    surrogate_train: dict[str, Any] = Field(
        default_factory=dict, description="keys of `train` the attacker's recipe changes (its budget), e.g. {epochs: 4}"
    )

    @field_validator("surrogate_train")
    @classmethod
    def _no_seed(cls, changes: dict[str, Any]) -> dict[str, Any]:
        if "seed" in changes:
            raise ValueError("the surrogate's seed is threats.surrogate_seed; remove seed from surrogate_train")
        return changes

    @field_validator("surrogate_model")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        return None if name is None else _known_model(name)

    @property
    def enabled(self) -> bool:
        return bool(self.white_box or self.query or self.transfer)


# The evaluation the paper omits (METHOD.md 2.5, 5 items 3, 7, 10-13), each switched on by its name in `experiments`.
Experiment = Literal["fooling-classes", "pca-sweep", "cross-attack", "robustness-curves", "reference-defence"]
EXPERIMENTS: tuple[Experiment, ...] = typing.get_args(Experiment)


class FoolingConfig(Frozen):
    """METHOD.md 2.5: fooling images against f0, the labeler's new class(es) for them, f1 retrained with them."""

    per_class: int = Field(20, ge=2, description="fooling images per original class (half train f1, half held out)")
    classes: int = Field(1, ge=1, description="new classes the flagged ones form (k-means; the paper: one or more)")
    steps: int = Field(200, ge=1, description="gradient-ascent steps at most per image (each leaves once confident)")
    step_size: float = Field(1 / 255, gt=0, le=1, description="signed-gradient step (one 8-bit level)")
    confidence: float = Field(0.99, gt=0, lt=1, description="softmax an image must reach (Nguyen et al.: 99%)")


class SweepConfig(Frozen):
    """The labeler's PCA trade-off (METHOD.md 3): the paper picks 300 / 2,000 dimensions without showing it."""

    pca_dims: list[int | Literal["full"]] = Field(
        default_factory=lambda: [10, 30, 100, 300, 1000, "full"],  # type: ignore[arg-type]
        description="dimensions; full: the pixel space",
    )

    @field_validator("pca_dims", mode="before")
    @classmethod
    def _sizes(cls, sizes: Any) -> Any:
        for size in sizes if isinstance(sizes, list) else []:
            if size != "full" and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"{size!r} is not a PCA size; give whole numbers >= 1 or 'full' (the pixel space)")
        return sizes

    k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 3], description="neighbours that vote")


class CurvesConfig(Frozen):
    eps: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1.0], description="L2 budgets of the robustness-curve table"
    )


class ExperimentConfig(Frozen):
    """`advretrain run`: the paper's protocol (METHOD.md 1.2) on one dataset and model."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    attacks: list[Annotated[str, AfterValidator(_known_attack)]] = Field(
        default_factory=lambda: list(_paper_attacks()),
        description="registered attack names (advretrain.attacks.ATTACKS) or import paths package.module:Class",
    )
    attack: AttackSettings = Field(
        default_factory=dict, description="keywords per attack, e.g. {fgsm: {eps: 0.03}}; the rest: the attack's own"
    )
    retrain: RetrainConfig = RetrainConfig()
    labeler: LabelerConfig = LabelerConfig()
    threats: ThreatConfig = ThreatConfig()
    experiments: list[Experiment] = Field(
        default_factory=lambda: list(EXPERIMENTS), description="the evaluations beyond the paper's tables to run"
    )
    fooling: FoolingConfig = FoolingConfig()
    sweep: SweepConfig = SweepConfig()
    curves: CurvesConfig = CurvesConfig()
    # The CPU profiles' choice; paper profiles: method pgd
    defence: ReferenceDefence = Field(ReferenceDefence(), description="the reference defence's training")
    test_images: int | None = Field(None, ge=1, description="test images attacked (None: the whole test split)")
    pgd_eval: bool = Field(True, description="also report each retrained model's PGD accuracy")
    figure_images: int = Field(8, ge=1, description="images per original-vs-adversarial figure")
    device: Device = "auto"
    compile: bool = Field(False, description="torch.compile the training step (GPUs: faster after a warm-up)")
    tracking: Tracking = Field("none", description="log curves and results: none, or tensorboard (an extra)")

    @field_validator("attacks", "experiments")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a name is listed twice; list each once")
        return names

    @model_validator(mode="after")
    def _surrogate_recipe_is_valid(self) -> ExperimentConfig:
        self.train.updated(self.threats.surrogate_train, "threats.surrogate_train")
        return self

    @model_validator(mode="after")
    def _surrogate_differs(self) -> ExperimentConfig:
        same_model = self.threats.surrogate_model in (None, self.model.name)
        if self.threats.transfer and same_model and self.threats.surrogate_seed == self.train.seed:
            raise ValueError("threats.surrogate_seed equals train.seed: the surrogate would be f0 itself; change it")
        return self

    @field_validator("attack")
    @classmethod
    def _attack_settings(cls, settings: AttackSettings) -> AttackSettings:
        return _validate_attack_settings(settings)


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["train.epochs=5", "data.dataset=cifar10"]` → nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. train.epochs=5")
        _set_dotted(tree, key.strip(), parse_yaml(raw, f"override {key.strip()}", ConfigError) if raw else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _fields_at(cls: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the section at `loc` (for the "did you mean" hint)."""
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _explain(cls: type[BaseModel], exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc), n=1)
        hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else ""
        return f"unknown config key {where!r}{hint}; remove or correct it"
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    # a scalar is quoted; a section or a long value never is (it would bury the one line the user needs)
    got = f" (got {value!r})" if isinstance(value, str | int | float | None) and len(repr(value)) <= 80 else ""
    fix = "" if "; " in msg else "; fix the value"  # a message from a nested check carries its own fix
    return f"config {where}: {msg}{got}{fix}" if where else f"config: {msg}"


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in the package (`advretrain/configs/*.yaml`), by name."""
    folder = Path(str(resources.files("advretrain") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}  # by name: cpu-quick first


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config file by path, or by the name of a packaged config (`default`, `cpu-quick`, `paper-cifar10`, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = packaged_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor one of {', '.join(shipped)}; check the name")


def build_config(
    cls: type[C],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> C:
    """Defaults ← `base` (a dict) or a YAML file (a path or a packaged config's name) ← overrides, into `cls`."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = config_path(path)
        try:
            text = read_text_file(path, "config")
        except AdvretrainError as exc:
            raise ConfigError(str(exc)) from exc
        loaded = parse_yaml(text, f"config {path}", ConfigError) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, not {type(loaded).__name__}")
        tree = loaded
    # Start from the defaults so that a file or override sets single keys of dict-valued settings (attack keywords,
    # retraining sizes) without dropping their other keys.
    tree = _merge(_merge(cls().model_dump(mode="json"), tree), parse_overrides(overrides))
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(cls, exc)) from exc


def to_yaml_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
