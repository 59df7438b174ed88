"""Integer reference forward pass for EdgeSync "edgesync-akida-v1" exports.

This is the executable specification of what an Akida IP v1 model built from
the export computes (verified bit-exact against the akida 2.19.3 software
backend by check.py). Pure numpy, all arithmetic in int64.

Per layer, with x the uint8/4-bit input feature map in NHWC order:
  acc   = conv 'same' (zero padding (k-1)/2 each side, stride 1, PyTorch
          cross-correlation, weights [out][in][kh][kw])       for input_conv/conv
        = flatten_hwc(x) @ W.T  (W is [out][in])               for dense
  acc   = max_pool(acc, pool, stride pool)                      if pool > 0
  out   = clip(ceil(16 * (acc - threshold) / q), 0, 2**act_bits - 1)
          with q = floor(16 * float32(act_step)) (act_step truncated to 1/16)
                                                                if act_bits > 0
  out   = acc (raw int32 potentials; threshold/act_step ignored) if act_bits == 0
Max pooling and the activation commute (the activation is non-decreasing).

Usage: reference.py EXPORT.json IMAGES.npy   -> prints argmax predictions

Part of EdgeSync (scripts/akida/); needs only numpy. The Rust port is
node/src/akida/integer.rs. The akida package (for convert.py and check.py) is
optional, installed from PyPI by scripts/akida/setup.sh, and never vendored.
"""
import json
import sys
import warnings

import numpy as np

FORMAT = "edgesync-akida-v1"
WEIGHT_RANGE = {8: (-128, 127), 4: (-7, 7)}
THRESHOLD_BITS = {"input_conv": 24, "conv": 20, "dense": 20}   # signed, hardware
ACT_STEP_MAX = {"input_conv": 1048575, "conv": 65535, "dense": 65535}


def load(path):
    with open(path) as f:
        exp = json.load(f)
    validate(exp)
    return exp


def layer_shapes(exp):
    """Yield (layer, input (h, w, c), weight shape) for every layer."""
    h, w, c = (exp["input"][k] for k in ("height", "width", "channels"))
    for layer in exp["layers"]:
        if layer["kind"] == "dense":
            n = layer["units"]
            yield layer, (h, w, c), (n, h * w * c)
            h, w, c = 1, 1, n
        else:
            k, n = layer["kernel"], layer["filters"]
            yield layer, (h, w, c), (n, c, k, k)
            if layer["pool"]:
                h, w = h // layer["pool"], w // layer["pool"]
            c = n


def validate(exp):
    """Reject exports the Akida v1 hardware mapping would refuse."""
    assert exp["format"] == FORMAT, "not an %s export" % FORMAT
    layers = exp["layers"]
    for i, (layer, (h, w, c), wshape) in enumerate(layer_shapes(exp)):
        kind, name = layer["kind"], layer["name"]
        assert (kind == "input_conv") == (i == 0), \
            "%s: input_conv must be first (and only first)" % name
        if kind == "input_conv":
            assert c in (1, 3), "input_conv needs 1 or 3 input channels"
        if kind != "dense":
            assert layer["kernel"] % 2 == 1, "%s: kernel must be odd" % name
            assert layer.get("stride", 1) == 1 and layer.get("padding", "same") == "same", \
                "%s: only stride 1 / same padding is supported" % name
            assert not layer["pool"] or (layer["pool"] == 2 and h % 2 == 0 and w % 2 == 0), \
                "%s: pool must be 0 or 2 on an even-sized map" % name
            if layer["pool"] and i + 1 < len(layers) and layers[i + 1]["kind"] == "dense":
                warnings.warn("%s: max pooling right before a dense layer cannot be mapped to "
                              "AKD1000 hardware; akida runs that layer on the host" % name)
        else:
            assert not layer.get("pool"), "%s: dense layers cannot pool" % name
        wb = layer["weight_bits"]
        assert wb == (8 if kind == "input_conv" else 4), \
            "%s: weight_bits must be 8 (input_conv) or 4" % name
        wt = np.asarray(layer["weights"], dtype=np.int64)
        assert wt.shape == wshape, "%s: weights shape %s != %s" % (name, wt.shape, wshape)
        lo, hi = WEIGHT_RANGE[wb]
        assert wt.min() >= lo and wt.max() <= hi, "%s: weights outside [%d, %d]" % (name, lo, hi)
        assert (wt != 0).any() or kind != "input_conv", "%s: all-zero input_conv weights" % name
        n = wshape[0]
        th = np.asarray(layer["threshold"], dtype=np.int64)
        st = np.asarray(layer["act_step"], dtype=np.float32)
        assert th.shape == (n,) and st.shape == (n,), \
            "%s: need one threshold/act_step per filter" % name
        assert layer["act_bits"] in (0, 4), "%s: act_bits must be 4 or 0" % name
        assert layer["act_bits"] > 0 or i == len(layers) - 1, "%s: only the last layer may have act_bits 0" % name
        if layer["act_bits"]:
            tb = THRESHOLD_BITS[kind]
            assert th.min() >= -2 ** (tb - 1) and th.max() < 2 ** (tb - 1), \
                "%s: threshold must fit a %d-bit signed integer" % (name, tb)
            assert st.min() >= 1 / 16 and st.max() <= ACT_STEP_MAX[kind], \
                "%s: act_step must be in [1/16, %d]" % (name, ACT_STEP_MAX[kind])


def conv_same(x, w):
    """x (N,H,W,C) int64; w (O,C,k,k) int64 -> (N,H,W,O), cross-correlation."""
    k = w.shape[2]
    p = (k - 1) // 2
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    acc = np.zeros((n, h, wd, w.shape[0]), dtype=np.int64)
    for i in range(k):
        for j in range(k):
            acc += xp[:, i:i + h, j:j + wd, :] @ w[:, :, i, j].T
    return acc


def max_pool(a, p):
    n, h, w, c = a.shape
    return a.reshape(n, h // p, p, w // p, p, c).max(axis=(2, 4))


def activate(acc, threshold, act_step, bits):
    q = np.floor(np.float32(16) * np.asarray(act_step, dtype=np.float32)).astype(np.int64)
    d = 16 * (acc - np.asarray(threshold, dtype=np.int64))
    return np.clip(-((-d) // q), 0, 2 ** bits - 1)     # ceil(d / q), clipped


def layer_forward(layer, x):
    """Return (potentials before activation, layer output); x is NHWC int64."""
    w = np.asarray(layer["weights"], dtype=np.int64)
    if layer["kind"] == "dense":
        acc = (x.reshape(x.shape[0], -1) @ w.T).reshape(x.shape[0], 1, 1, -1)
    else:
        acc = conv_same(x, w)
        if layer["pool"]:
            acc = max_pool(acc, layer["pool"])
    if layer["act_bits"] == 0:
        return acc, acc
    return acc, activate(acc, layer["threshold"], layer["act_step"], layer["act_bits"])


def forward(exp, images, all_layers=False):
    """images: uint8 (N,H,W) or (N,H,W,C). Returns last output (N,1,1,classes)
    int64 (raw potentials when the last layer has act_bits 0), or the list of
    every layer's output when all_layers is true."""
    x = np.asarray(images)
    assert x.dtype == np.uint8, "images must be uint8"
    if x.ndim == 3:
        x = x[..., None]
    x = x.astype(np.int64)
    outs = []
    for layer in exp["layers"]:
        x = layer_forward(layer, x)[1]
        outs.append(x)
    return outs if all_layers else x


def classify(exp, potentials):
    """Class scores as Akida's model.predict() orders them: (acc - threshold),
    argmax taken per image (act_step of the last layer must be uniform)."""
    th = np.asarray(exp["layers"][-1]["threshold"], dtype=np.int64)
    return np.argmax(potentials.reshape(potentials.shape[0], -1) - th, axis=1)


if __name__ == "__main__":
    export = load(sys.argv[1])
    imgs = np.load(sys.argv[2])
    print(" ".join(map(str, classify(export, forward(export, imgs)))))
