"""Bit-exactness check: reference.py versus the akida package.

Generates random but well-conditioned edgesync-akida-v1 exports (weights at
random, thresholds and activation steps calibrated on MNIST so that the 4-bit
activations spread over 0..15), then runs random uint8 images and real MNIST
digits through reference.py and through the akida model built by convert.py,
and asserts that every layer's output and the final raw potentials are
identical, that akida's predict() equals (potentials - threshold) / act_step,
and that the model survives a .fbz save/load and maps onto a virtual AKD1000.

Usage: check.py [--mnist DIR] [--random N] [--seed S]

Part of EdgeSync (scripts/akida/). The akida package is optional, installed from PyPI
into a venv outside the repository by scripts/akida/setup.sh, and never vendored.
"""
import argparse
import gzip
import os
import tempfile

import akida
import numpy as np

import convert
import reference

LAYOUTS = {  # (pool of conv1, conv2, conv3)
    "hw": (2, 2, 0),      # maps fully onto AKD1000 hardware
    "brief": (2, 0, 2),   # pool before dense: conv3 falls back to host software
}


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = np.frombuffer(data[:16], dtype=">u4")
    assert magic == 0x803, "not an IDX image file"
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(n, rows, cols)


def pad32(x):
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None]


def random_export(rng, calib, pools, float_steps=False):
    """Random export; each layer is calibrated on calib (uint8 NHWC)."""
    spec = [("conv1", "input_conv", 16), ("conv2", "conv", 32), ("conv3", "conv", 64),
            ("fc1", "dense", 128), ("fc2", "dense", 10)]
    exp = {"format": reference.FORMAT, "input": {"height": 32, "width": 32, "channels": 1},
           "classes": 10, "layers": []}
    for i, (name, kind, n) in enumerate(spec):
        layer = {"name": name, "kind": kind, "weight_bits": 8 if kind == "input_conv" else 4,
                 "act_bits": 0 if i == len(spec) - 1 else 4}
        if kind == "dense":
            layer["units"] = n
        else:
            layer.update(kernel=3, filters=n, stride=1, padding="same", pool=pools[i])
        exp["layers"].append(layer)
    x = calib.astype(np.int64)
    for layer, _, wshape in reference.layer_shapes(exp):
        lim = 127 if layer["weight_bits"] == 8 else 7
        layer["weights"] = rng.integers(-lim, lim + 1, wshape).tolist()
        layer["threshold"], layer["act_step"] = [0] * wshape[0], [1.0] * wshape[0]
        acc = reference.layer_forward(layer, x)[0].reshape(-1, wshape[0])
        if layer["act_bits"]:
            lo, hi = np.percentile(acc, 45, axis=0), np.percentile(acc, 99, axis=0)
            th = np.round(lo).astype(np.int64)
            step = np.maximum((hi - th) / 15, 1 / 16)
            if not float_steps:
                step = np.floor(step * 16) / 16       # exact multiples of 1/16
            layer["threshold"], layer["act_step"] = th.tolist(), step.tolist()
        else:
            layer["threshold"] = rng.integers(-50, 50, wshape[0]).tolist()
        x = reference.layer_forward(layer, x)[1]
    reference.validate(exp)
    return exp


def check(exp, images, tag, hw_only):
    model = convert.build_model(exp)
    ref = reference.forward(exp, images, all_layers=True)
    for k, layer in enumerate(exp["layers"]):     # every intermediate output
        sub = akida.Model(layers=model.layers[:k + 1])
        got = sub.forward(images).astype(np.int64)
        assert np.array_equal(got, ref[k]), "%s: layer %s differs" % (tag, layer["name"])
        if layer["act_bits"]:
            hist = np.bincount(ref[k].ravel(), minlength=16) / ref[k].size
            print("  %-6s zeros %.2f  saturated %.2f" % (layer["name"], hist[0], hist[15]))
    pot = model.forward(images)
    assert pot.dtype == np.int32 and pot.shape == (len(images), 1, 1, 10)
    last = exp["layers"][-1]
    pred = model.predict(images)
    want = (ref[-1] - np.array(last["threshold"])) / np.array(last["act_step"])
    assert np.allclose(pred, want, rtol=1e-6), "%s: predict() differs" % tag
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.fbz")
        model.save(path)
        reloaded = akida.Model(path).forward(images)
        assert np.array_equal(reloaded, pot), "%s: fbz reload differs" % tag
    model.map(akida.AKD1000(), hw_only=hw_only)
    seqs = ", ".join("%s(%s)" % (s.name, s.backend.name) for s in model.sequences)
    cls = reference.classify(exp, ref[-1])
    print("  %s: %d images bit-identical (all layers, potentials, predict, fbz); AKD1000 map: %s"
          % (tag, len(images), seqs))
    return cls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--mnist", default=os.path.join(here, "../../../shared/data/mnist"),
                    help="MNIST IDX folder (default: the shared data beside the checkout)")
    ap.add_argument("--random", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    digits = pad32(read_idx_images(os.path.join(args.mnist, "t10k-images-idx3-ubyte.gz")))
    noise = rng.integers(0, 256, (args.random, 32, 32, 1), dtype=np.uint8)
    calib = pad32(read_idx_images(os.path.join(args.mnist, "train-images-idx3-ubyte.gz"))[:256])
    for layout, float_steps in [("hw", False), ("hw", True), ("brief", False)]:
        print("layout %s (pools %s), %s act_step" % (layout, LAYOUTS[layout],
                                                     "arbitrary float" if float_steps else "k/16"))
        exp = random_export(rng, calib, LAYOUTS[layout], float_steps)
        check(exp, noise, "random", hw_only=(layout == "hw"))
        check(exp, digits, "mnist", hw_only=(layout == "hw"))
    print("PASS")


if __name__ == "__main__":
    main()
