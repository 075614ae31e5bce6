"""kbench's public Python API: what ``import kbench`` offers a notebook, and what every command of the
command line calls (one code path, so the two can't drift).

Keyword arguments are the command line's options with underscores, with the same defaults (read from
the same config dataclasses) and the same one-line errors (``KbenchError``). Functions return plain
values: dicts, lists of dict rows (``pandas.DataFrame(rows)`` works), or the small ``Run``, ``Study``
and ``OnnxExport`` objects below; they never print a table and never exit. Importing this module
imports no keras, TensorFlow, JAX or click: each function loads what it needs when called.

>>> import kbench
>>> kbench.list_backbones("efficientnet_b[01]")[0]["name"]
'efficientnet_b0'
"""

from kbench.api.common import Run, use_backend
from kbench.api.serving import latency, predict, score
from kbench.api.study import Study, bench, compare, demo
from kbench.api.training import OnnxExport, build_model, ensemble, export_onnx, list_backbones, train

__all__ = [
    "OnnxExport",
    "Run",
    "Study",
    "bench",
    "build_model",
    "compare",
    "demo",
    "ensemble",
    "export_onnx",
    "latency",
    "list_backbones",
    "predict",
    "score",
    "train",
    "use_backend",
]
