"""captioner: Show-and-Tell image captioning (CNN -> initial LSTM state -> words)."""
from .api import Caption, Captioner
from .config import DecodeConfig, ModelConfig, PreprocessConfig, TrainConfig

__all__ = ["Caption", "Captioner", "DecodeConfig", "ModelConfig", "PreprocessConfig", "TrainConfig"]
__version__ = "0.1.0"
