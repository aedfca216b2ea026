"""advretrain: does retraining a classifier on adversarial images defend it, and against which attacks?

Public API (stable names):
    load_dataset(spec, split, root=None) → ImageDataset (.images uint8 N×C×H×W, .labels int64 N, .classes)
    build_model(name, num_classes, image_size=32, flip_average=False) → nn.Module mapping [0,1] N×C×H×W to logits
    load_model(checkpoint_path, builder=None) → the trained model, in eval mode; no code runs unless `builder` names
        the file's own package.module:builder
    train(model, data, cfg, device, test=None) → TrainResult: the loop, tensors in, weights and metrics out
    train_resumable(model, data, cfg, device, out_dir, test=None) → TrainResult: checkpointed, resumable, saved
    evaluate(model, images, labels) → top-1 accuracy
    run(config, out, overrides=()) → Results: the protocol, run or resumed in `out` (config: a path, a shipped
        config's name, a dict or an ExperimentConfig)
    register_attack(name, cls, *, title, threat, ...) → AttackSpec: a new attack for every command and table
"""

__version__ = "0.1.0"

from .attacks import ATTACKS, register_attack
from .checkpoint import load_model, save_model, train_resumable
from .config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, TrainJob, build_config
from .data import ImageDataset, load_dataset
from .errors import AdvretrainError, CheckpointError, ConfigError, DataError
from .metrics import evaluate, predict
from .models import MODELS, build_model, grow_head
from .pipeline import run
from .results import Results
from .train import train

__all__ = [
    "ATTACKS",
    "MODELS",
    "AdvretrainError",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "ExperimentConfig",
    "ImageDataset",
    "ModelConfig",
    "Results",
    "TrainConfig",
    "TrainJob",
    "__version__",
    "build_config",
    "build_model",
    "evaluate",
    "grow_head",
    "load_dataset",
    "load_model",
    "predict",
    "register_attack",
    "run",
    "save_model",
    "train",
    "train_resumable",
]
