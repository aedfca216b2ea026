"""advretrain: does retraining a classifier on adversarial images defend it, and against which attacks?

Public API (stable names):
    load_dataset(spec, split, root=None) → ImageDataset (.images uint8 N×C×H×W, .labels int64 N, .classes)
    build_model(name, num_classes, image_size=32, flip_average=False) → nn.Module mapping [0,1] N×C×H×W to logits
    load_model(checkpoint_path) → the trained model, in eval mode
    train(model, data, cfg, device, out_dir=None, test=None) → TrainResult
    evaluate(model, images, labels) → top-1 accuracy
"""

__version__ = "0.1.0"

from .checkpoint import load_model, save_model
from .config import DataConfig, ModelConfig, TrainConfig, TrainJob, build_config
from .data import ImageDataset, load_dataset
from .errors import AdvretrainError, CheckpointError, ConfigError, DataError
from .models import MODELS, build_model, grow_head
from .train import evaluate, predict, train

__all__ = [
    "MODELS",
    "AdvretrainError",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "ImageDataset",
    "ModelConfig",
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
    "save_model",
    "train",
]
