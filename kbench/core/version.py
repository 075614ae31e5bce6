"""kbench's version: in ONNX metadata and reuse keys, timing keys and `kbench --version`."""

__version__ = "0.1.0"
