"""What a model costs to serve and what it predicts: one small class per runtime
(``runtimes.make_runtime``; ONNX Runtime's in ``onnx_runtime``, OpenVINO's in ``openvino``),
``latency.measure`` (runtimes x batch sizes -> rows), int8 quantization (``quantize``) and Kaggle
submissions (``submission.predict_test_set``, ``submission.score_submission``).
"""
