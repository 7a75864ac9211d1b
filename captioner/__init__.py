"""captioner: Show-and-Tell image captioning (CNN -> initial LSTM state -> words)."""
from .config import DecodeConfig, ModelConfig, PreprocessConfig, TrainConfig

__all__ = ["Caption", "Captioner", "DecodeConfig", "ModelConfig", "PreprocessConfig", "TrainConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Caption and Captioner import torch (seconds): loaded on first use, so `captioner --help`
    # and usage errors answer without it.
    if name in ("Caption", "Captioner"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
