//! The `edgesync-akida-v1` export of a trained Akida-class model: integer weights, integer
//! thresholds and activation steps, layer by layer, as JSON (format described in
//! `docs/akida-export.md`). [`from_model`] builds it from a model, [`Export::load`] reads and
//! validates one, [`super::integer`] runs it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::Error as _;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::Tensor;

use super::qat::{self, Granularity};
use crate::model::{Architecture, Cnn, POOLED_SIDE};

/// The value of the `format` field.
pub const FORMAT: &str = "edgesync-akida-v1";

/// Activation bits of hidden layers; 0 marks the last layer, whose raw potentials are the
/// class scores.
pub const ACT_BITS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an {FORMAT} export: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("layer {layer}, field {field}: {reason}")]
    Layer {
        layer: String,
        field: &'static str,
        reason: String,
    },
    #[error("cannot export this model: {0}")]
    Model(String),
}

fn layer_error(layer: &Layer, field: &'static str, reason: impl Into<String>) -> ExportError {
    ExportError::Layer {
        layer: layer.name.clone(),
        field,
        reason: reason.into(),
    }
}

/// A whole export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub format: String,
    pub input: InputShape,
    pub classes: usize,
    pub layers: Vec<Layer>,
}

/// Input images: `uint8`, NHWC, of this size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// First layer, 8-bit weights over raw pixels (Akida `InputConvolutional`).
    InputConv,
    /// 4-bit convolution (Akida `Convolutional`).
    Conv,
    /// 4-bit fully connected layer (Akida `FullyConnected`).
    Dense,
}

impl LayerKind {
    fn weight_bits(self) -> u32 {
        match self {
            LayerKind::InputConv => 8,
            LayerKind::Conv | LayerKind::Dense => 4,
        }
    }

    fn weight_range(self) -> (i64, i64) {
        match self {
            LayerKind::InputConv => (-128, 127),
            LayerKind::Conv | LayerKind::Dense => (-7, 7),
        }
    }

    /// Bits of a signed threshold the hardware holds.
    fn threshold_bits(self) -> u32 {
        match self {
            LayerKind::InputConv => 24,
            LayerKind::Conv | LayerKind::Dense => 20,
        }
    }

    fn act_step_max(self) -> f32 {
        match self {
            LayerKind::InputConv => qat::INPUT_CONV_STEP_MAX as f32,
            LayerKind::Conv | LayerKind::Dense => qat::STEP_MAX as f32,
        }
    }
}

/// One layer. Convolutions carry `kernel`, `filters`, `stride`, `padding` and `pool`;
/// dense layers carry `units`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub name: String,
    pub kind: LayerKind,
    pub weight_bits: u32,
    pub act_bits: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<usize>,
    /// Convolutions `[out][in][kh][kw]` (cross-correlation, as PyTorch); dense layers
    /// `[out][in]`, inputs in `(h, w, c)` order.
    pub weights: IntArray,
    /// Per output; subtracted from the potential before the activation.
    pub threshold: Vec<i64>,
    /// Per output; the chip uses `floor(16 * act_step) / 16`.
    pub act_step: Vec<f32>,
}

/// A rectangular nested array of integers, stored flat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntArray {
    pub shape: Vec<usize>,
    pub values: Vec<i64>,
}

struct Nested<'a> {
    shape: &'a [usize],
    values: &'a [i64],
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let len = self.shape.first().copied().unwrap_or(0);
        let mut seq = s.serialize_seq(Some(len))?;
        if self.shape.len() <= 1 {
            for v in self.values {
                seq.serialize_element(v)?;
            }
        } else {
            let inner: usize = self.shape[1..].iter().product();
            for chunk in self.values.chunks(inner.max(1)).take(len) {
                seq.serialize_element(&Nested {
                    shape: &self.shape[1..],
                    values: chunk,
                })?;
            }
        }
        seq.end()
    }
}

impl Serialize for IntArray {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Nested {
            shape: &self.shape,
            values: &self.values,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for IntArray {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let mut shape = Vec::new();
        let mut probe = &value;
        while let serde_json::Value::Array(items) = probe {
            shape.push(items.len());
            match items.first() {
                Some(first) => probe = first,
                None => break,
            }
        }
        if shape.is_empty() {
            return Err(D::Error::custom("expected a nested array of integers"));
        }
        let mut values = Vec::with_capacity(shape.iter().product());
        flatten(&value, &shape, &mut values).map_err(D::Error::custom)?;
        Ok(IntArray { shape, values })
    }
}

fn flatten(value: &serde_json::Value, shape: &[usize], out: &mut Vec<i64>) -> Result<(), String> {
    match (value, shape.split_first()) {
        (serde_json::Value::Array(items), Some((&len, rest))) => {
            if items.len() != len {
                return Err(format!(
                    "ragged array: {} items where {len} expected",
                    items.len()
                ));
            }
            items.iter().try_for_each(|item| flatten(item, rest, out))
        }
        (serde_json::Value::Number(n), None) => {
            let v = n.as_i64().ok_or_else(|| format!("{n} is not an integer"))?;
            out.push(v);
            Ok(())
        }
        (other, _) => Err(format!("ragged array: unexpected {other}")),
    }
}

/// Where a layer sits: its input map and its outputs per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input `(height, width, channels)`.
    pub input: (usize, usize, usize),
    /// Output `(height, width, channels)`, after pooling.
    pub output: (usize, usize, usize),
}

impl Layer {
    /// Filters or units.
    fn outputs(&self) -> Result<usize, ExportError> {
        let (value, field) = match self.kind {
            LayerKind::Dense => (self.units, "units"),
            _ => (self.filters, "filters"),
        };
        match value {
            Some(n) if n > 0 => Ok(n),
            Some(_) => Err(layer_error(self, field, "must be positive")),
            None => Err(layer_error(self, field, "missing")),
        }
    }

    fn expected_weight_shape(
        &self,
        (h, w, c): (usize, usize, usize),
    ) -> Result<Vec<usize>, ExportError> {
        let n = self.outputs()?;
        Ok(match self.kind {
            LayerKind::Dense => vec![n, h * w * c],
            _ => {
                let k = self
                    .kernel
                    .ok_or_else(|| layer_error(self, "kernel", "missing"))?;
                vec![n, c, k, k]
            }
        })
    }
}

impl Export {
    /// Reads and validates an export.
    pub fn load(path: &Path) -> Result<Export, ExportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let export: Export =
            serde_path_to_error::deserialize(de).map_err(|e| ExportError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        export.validate()?;
        Ok(export)
    }

    /// Writes the export as JSON (validated first, so that only loadable files are written).
    pub fn save(&self, path: &Path) -> Result<(), ExportError> {
        self.validate()?;
        let write = |source| ExportError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text =
            serde_json::to_string(self).map_err(|e| write(std::io::Error::other(e.to_string())))?;
        // Written beside the target and renamed over it, so that a crash mid-write never
        // leaves a half-written export where a good one was.
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        std::fs::write(&tmp, text).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(write)
    }

    /// Each layer's input and output shape; errors on missing or inconsistent geometry.
    pub fn geometry(&self) -> Result<Vec<Geometry>, ExportError> {
        let mut shape = (self.input.height, self.input.width, self.input.channels);
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let n = layer.outputs()?;
            let next = match layer.kind {
                LayerKind::Dense => (1, 1, n),
                _ => match layer.pool {
                    Some(0) => (shape.0, shape.1, n),
                    Some(2) if shape.0 % 2 == 0 && shape.1 % 2 == 0 => {
                        (shape.0 / 2, shape.1 / 2, n)
                    }
                    Some(2) => {
                        let reason = format!(
                            "pool 2 needs an even-sized map, found {}x{}",
                            shape.0, shape.1
                        );
                        return Err(layer_error(layer, "pool", reason));
                    }
                    Some(p) => {
                        return Err(layer_error(layer, "pool", format!("{p}: must be 0 or 2")))
                    }
                    None => return Err(layer_error(layer, "pool", "missing")),
                },
            };
            out.push(Geometry {
                input: shape,
                output: next,
            });
            shape = next;
        }
        Ok(out)
    }

    /// Rejects exports that the AKD1000 mapping (or the integer engine) would refuse.
    pub fn validate(&self) -> Result<(), ExportError> {
        if self.format != FORMAT {
            return Err(ExportError::Field {
                field: "format",
                reason: format!("expected {FORMAT}, found {:?}", self.format),
            });
        }
        let input = self.input;
        if input.height == 0 || input.width == 0 {
            return Err(ExportError::Field {
                field: "input",
                reason: format!("image size {}x{} is empty", input.height, input.width),
            });
        }
        if self.layers.is_empty() {
            return Err(ExportError::Field {
                field: "layers",
                reason: "no layers".into(),
            });
        }
        let geometry = self.geometry()?;
        let last = self.layers.len() - 1;
        for (i, (layer, geo)) in self.layers.iter().zip(&geometry).enumerate() {
            validate_layer(layer, geo, i == 0, i == last)?;
        }
        let out = geometry[last].output;
        if out != (1, 1, self.classes) {
            return Err(ExportError::Field {
                field: "classes",
                reason: format!(
                    "{} classes, but the last layer outputs {}x{}x{}",
                    self.classes, out.0, out.1, out.2
                ),
            });
        }
        Ok(())
    }
}

fn validate_layer(
    layer: &Layer,
    geo: &Geometry,
    first: bool,
    last: bool,
) -> Result<(), ExportError> {
    let kind = layer.kind;
    if (kind == LayerKind::InputConv) != first {
        return Err(layer_error(
            layer,
            "kind",
            "input_conv must be the first layer, and only it",
        ));
    }
    let channels = geo.input.2;
    if kind == LayerKind::InputConv && channels != 1 && channels != 3 {
        return Err(layer_error(
            layer,
            "kind",
            format!("input_conv takes 1 or 3 channels, not {channels}"),
        ));
    }
    if kind == LayerKind::Dense {
        if layer.pool.is_some_and(|p| p != 0) {
            return Err(layer_error(layer, "pool", "dense layers cannot pool"));
        }
    } else {
        let k = layer.kernel.unwrap_or(0);
        if k % 2 == 0 {
            return Err(layer_error(layer, "kernel", format!("{k}: must be odd")));
        }
        if layer.stride.unwrap_or(1) != 1 {
            return Err(layer_error(layer, "stride", "only stride 1 is supported"));
        }
        if layer.padding.as_deref().unwrap_or("same") != "same" {
            return Err(layer_error(
                layer,
                "padding",
                "only \"same\" padding is supported",
            ));
        }
    }
    if layer.weight_bits != kind.weight_bits() {
        let reason = format!(
            "{} where {kind} layers take {}",
            layer.weight_bits,
            kind.weight_bits()
        );
        return Err(layer_error(layer, "weight_bits", reason));
    }
    let shape = layer.expected_weight_shape(geo.input)?;
    if layer.weights.shape != shape {
        let reason = format!("shape {:?}, expected {shape:?}", layer.weights.shape);
        return Err(layer_error(layer, "weights", reason));
    }
    let (lo, hi) = kind.weight_range();
    if let Some(bad) = layer.weights.values.iter().find(|&&v| v < lo || v > hi) {
        return Err(layer_error(
            layer,
            "weights",
            format!("{bad} is outside [{lo}, {hi}]"),
        ));
    }
    if kind == LayerKind::InputConv && layer.weights.values.iter().all(|&v| v == 0) {
        return Err(layer_error(
            layer,
            "weights",
            "all zero, which the chip refuses for input_conv",
        ));
    }
    let n = shape[0];
    if layer.threshold.len() != n {
        let reason = format!("{} values for {n} outputs", layer.threshold.len());
        return Err(layer_error(layer, "threshold", reason));
    }
    if layer.act_step.len() != n {
        let reason = format!("{} values for {n} outputs", layer.act_step.len());
        return Err(layer_error(layer, "act_step", reason));
    }
    match (layer.act_bits, last) {
        (0, true) | (ACT_BITS, false) => {}
        (bits, true) => {
            let reason = format!("{bits}: the last layer must have 0 (raw potentials as scores)");
            return Err(layer_error(layer, "act_bits", reason));
        }
        (bits, false) => {
            let reason = format!("{bits}: hidden layers must have {ACT_BITS}");
            return Err(layer_error(layer, "act_bits", reason));
        }
    }
    let step_min = 1.0 / 16.0;
    let step_max = if last { f32::MAX } else { kind.act_step_max() };
    for (o, &step) in layer.act_step.iter().enumerate() {
        if !(step.is_finite() && (step_min..=step_max).contains(&step)) {
            let reason = format!("{step} at output {o} is outside [1/16, {step_max}]");
            return Err(layer_error(layer, "act_step", reason));
        }
    }
    let bits = if last { 32 } else { kind.threshold_bits() };
    let (t_lo, t_hi) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
    for (o, &t) in layer.threshold.iter().enumerate() {
        if t < t_lo || t > t_hi {
            let reason = format!("{t} at output {o} does not fit a {bits}-bit signed integer");
            return Err(layer_error(layer, "threshold", reason));
        }
    }
    // The integer engine accumulates in 32 bits; refuse weights that could overflow them.
    let x_max: i64 = if first { 255 } else { (1 << ACT_BITS) - 1 };
    let per_output = layer.weights.values.len() / n;
    for (o, filter) in layer.weights.values.chunks(per_output.max(1)).enumerate() {
        let bound: i64 = filter.iter().map(|w| w.abs() * x_max).sum();
        if bound > i64::from(i32::MAX) {
            let reason = format!("output {o} could reach a potential of {bound}, over 32 bits");
            return Err(layer_error(layer, "weights", reason));
        }
    }
    Ok(())
}

/// How the float model's values map onto one layer's integers.
struct LayerScales<'a> {
    name: &'a str,
    kind: LayerKind,
    /// Float value of one unit of the layer's integer input.
    input_scale: f64,
    /// Largest integer input.
    input_max: i64,
}

/// Threshold and activation step of each output, given its integer weights, float weight
/// scale and float bias: the integer activation `ceil((acc - threshold) / step)` equals the
/// training activation `round((acc * s_acc + bias) / ACT_STEP)` up to rounding the step to
/// sixteenths and the threshold to an integer.
fn hidden_activation(
    scales: &LayerScales,
    weights: &[i64],
    weight_scale: &[f32],
    bias: &[f32],
) -> Result<(Vec<i64>, Vec<f32>), ExportError> {
    let n = bias.len();
    let per_output = weights.len() / n;
    let mut thresholds = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    for (o, filter) in weights.chunks(per_output).enumerate() {
        let bias = f64::from(bias[o]);
        if filter.iter().all(|&w| w == 0) {
            // A dead filter's potential is always 0, so its output is its bias alone.
            let level = (bias / qat::ACT_STEP)
                .round()
                .clamp(0.0, qat::ACT_MAX as f64);
            thresholds.push(-(level as i64));
            steps.push(1.0);
            continue;
        }
        let s_acc = scales.input_scale * f64::from(weight_scale[o]);
        let sixteenths = (16.0 * qat::ACT_STEP / s_acc).round().max(1.0);
        let step = sixteenths / 16.0;
        if step > f64::from(scales.kind.act_step_max()) {
            return Err(ExportError::Layer {
                layer: scales.name.to_string(),
                field: "act_step",
                reason: format!(
                    "output {o} needs a step of {step}, over the chip's {} (its weights are \
                     almost zero)",
                    scales.kind.act_step_max()
                ),
            });
        }
        let ideal = (step / 2.0 - bias / s_acc).round();
        // A threshold beyond the reachable potentials behaves exactly like one just past
        // them; clamping keeps it within the chip's threshold bits without changing outputs.
        let bound: i64 = filter.iter().map(|w| w.abs() * scales.input_max).sum();
        let q = sixteenths as i64;
        let lowest = -(bound + 14 * q / 16 + 1);
        let threshold = if ideal.is_finite() {
            (ideal as i64).clamp(lowest, bound)
        } else if ideal > 0.0 {
            bound
        } else {
            lowest
        };
        thresholds.push(threshold);
        steps.push(step as f32);
    }
    Ok((thresholds, steps))
}

fn ints(t: &Tensor) -> Vec<i64> {
    qat::to_vec(t).into_iter().map(|v| v as i64).collect()
}

fn dims(t: &Tensor) -> Vec<usize> {
    t.size().into_iter().map(|d| d as usize).collect()
}

/// Exports a trained Akida-class model for inputs of `height` x `width` pixels (after the
/// zero padding, so multiples of 8).
pub fn from_model(model: &Cnn, height: i64, width: i64) -> Result<Export, ExportError> {
    if model.architecture() != Architecture::AkidaCnn {
        return Err(ExportError::Model(format!(
            "only {} models run on Akida, this is {}",
            Architecture::AkidaCnn.as_str(),
            model.architecture().as_str()
        )));
    }
    if height <= 0
        || width <= 0
        || height % qat::SIDE_MULTIPLE != 0
        || width % qat::SIDE_MULTIPLE != 0
    {
        return Err(ExportError::Model(format!(
            "input {height}x{width}: both sides must be positive multiples of {}",
            qat::SIDE_MULTIPLE
        )));
    }
    let _guard = tch::no_grad_guard();
    let blocks: Vec<_> = model.conv_blocks().collect();
    let mut layers = Vec::new();
    let (mut h, mut w) = (height as usize, width as usize);
    let mut input_scale = 1.0 / qat::INPUT_LEVELS;
    let mut input_max = qat::INPUT_LEVELS as i64;
    let mut channels = 0;
    for (i, (conv, bn)) in blocks.iter().enumerate() {
        let (folded, bias) = qat::fold_batch_norm(conv, bn);
        let kind = if i == 0 {
            LayerKind::InputConv
        } else {
            LayerKind::Conv
        };
        let (max, min_scale) = qat::conv_quantisation(i);
        let (q, scale) = qat::quantise_weights(&folded, max, Granularity::PerChannel, min_scale);
        let shape = dims(&q);
        let name = format!("conv{}", i + 1);
        let scales = LayerScales {
            name: &name,
            kind,
            input_scale,
            input_max,
        };
        let values = ints(&q);
        let (threshold, act_step) =
            hidden_activation(&scales, &values, &qat::to_vec(&scale), &qat::to_vec(&bias))?;
        // Every block but the last max-pools; the chip cannot pool into a dense layer.
        let pool = if i + 1 < blocks.len() { 2 } else { 0 };
        if i == 0 {
            channels = shape[1];
        }
        layers.push(Layer {
            name,
            kind,
            weight_bits: kind.weight_bits(),
            act_bits: ACT_BITS,
            units: None,
            kernel: Some(shape[2]),
            filters: Some(shape[0]),
            stride: Some(1),
            padding: Some("same".into()),
            pool: Some(pool),
            weights: IntArray { shape, values },
            threshold,
            act_step,
        });
        if pool == 2 {
            (h, w) = (h / 2, w / 2);
        }
        input_scale = qat::ACT_STEP;
        input_max = qat::ACT_MAX;
    }
    let [fc1, fc2] = model.linear_layers();
    let features = layers.last().and_then(|l| l.filters).unwrap_or(0);
    layers.push(dense_over_average(fc1, (h, w, features))?);
    layers.push(classifier(fc2)?);
    let export = Export {
        format: FORMAT.into(),
        input: InputShape {
            height: height as usize,
            width: width as usize,
            channels,
        },
        classes: layers.last().and_then(|l| l.units).unwrap_or(0),
        layers,
    };
    export.validate()?;
    Ok(export)
}

/// `fc1` over the 2x2 average of the `(h, w, c)` map, as one dense layer over the whole
/// map: each weight repeated over its block, the block's size folded into the scale.
fn dense_over_average(
    fc: &tch::nn::Linear,
    (h, w, c): (usize, usize, usize),
) -> Result<Layer, ExportError> {
    let side = POOLED_SIDE as usize;
    if h % side != 0 || w % side != 0 {
        return Err(ExportError::Model(format!(
            "a {h}x{w} map does not split into {side}x{side} equal blocks"
        )));
    }
    let (bh, bw) = (h / side, w / side);
    let min_scale = qat::dense_min_weight_scale((bh * bw) as i64);
    let (q, scale) =
        qat::quantise_weights(&fc.ws, qat::WEIGHT_MAX, Granularity::PerChannel, min_scale);
    let shape = dims(&q);
    let (units, inputs) = (shape[0], shape[1]);
    if inputs != c * side * side {
        return Err(ExportError::Model(format!(
            "fc1 takes {inputs} inputs, which is not a {side}x{side} pool of a {h}x{w}x{c} map"
        )));
    }
    let pooled = ints(&q);
    let mut values = Vec::with_capacity(units * h * w * c);
    for j in 0..units {
        let row = &pooled[j * inputs..(j + 1) * inputs];
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    // PyTorch flattens the pooled map in (c, y, x) order.
                    values.push(row[(ch * side + y / bh) * side + x / bw]);
                }
            }
        }
    }
    let bias = match &fc.bs {
        Some(b) => qat::to_vec(b),
        None => vec![0.0; units],
    };
    let scales = LayerScales {
        name: "fc1",
        kind: LayerKind::Dense,
        input_scale: qat::ACT_STEP / (bh * bw) as f64,
        input_max: qat::ACT_MAX,
    };
    let (threshold, act_step) = hidden_activation(&scales, &values, &qat::to_vec(&scale), &bias)?;
    let weights = IntArray {
        shape: vec![units, h * w * c],
        values,
    };
    Ok(dense_layer("fc1", ACT_BITS, weights, threshold, act_step))
}

/// `fc2`, the classifier: raw potentials, its bias carried as a host-side threshold.
fn classifier(fc: &tch::nn::Linear) -> Result<Layer, ExportError> {
    let (q, scale) = qat::quantise_weights(
        &fc.ws,
        qat::WEIGHT_MAX,
        Granularity::PerTensor,
        qat::LAST_MIN_WEIGHT_SCALE,
    );
    let shape = dims(&q);
    let units = shape[0];
    let s_acc = qat::ACT_STEP * f64::from(qat::to_vec(&scale)[0]);
    let bias = match &fc.bs {
        Some(b) => qat::to_vec(b),
        None => vec![0.0; units],
    };
    let mut threshold = Vec::with_capacity(units);
    for (o, b) in bias.iter().enumerate() {
        let t = (-f64::from(*b) / s_acc).round();
        if !(t.is_finite() && t.abs() <= f64::from(i32::MAX)) {
            return Err(ExportError::Layer {
                layer: "fc2".into(),
                field: "threshold",
                reason: format!("bias of output {o} is {b}, {t} in potential units: over 32 bits"),
            });
        }
        threshold.push(t as i64);
    }
    // Unused by the integer engine; Akida's predict() divides by it, so that predict()
    // gives the float model's logits.
    let step = ((16.0 / s_acc).round().max(1.0) / 16.0) as f32;
    let weights = IntArray {
        shape,
        values: ints(&q),
    };
    Ok(dense_layer("fc2", 0, weights, threshold, vec![step; units]))
}

/// A fully connected layer of `weights` (`[units][inputs]`); `act_bits` 0 for none.
fn dense_layer(
    name: &str,
    act_bits: u32,
    weights: IntArray,
    threshold: Vec<i64>,
    act_step: Vec<f32>,
) -> Layer {
    Layer {
        name: name.into(),
        kind: LayerKind::Dense,
        weight_bits: LayerKind::Dense.weight_bits(),
        act_bits,
        units: Some(weights.shape[0]),
        kernel: None,
        filters: None,
        stride: None,
        padding: None,
        pool: None,
        weights,
        threshold,
        act_step,
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerKind::InputConv => "input_conv",
            LayerKind::Conv => "conv",
            LayerKind::Dense => "dense",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"{
        "format": "edgesync-akida-v1",
        "input": {"height": 4, "width": 4, "channels": 1},
        "classes": 2,
        "layers": [
            {"name": "conv1", "kind": "input_conv", "weight_bits": 8, "act_bits": 4,
             "kernel": 1, "filters": 1, "stride": 1, "padding": "same", "pool": 2,
             "weights": [[[[-128]]]], "threshold": [-8388608], "act_step": [1048575]},
            {"name": "conv2", "kind": "conv", "weight_bits": 4, "act_bits": 4,
             "kernel": 3, "filters": 1, "stride": 1, "padding": "same", "pool": 0,
             "weights": [[[[7, -7, 0], [1, 2, 3], [0, 0, 0]]]],
             "threshold": [524287], "act_step": [0.0625]},
            {"name": "fc2", "kind": "dense", "weight_bits": 4, "act_bits": 0,
             "units": 2, "weights": [[1, 2, 3, 4], [0, 0, 0, 0]],
             "threshold": [5, -5], "act_step": [1, 1]}
        ]
    }"#;

    fn small() -> Export {
        serde_json::from_str(SMALL).unwrap()
    }

    fn load_text(text: &str) -> Result<Export, ExportError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        std::fs::write(&path, text).unwrap();
        Export::load(&path)
    }

    #[test]
    fn accepts_the_edges_of_every_range_and_round_trips() {
        let export = small();
        export.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        export.save(&path).unwrap();
        assert_eq!(Export::load(&path).unwrap(), export);
        let geometry = export.geometry().unwrap();
        assert_eq!(geometry[1].input, (2, 2, 1));
        assert_eq!(geometry[2].output, (1, 1, 2));
    }

    fn invalid(change: impl FnOnce(&mut Export)) -> String {
        let mut export = small();
        change(&mut export);
        export.validate().unwrap_err().to_string()
    }

    #[test]
    fn out_of_range_values_are_named_by_layer_and_field() {
        let err = invalid(|e| e.layers[1].weights.values[0] = -8);
        assert_eq!(err, "layer conv2, field weights: -8 is outside [-7, 7]");
        let err = invalid(|e| e.layers[1].threshold[0] = 524_288);
        assert!(
            err.starts_with("layer conv2, field threshold: 524288"),
            "{err}"
        );
        assert!(err.contains("20-bit"), "{err}");
        let err = invalid(|e| e.layers[0].threshold[0] = -8_388_609);
        assert!(
            err.contains("layer conv1, field threshold") && err.contains("24-bit"),
            "{err}"
        );
        let err = invalid(|e| e.layers[1].act_step[0] = 0.05);
        assert!(
            err.starts_with("layer conv2, field act_step: 0.05"),
            "{err}"
        );
        let err = invalid(|e| e.layers[1].act_step[0] = 65_536.0);
        assert!(err.starts_with("layer conv2, field act_step"), "{err}");
        let err = invalid(|e| e.layers[0].weights.values[0] = 0);
        assert!(
            err.starts_with("layer conv1, field weights: all zero"),
            "{err}"
        );
    }

    #[test]
    fn structural_mistakes_are_named() {
        let err = invalid(|e| e.layers[2].weights.shape = vec![2, 2, 2]);
        assert!(
            err.starts_with("layer fc2, field weights: shape [2, 2, 2]"),
            "{err}"
        );
        let err = invalid(|e| e.layers[1].kernel = Some(2));
        assert_eq!(err, "layer conv2, field kernel: 2: must be odd");
        let err = invalid(|e| e.layers[1].act_bits = 0);
        assert!(err.starts_with("layer conv2, field act_bits: 0"), "{err}");
        let err = invalid(|e| e.layers[2].act_bits = 4);
        assert!(err.starts_with("layer fc2, field act_bits: 4"), "{err}");
        let err = invalid(|e| e.layers[1].kind = LayerKind::InputConv);
        assert!(err.starts_with("layer conv2, field kind"), "{err}");
        let err = invalid(|e| e.layers[0].pool = Some(3));
        assert_eq!(err, "layer conv1, field pool: 3: must be 0 or 2");
        let err = invalid(|e| {
            e.layers[2].threshold.pop();
        });
        assert_eq!(err, "layer fc2, field threshold: 1 values for 2 outputs");
        let err = invalid(|e| e.classes = 3);
        assert!(err.starts_with("field classes: 3 classes"), "{err}");
        let err = invalid(|e| e.format = "edgesync-akida-v2".into());
        assert!(err.starts_with("field format"), "{err}");
    }

    #[test]
    fn unreadable_json_names_the_file_and_the_place() {
        let err = load_text(&SMALL.replace("[1, 2, 3, 4]", "[1, 2.5, 3, 4]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.json") && err.contains("layers[2].weights"),
            "{err}"
        );
        assert!(err.contains("2.5 is not an integer"), "{err}");
        let err = load_text(&SMALL.replace("[1, 2, 3, 4]", "[1, 2, 3]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ragged array"), "{err}");
        let err = load_text(&SMALL.replace("\"act_bits\": 0", "\"act_bits\": 0, \"bias\": 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers[2]") && err.contains("bias"), "{err}");
        let err =
            load_text(&SMALL.replace("\"threshold\": [5, -5]", "\"threshold\": [600000, -5]"));
        // Only hidden layers are held to the chip's threshold bits.
        assert!(err.is_ok(), "{err:?}");
    }
}
