"""PyTorch → fedflock training bundle (``train_step.onnx``, ``inference.onnx``, weights, manifest).

The only package besides the tests that imports torch; devices run the bundle with plain
onnxruntime. Entry point: :func:`export_bundle`.
"""

from model_export.exporter import export_bundle, load_factory
from model_export.models import DigitsCNN, digits_cnn

__all__ = ["DigitsCNN", "digits_cnn", "export_bundle", "load_factory"]
