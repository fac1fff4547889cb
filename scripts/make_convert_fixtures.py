#!/usr/bin/env python3
"""Writes the fixtures that `tests/convert.rs` converts: one small two-tower AlexNet, built in
PyTorch, written out the ways its original weights are published.

    pip install torch onnx protobuf grpcio-tools numpy
    python3 scripts/make_convert_fixtures.py   # rewrites tests/fixtures/convert/

Files (widths 4-8-8-8-8, fc 16, 5 classes; weights from `det_values`, as in make_fixtures.py):
- alexnet.caffemodel: Caffe's current format (`layer`, string types, `shape` blobs), AlexNet order;
- caffenet_v1.caffemodel: Caffe's V1 format (`layers`, enum types, legacy 4-D blobs, fc weights
  as 1x1xOUTxIN), CaffeNet order (pool before LRN), as the BVLC model zoo files are;
- alexnet_v0.caffemodel: Caffe's 2013 V0 layers nested in V1 `layers`, AlexNet order;
- alexnet.onnx: `torch.onnx.export` at 224 px with a real `LRN` node, as the ONNX model zoo's
  bvlcalexnet feeds 224 px;
- caffenet_port.pth: the state dict of a PyTorch port (`features.N` / `classifier.N` keys);
- missing_blob.caffemodel (fc7 without its bias), no_conv5.caffemodel (a layer short),
  bad_lrn.caffemodel (LRN size 3): for the error tests;
- mean.binaryproto: a 1x3x16x16 mean image;
- reference.json: PyTorch's logits for each model on the formula input `det_values("input", ...)`.
"""

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import CaffeAlexNet, det_state_dict, det_values  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "convert")
CHANNELS, HIDDEN, CLASSES = [4, 8, 8, 8, 8], 16, 5
BATCH = 2
INPUT_BOUND = 128.0


@functools.cache
def caffe_pb2():
    """Compiles scripts/caffe_subset.proto with grpcio-tools' bundled protoc and imports it."""
    out = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{os.path.dirname(__file__)}",
                    f"--python_out={out}", "caffe_subset.proto"], check=True)
    sys.path.insert(0, out)
    return importlib.import_module("caffe_subset_pb2")


def det_input(h, w):
    x = det_values("input", BATCH * 3 * h * w, INPUT_BOUND).reshape(BATCH, 3, h, w)
    return torch.from_numpy(x)


def model(caffenet):
    m = CaffeAlexNet(CHANNELS, HIDDEN, CLASSES, caffenet=caffenet)
    m.load_state_dict(det_state_dict(m))
    return m.eval()


def caffe_layers(m, caffenet):
    """(name, type, bottom, top, blobs, params) in deploy.prototxt order."""
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    conv = lambda i, **p: (f"conv{i}", "Convolution", [sd[f"conv{i}.weight"], sd[f"conv{i}.bias"]], p)
    layers = []
    for i in (1, 2):
        layers.append(conv(i, kernel_size=[11, 5][i - 1], stride=[4, 1][i - 1],
                           pad=[0, 2][i - 1], group=[1, 2][i - 1]))
        layers.append((f"relu{i}", "ReLU", [], {}))
        norm = (f"norm{i}", "LRN", [], {"local_size": 5, "alpha": 1e-4, "beta": 0.75})
        pool = (f"pool{i}", "Pooling", [], {"kernel_size": 3, "stride": 2})
        layers += [pool, norm] if caffenet else [norm, pool]
    for i, g in ((3, 1), (4, 2), (5, 2)):
        layers.append(conv(i, kernel_size=3, pad=1, group=g))
        layers.append((f"relu{i}", "ReLU", [], {}))
    layers.append(("pool5", "Pooling", [], {"kernel_size": 3, "stride": 2}))
    for i in (6, 7, 8):
        layers.append((f"fc{i}", "InnerProduct", [sd[f"fc{i}.weight"], sd[f"fc{i}.bias"]], {}))
        if i < 8:
            layers.append((f"relu{i}", "ReLU", [], {}))
            layers.append((f"drop{i}", "Dropout", [], {}))
    layers.append(("prob", "Softmax", [], {}))
    return layers


V1_TYPES = {"Convolution": 4, "Dropout": 6, "InnerProduct": 14, "LRN": 15, "Pooling": 17,
            "ReLU": 18, "Softmax": 20}
V0_TYPES = {"Convolution": "conv", "Dropout": "dropout", "InnerProduct": "innerproduct",
            "LRN": "lrn", "Pooling": "pool", "ReLU": "relu", "Softmax": "softmax"}


def write_v0_caffemodel(path, layers):
    """Caffe's 2013 format: each V1 `layers` entry wraps a V0 layer with flat parameters."""
    pb = caffe_pb2()
    net = pb.NetParameter(name="AlexNet")
    for name, kind, blobs, params in layers:
        layer = net.layers.add().layer
        layer.name, layer.type = name, V0_TYPES[kind]
        for b in blobs:
            blob = layer.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = [1] * (4 - b.ndim) + list(b.shape)
            blob.data.extend(b.reshape(-1).tolist())
        if blobs:
            layer.num_output = blobs[0].shape[0]
        if kind in ("Convolution", "Pooling"):
            layer.kernelsize, layer.stride = params["kernel_size"], params.get("stride", 1)
        if kind == "Convolution":
            layer.pad, layer.group = params["pad"], params["group"]
        if kind == "LRN":
            layer.local_size, layer.alpha, layer.beta = (params["local_size"], params["alpha"],
                                                         params["beta"])
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


def write_caffemodel(pb, path, layers, v1, edit=None):
    net = pb.NetParameter(name="CaffeNet" if v1 else "AlexNet")
    for name, kind, blobs, params in layers:
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = name
        layer.type = V1_TYPES[kind] if v1 else kind
        for b in blobs:
            blob = layer.blobs.add()
            if v1:
                # Legacy blobs: 4-D num/channels/height/width, fc weights 1x1xOUTxIN, biases 1x1x1xN.
                shape = [1] * (4 - b.ndim) + list(b.shape)
                blob.num, blob.channels, blob.height, blob.width = shape
            else:
                blob.shape.dim.extend(b.shape)
            blob.data.extend(b.reshape(-1).tolist())
        if kind == "Convolution":
            p = layer.convolution_param
            p.num_output = blobs[0].shape[0]
            p.kernel_size.append(params["kernel_size"])
            p.stride.append(params.get("stride", 1))
            p.pad.append(params["pad"])
            p.group = params["group"]
        elif kind == "InnerProduct":
            layer.inner_product_param.num_output = blobs[0].shape[0]
        elif kind == "LRN":
            p = layer.lrn_param
            p.local_size, p.alpha, p.beta = params["local_size"], params["alpha"], params["beta"]
        elif kind == "Pooling":
            p = layer.pooling_param
            p.pool = pb.PoolingParameter.MAX
            p.kernel_size, p.stride = params["kernel_size"], params["stride"]
    if edit:
        edit(net)
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


class OnnxLRN(torch.autograd.Function):
    """Local response norm exported as ONNX's `LRN` node (PyTorch otherwise exports its
    decomposition), as the ONNX model zoo's bvlcalexnet has it."""

    @staticmethod
    def forward(ctx, x):
        return F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=1.0)

    @staticmethod
    def symbolic(g, x):
        return g.op("LRN", x, size_i=5, alpha_f=1e-4, beta_f=0.75, bias_f=1.0)


class OnnxAlexNet(nn.Module):
    def __init__(self, m):
        super().__init__()
        del m.lrn  # a registered submodule cannot be replaced by a function
        m.lrn = OnnxLRN.apply
        self.m = m

    def forward(self, x):
        return self.m.taps(x)["logits"]


class PortedCaffeNet(nn.Module):
    """CaffeNet as a PyTorch user ports it: `features` and `classifier` sequentials."""

    def __init__(self):
        super().__init__()
        c = CHANNELS
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], 11, stride=4), nn.ReLU(), pool(), lrn(),
            nn.Conv2d(c[0], c[1], 5, padding=2, groups=2), nn.ReLU(), pool(), lrn(),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(),
            nn.Conv2d(c[2], c[3], 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(c[3], c[4], 3, padding=1, groups=2), nn.ReLU(), pool(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c[4] * 36, HIDDEN), nn.ReLU(), nn.Dropout(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Dropout(),
            nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    pb = caffe_pb2()
    alexnet, caffenet = model(False), model(True)
    x227, x224 = det_input(227, 227), det_input(224, 224)
    ref = {
        "channels": CHANNELS, "hidden": HIDDEN, "classes": CLASSES, "batch": BATCH,
        "input_bound": INPUT_BOUND, "torch": torch.__version__,
        "alexnet_227": alexnet.taps(x227)["logits"].reshape(-1).tolist(),
        "caffenet_227": caffenet.taps(x227)["logits"].reshape(-1).tolist(),
        "alexnet_224": alexnet.taps(x224)["logits"].reshape(-1).tolist(),
    }

    write_caffemodel(pb, f"{OUT}/alexnet.caffemodel", caffe_layers(alexnet, False), v1=False)
    write_caffemodel(pb, f"{OUT}/caffenet_v1.caffemodel", caffe_layers(caffenet, True), v1=True)
    write_v0_caffemodel(f"{OUT}/alexnet_v0.caffemodel", caffe_layers(alexnet, False))

    def drop_fc7_bias(net):
        fc7 = next(l for l in net.layer if l.name == "fc7")
        del fc7.blobs[1]

    def drop_conv5(net):
        i = next(i for i, l in enumerate(net.layer) if l.name == "conv5")
        del net.layer[i]

    def lrn_size_3(net):
        next(l for l in net.layer if l.name == "norm1").lrn_param.local_size = 3

    for name, edit in [("missing_blob", drop_fc7_bias), ("no_conv5", drop_conv5),
                       ("bad_lrn", lrn_size_3)]:
        write_caffemodel(pb, f"{OUT}/{name}.caffemodel", caffe_layers(alexnet, False), v1=False,
                         edit=edit)

    onnx_model = OnnxAlexNet(model(False)).eval()
    assert torch.allclose(onnx_model(x224), alexnet.taps(x224)["logits"])
    torch.onnx.export(onnx_model, (x224,), f"{OUT}/alexnet.onnx", dynamo=False, opset_version=13,
                      input_names=["data_0"], output_names=["fc8"], do_constant_folding=True)
    import onnx
    graph = onnx.load(f"{OUT}/alexnet.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("LRN") == 2 and ops.count("Conv") == 5, ops

    port = PortedCaffeNet().eval()
    convs = [m for m in port.features if isinstance(m, nn.Conv2d)]
    fcs = [m for m in port.classifier if isinstance(m, nn.Linear)]
    sd = caffenet.state_dict()
    for i, m in enumerate(convs + fcs):
        key = f"conv{i + 1}" if i < 5 else f"fc{i + 1}"
        m.weight.copy_(sd[f"{key}.weight"])
        m.bias.copy_(sd[f"{key}.bias"])
    assert torch.allclose(port(x227), caffenet.taps(x227)["logits"], rtol=1e-5, atol=1e-5)
    torch.save(port.state_dict(), f"{OUT}/caffenet_port.pth")

    mean = pb.BlobProto(num=1, channels=3, height=16, width=16)
    mean.data.extend((np.arange(3 * 256) % 256 / 255.0 * 20.0
                      + np.repeat([100.0, 110.0, 120.0], 256)).tolist())
    with open(f"{OUT}/mean.binaryproto", "wb") as f:
        f.write(mean.SerializeToString())
    ref["mean_bgr"] = [float(np.mean(np.array(mean.data[c * 256:(c + 1) * 256], dtype=np.float32)))
                       for c in range(3)]

    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
