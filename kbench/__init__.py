"""kbench: which pretrained backbone or ensemble to fine-tune, and what each costs to train and serve,
measured on your own images.

The public Python API (docs/python.md); the ``kbench`` command line calls these same functions::

    import kbench
    kbench.use_backend("jax")                      # before keras loads
    run = kbench.train("efficientnet_b0", "train.zip", "runs/b0", epochs=10)
    ens = kbench.ensemble([run, "runs/mnv2"], "runs/ens")
    onnx = kbench.export_onnx(ens, "exports/ens.onnx")
    rows = kbench.latency([run, onnx.path], batch_sizes=[1, 32])
    kbench.predict(ens, data="test.zip", output="submission.csv", tta="flip")
    kbench.score("submission.csv", answers="answers.csv")

Importing kbench imports no keras, TensorFlow, JAX or click: the backend is chosen first.
"""

from kbench import api as _api
from kbench.api import *  # noqa: F403  (the API's names: kbench.api.__all__, the one list of them)
from kbench.core.errors import KbenchError
from kbench.core.version import __version__

__all__ = ["KbenchError", "__version__"]
__all__ += _api.__all__
