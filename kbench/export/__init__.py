"""An ONNX graph checked against Keras: ``onnx.onnx_for`` (reuse by content) and
``onnx.export_onnx`` (convert, clean, check parity, keep), the conversion itself (``convert``:
frozen TensorFlow graph and tf2onnx, in a TensorFlow child under JAX) and the clean-up passes
(``graph``, over ``onnxgraph``'s index).
"""
