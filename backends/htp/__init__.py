"""The ``htp`` backend: INTEGER graph → QDQ ONNX → QNN HTP context binary (Snapdragon NPU)."""
from .backend import HtpBackend

__all__ = ["HtpBackend"]
