"""Build an Akida IP v1 model from an EdgeSync "edgesync-akida-v1" export.

Layout conversions (export -> akida variables, all checked by check.py):
  input_conv  W[o][i][kh][kw] (cross-correlation) -> akida (kh, kw, i, o), as is
  conv        akida Convolutional computes a true convolution, so the kernel is
              flipped in both spatial axes before transposing to (kh, kw, i, o)
  dense       W[o][(h*W + w)*C + c]  ->  akida (1, 1, (c*W + w)*H + h, o)
              (akida flattens its input channel-major, then width, then height)
  threshold   int32 per filter; act_step float32 per filter.

Usage:
  convert.py EXPORT.json [--save model.fbz] [--check IMAGES.npy [--expect POT.npy]]
             [--software]
IMAGES.npy: uint8 (N,H,W) or (N,H,W,C); 28x28 images are zero-padded by 2 on
every side to 32x32. Runs on the first AKD1000 listed by akida.devices(), or on
the software backend when there is none (or with --software). With --expect
(int32 potentials as `dfl-node akida eval --save-potentials` writes them), also
compares akida's raw potentials and predictions with those and exits with
status 1 if any differ. With --map-virtual, finally maps the model onto a
virtual AKD1000 with hw_only=True (fails unless every layer runs in hardware)
and prints its sequences.

Part of EdgeSync (scripts/akida/). The akida package is optional, installed from PyPI
into a venv outside the repository by scripts/akida/setup.sh, and never vendored.
"""
import argparse
import sys

import akida
import numpy as np

import reference


def akida_weights(layer, in_shape):
    w = np.asarray(layer["weights"], dtype=np.int64)
    if layer["kind"] == "dense":
        h, wd, c = in_shape
        a = w.reshape(-1, h, wd, c).transpose(3, 2, 1, 0).reshape(1, 1, c * wd * h, -1)
    else:
        if layer["kind"] == "conv":
            w = w[:, :, ::-1, ::-1]
        a = w.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(a, dtype=np.int8)


def akida_layer(layer, in_shape):
    act = dict(activation=layer["act_bits"] > 0, act_bits=layer["act_bits"] or 1,
               weights_bits=layer["weight_bits"], name=layer["name"])
    if layer["kind"] == "dense":
        return akida.FullyConnected(units=layer["units"], **act)
    conv = dict(filters=layer["filters"], kernel_size=(layer["kernel"],) * 2,
                padding=akida.Padding.Same, kernel_stride=(1, 1), **act)
    if layer["pool"]:
        p = layer["pool"]
        conv.update(pool_type=akida.PoolType.Max, pool_size=(p, p), pool_stride=(p, p))
    if layer["kind"] == "input_conv":
        return akida.InputConvolutional(input_shape=in_shape, **conv)
    return akida.Convolutional(**conv)


def build_model(exp):
    model = akida.Model()
    for layer, in_shape, _ in reference.layer_shapes(exp):
        model.add(akida_layer(layer, in_shape))
        ak = model.layers[-1]
        ak.set_variable("weights", akida_weights(layer, in_shape))
        ak.set_variable("threshold", np.asarray(layer["threshold"], dtype=np.int32))
        ak.set_variable("act_step", np.asarray(layer["act_step"], dtype=np.float32))
    return model


def load_images(path):
    x = np.load(path)
    assert x.dtype == np.uint8, "images must be uint8"
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:3] == (28, 28):
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return np.ascontiguousarray(x)


def map_to_device(model, software=False):
    """Map onto a real AKD1000 if one is present; return a description."""
    devices = [] if software else akida.devices()
    if not devices:
        return "software backend"
    model.map(devices[0])
    return "device %s" % devices[0].desc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export")
    ap.add_argument("--save", help="write the akida model (.fbz)")
    ap.add_argument("--check", help="uint8 images .npy to classify")
    ap.add_argument("--expect", help="int32 potentials .npy the model must reproduce")
    ap.add_argument("--software", action="store_true", help="ignore any akida device")
    ap.add_argument("--map-virtual", action="store_true",
                    help="map onto a virtual AKD1000, hardware only, and print the sequences")
    args = ap.parse_args()
    exp = reference.load(args.export)
    model = build_model(exp)
    if args.save:
        model.save(args.save)
    where = map_to_device(model, args.software)
    model.summary()
    if args.expect and not args.check:
        ap.error("--expect needs --check IMAGES.npy")
    if args.check:
        pot = model.forward(load_images(args.check))
        print("ran on", where)
        pred = reference.classify(exp, pot.astype(np.int64))
        print("predictions:", " ".join(map(str, pred)))
        if args.expect and not compare(exp, pot, np.load(args.expect)):
            sys.exit(1)
    if args.map_virtual:
        model.map(akida.AKD1000(), hw_only=True)
        print("AKD1000 (virtual) sequences:",
              ", ".join("%s(%s)" % (s.name, s.backend.name) for s in model.sequences))


def compare(exp, pot, want):
    """Print how many images' potentials and predictions equal the expected ones."""
    if pot.shape != want.shape:
        print("MISMATCH: potentials have shape %s, expected %s" % (pot.shape, want.shape))
        return False
    n = len(pot)
    same_pot = int((pot.reshape(n, -1) == want.reshape(n, -1)).all(axis=1).sum())
    pred = reference.classify(exp, pot.astype(np.int64))
    same_pred = int((pred == reference.classify(exp, want.astype(np.int64))).sum())
    print("potentials identical for %d/%d images" % (same_pot, n))
    print("predictions identical for %d/%d images" % (same_pred, n))
    return same_pot == n and same_pred == n


if __name__ == "__main__":
    main()
