//! A bit-exact integer forward pass of an `edgesync-akida-v1` export: what an Akida IP v1
//! model built from the export computes (the Rust port of `scripts/akida/reference.py`,
//! which is checked against the `akida` package).
//!
//! Per layer, on `uint8` NHWC input:
//! - `acc` = "same" convolution (zero padding, stride 1, cross-correlation) or, for a dense
//!   layer, the dot product with the input flattened in `(h, w, c)` order;
//! - 2x2 max-pool of `acc` when the layer pools;
//! - hidden layers: `out = 0` if `acc <= threshold`, else
//!   `min(15, ceil(16 * (acc - threshold) / q))` with `q = floor(16 * act_step)`;
//! - the last layer returns `acc`, the raw `int32` potentials; the class is the first
//!   argmax of `acc - threshold`.

use rayon::prelude::*;

use super::export::{Export, ExportError, InputShape, LayerKind};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(
        "image buffer holds {found} bytes, not a multiple of one {height}x{width}x{channels} image"
    )]
    ImageSize {
        found: usize,
        height: usize,
        width: usize,
        channels: usize,
    },
}

#[derive(Debug, Clone)]
enum Op {
    /// Weights `[out][kh][kw][in]`.
    Conv { kernel: usize, pool: bool },
    /// Weights `[out][in]`.
    Dense,
}

#[derive(Debug, Clone)]
struct Prepared {
    op: Op,
    input: (usize, usize, usize),
    outputs: usize,
    weights: Vec<i32>,
    threshold: Vec<i64>,
    /// `floor(16 * act_step)` per output; empty for the last layer.
    sixteenths: Vec<i64>,
    act_max: i64,
}

/// A validated export, ready to classify images.
#[derive(Debug, Clone)]
pub struct Engine {
    input: InputShape,
    layers: Vec<Prepared>,
    classes: usize,
    scores_offset: Vec<i64>,
}

/// What the engine computed for a batch of images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    /// `[N][classes]` raw potentials of the last layer.
    pub potentials: Vec<i32>,
    pub predictions: Vec<usize>,
}

impl Engine {
    pub fn new(export: &Export) -> Result<Engine, EngineError> {
        export.validate()?;
        let geometry = export.geometry()?;
        let last = export.layers.len() - 1;
        let mut layers = Vec::with_capacity(export.layers.len());
        for (i, (layer, geo)) in export.layers.iter().zip(geometry).enumerate() {
            let n = layer.weights.shape[0];
            let (op, weights) = match layer.kind {
                LayerKind::Dense => (
                    Op::Dense,
                    layer.weights.values.iter().map(|&v| v as i32).collect(),
                ),
                LayerKind::InputConv | LayerKind::Conv => {
                    // Validated as [out][in][k][k].
                    let (c, k) = (layer.weights.shape[1], layer.weights.shape[2]);
                    // [out][in][kh][kw] to [out][kh][kw][in], so the inner loop runs over
                    // the channels an NHWC pixel holds contiguously.
                    let v = &layer.weights.values;
                    let mut w = Vec::with_capacity(v.len());
                    for o in 0..n {
                        for y in 0..k {
                            for x in 0..k {
                                for ch in 0..c {
                                    w.push(v[((o * c + ch) * k + y) * k + x] as i32);
                                }
                            }
                        }
                    }
                    let pool = layer.pool == Some(2);
                    (Op::Conv { kernel: k, pool }, w)
                }
            };
            let sixteenths = if i == last {
                Vec::new()
            } else {
                layer
                    .act_step
                    .iter()
                    .map(|&s| (16.0f32 * s).floor() as i64)
                    .collect()
            };
            layers.push(Prepared {
                op,
                input: geo.input,
                outputs: n,
                weights,
                threshold: layer.threshold.clone(),
                sixteenths,
                act_max: (1i64 << layer.act_bits) - 1,
            });
        }
        Ok(Engine {
            input: export.input,
            layers,
            classes: export.classes,
            scores_offset: export.layers[last].threshold.clone(),
        })
    }

    pub fn input(&self) -> InputShape {
        self.input
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Raw potentials of the last layer for one `height x width x channels` image.
    pub fn potentials(&self, image: &[u8]) -> Vec<i32> {
        let mut x: Vec<i32> = image.iter().map(|&v| i32::from(v)).collect();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let acc = layer.potentials(&x);
            x = if i == last { acc } else { layer.activate(acc) };
        }
        x
    }

    /// The predicted class: the first maximum of `potentials - threshold`.
    pub fn classify(&self, potentials: &[i32]) -> usize {
        let mut best = 0;
        let mut best_score = i64::MIN;
        for (c, (&p, &t)) in potentials.iter().zip(&self.scores_offset).enumerate() {
            let score = i64::from(p) - t;
            if score > best_score {
                (best, best_score) = (c, score);
            }
        }
        best
    }

    /// Runs a batch of NHWC `uint8` images (in parallel over images).
    pub fn run(&self, images: &[u8]) -> Result<Outputs, EngineError> {
        let size = self.input.height * self.input.width * self.input.channels;
        if images.len() % size != 0 {
            return Err(EngineError::ImageSize {
                found: images.len(),
                height: self.input.height,
                width: self.input.width,
                channels: self.input.channels,
            });
        }
        let per_image: Vec<Vec<i32>> = images
            .par_chunks(size)
            .map(|image| self.potentials(image))
            .collect();
        let predictions = per_image.iter().map(|p| self.classify(p)).collect();
        Ok(Outputs {
            potentials: per_image.concat(),
            predictions,
        })
    }
}

impl Prepared {
    /// Potentials, after pooling.
    fn potentials(&self, x: &[i32]) -> Vec<i32> {
        let (h, w, c) = self.input;
        let n = self.outputs;
        match self.op {
            Op::Dense => self
                .weights
                .chunks(x.len())
                .map(|row| dot(row, x))
                .collect(),
            Op::Conv { kernel, pool } => {
                let p = (kernel - 1) / 2;
                let mut acc = vec![0i32; h * w * n];
                for oy in 0..h {
                    for ox in 0..w {
                        let out = &mut acc[(oy * w + ox) * n..][..n];
                        for ky in 0..kernel {
                            let Some(iy) = (oy + ky).checked_sub(p).filter(|&v| v < h) else {
                                continue;
                            };
                            for kx in 0..kernel {
                                let Some(ix) = (ox + kx).checked_sub(p).filter(|&v| v < w) else {
                                    continue;
                                };
                                let pixel = &x[(iy * w + ix) * c..][..c];
                                let tap = (ky * kernel + kx) * c;
                                let stride = kernel * kernel * c;
                                for (o, sum) in out.iter_mut().enumerate() {
                                    *sum += dot(&self.weights[o * stride + tap..][..c], pixel);
                                }
                            }
                        }
                    }
                }
                if pool {
                    max_pool(&acc, h, w, n)
                } else {
                    acc
                }
            }
        }
    }

    fn activate(&self, acc: Vec<i32>) -> Vec<i32> {
        let n = self.outputs;
        acc.into_iter()
            .enumerate()
            .map(|(i, a)| {
                let o = i % n;
                let d = i64::from(a) - self.threshold[o];
                if d <= 0 {
                    0
                } else {
                    let q = self.sixteenths[o];
                    ((16 * d + q - 1) / q).min(self.act_max) as i32
                }
            })
            .collect()
    }
}

fn dot(a: &[i32], b: &[i32]) -> i32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_pool(acc: &[i32], h: usize, w: usize, n: usize) -> Vec<i32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![0i32; ph * pw * n];
    for y in 0..ph {
        for x in 0..pw {
            for o in 0..n {
                let at = |dy: usize, dx: usize| acc[((2 * y + dy) * w + 2 * x + dx) * n + o];
                out[(y * pw + x) * n + o] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pixel through a 1x1 input convolution of weight 1, threshold 10 and step 2.5,
    /// then two class scores, +activation and -activation.
    fn ramp_model() -> Export {
        let json = r#"{
            "format": "edgesync-akida-v1",
            "input": {"height": 1, "width": 1, "channels": 1},
            "classes": 2,
            "layers": [
                {"name": "conv1", "kind": "input_conv", "weight_bits": 8, "act_bits": 4,
                 "kernel": 1, "filters": 1, "stride": 1, "padding": "same", "pool": 0,
                 "weights": [[[[1]]]], "threshold": [10], "act_step": [2.5]},
                {"name": "fc2", "kind": "dense", "weight_bits": 4, "act_bits": 0,
                 "units": 2, "weights": [[1], [-1]], "threshold": [0, 3], "act_step": [1, 1]}
            ]
        }"#;
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn activation_is_the_ceiling_of_steps_above_threshold_saturating_at_15() {
        let engine = Engine::new(&ramp_model()).unwrap();
        // Pixel 15 is exactly 2 steps above the threshold: 2, not 3; one more is 3.
        for (pixel, level) in [
            (0u8, 0),
            (10, 0),
            (11, 1),
            (15, 2),
            (16, 3),
            (47, 15),
            (255, 15),
        ] {
            assert_eq!(
                engine.potentials(&[pixel]),
                vec![level, -level],
                "pixel {pixel}"
            );
        }
        // Scores are potentials minus thresholds: [0, -3] at level 0, class 0 wins.
        assert_eq!(engine.classify(&[0, 0]), 0);
        assert_eq!(engine.classify(&[0, 4]), 1);
        let out = engine.run(&[0, 16]).unwrap();
        assert_eq!(out.potentials, vec![0, 0, 3, -3]);
        assert_eq!(out.predictions, vec![0, 0]);
    }

    #[test]
    fn step_is_truncated_to_sixteenths_as_on_the_chip() {
        let mut model = ramp_model();
        // 2.53 acts as 2.5 (40/16): pixel 15 stays at exactly 2 steps.
        model.layers[0].act_step = vec![2.53];
        let engine = Engine::new(&model).unwrap();
        assert_eq!(engine.potentials(&[15]), vec![2, -2]);
    }

    #[test]
    fn a_wrongly_sized_image_buffer_is_an_error() {
        let mut model = ramp_model();
        model.input.width = 2;
        model.layers[1].weights.shape = vec![2, 2];
        model.layers[1].weights.values = vec![1, 1, -1, -1];
        let engine = Engine::new(&model).unwrap();
        let err = engine.run(&[1, 2, 3]).unwrap_err().to_string();
        assert!(err.contains("3 bytes") && err.contains("1x2x1"), "{err}");
    }
}
