"""The Segment Anything model: network, configs, checkpoints and predictor (no Ray)."""
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, read_checkpoint_meta, save_checkpoint
from .config import CONFIGS, SamConfig, get_config
from .predictor import SamPredictor
from .sam import Sam


def build_sam(model_type: str = "vit_b") -> Sam:
    """A randomly initialized model of a named config."""
    return Sam(get_config(model_type))


__all__ = [
    "CONFIGS", "CheckpointError", "Sam", "SamConfig", "SamPredictor",
    "build_sam", "get_config", "load_checkpoint", "read_checkpoint_config", "read_checkpoint_meta",
    "save_checkpoint",
]
