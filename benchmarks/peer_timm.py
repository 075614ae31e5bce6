"""Export timm's version of a kbench backbone to ONNX, as a PyTorch user would: run in the peer
environment (``make peer-env``: torch + timm, outside .venv) by benchmarks/export_graph.py.

    .venv-peer/bin/python benchmarks/peer_timm.py TIMM_NAME IMAGE_SIZE OUTPUT.onnx

Random weights (pretrained=False), one output unit like kbench's binary classifier, NCHW float input,
a dynamic batch, ``torch.onnx.export`` with opset 17 (the TorchScript exporter, dynamo=False).
Prints the versions it used as one JSON line.
"""

import json
import sys

import timm
import torch


def main(argv: list[str]) -> None:
    name, size, output = argv[0], int(argv[1]), argv[2]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1).eval()
    example = torch.rand(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            output,
            opset_version=17,
            input_names=["image"],
            output_names=["logit"],
            dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}},
            dynamo=False,
        )
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "model": name}))


if __name__ == "__main__":
    main(sys.argv[1:])
