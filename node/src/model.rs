//! The CNNs nodes train.
//!
//! Both architectures are the same network at two widths, with PyTorch-style parameter
//! names (`conv1.weight`, `bn1.running_mean`, `fc2.bias`, …) so that checkpoints load in
//! PyTorch and so that the narrow model's parameters line up with slices of the wide one's.
//!
//! - Jetson class: three conv blocks of 32, 64 and 128 channels (3x3 convolution, batch
//!   norm, ReLU, 2x2 max-pool), then a 256-unit hidden layer with dropout and 10 outputs.
//! - Akida class: half the channels (16, 32, 64), a 128-unit hidden layer, one input
//!   channel, laid out so that the AKD1000 runs it whole: no max-pool after the third conv
//!   block (the chip cannot max-pool into a fully connected layer), inputs zero-padded to a
//!   multiple of 8 pixels (28x28 digits become 32x32), and always trained quantisation-aware
//!   ([`crate::akida::qat`]): batch norm folded into the convolutions, 8-bit first-layer and
//!   4-bit other weights, 4-bit activations (a ReLU capped at 6). Its float forward pass is
//!   then what the integer export computes, up to rounding of thresholds.
//!
//! The feature map is average-pooled to a fixed 2x2 grid before the classifier, so the same
//! architecture serves 28x28 and 32x32 inputs while keeping coarse spatial layout. For the
//! Akida class that grid is made of exact 4x4 blocks of the 8x8 map, so the export folds the
//! average into the first fully connected layer's weights.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::akida::qat::{self, Granularity};
use crate::data::Normalize;

/// Side of the grid the last feature map is pooled to.
pub const POOLED_SIDE: i64 = 2;

/// Share of each training batch's statistics that a batch norm's running statistics take.
pub const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// Which network a node trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Full-width CNN for GPU-class devices.
    JetsonCnn,
    /// Half-width CNN with bounded activations, for Akida-class devices.
    AkidaCnn,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::JetsonCnn => "jetson-cnn",
            Architecture::AkidaCnn => "akida-cnn",
        }
    }

    /// Dropout before the classifier: the Akida class, with fewer units, drops fewer.
    fn dropout(self) -> f64 {
        match self {
            Architecture::JetsonCnn => 0.5,
            Architecture::AkidaCnn => 0.25,
        }
    }

    fn widths(self) -> ([i64; 3], i64) {
        match self {
            Architecture::JetsonCnn => ([32, 64, 128], 256),
            Architecture::AkidaCnn => ([16, 32, 64], 128),
        }
    }
}

/// Everything that fixes a model's parameter shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub in_channels: i64,
    pub classes: i64,
}

/// A conv block: convolution, batch norm, activation, 2x2 max-pool.
#[derive(Debug)]
struct ConvBlock {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

#[derive(Debug)]
pub struct Cnn {
    blocks: Vec<ConvBlock>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
    architecture: Architecture,
    /// The normalisation inputs arrive with; the Akida model undoes it, since the chip sees
    /// raw pixels and pads with zeros.
    normalize: Normalize,
}

impl Cnn {
    pub fn new(root: &nn::Path, spec: ModelSpec) -> Cnn {
        let (widths, hidden) = spec.architecture.widths();
        let conv_cfg = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let bn_cfg = nn::BatchNormConfig {
            momentum: BATCH_NORM_MOMENTUM,
            ..Default::default()
        };
        let mut blocks = Vec::new();
        let mut channels = spec.in_channels;
        for (i, &width) in widths.iter().enumerate() {
            let n = i + 1;
            blocks.push(ConvBlock {
                conv: nn::conv2d(root / format!("conv{n}"), channels, width, 3, conv_cfg),
                bn: nn::batch_norm2d(root / format!("bn{n}"), width, bn_cfg),
            });
            channels = width;
        }
        let features = channels * POOLED_SIDE * POOLED_SIDE;
        Cnn {
            blocks,
            fc1: nn::linear(root / "fc1", features, hidden, Default::default()),
            fc2: nn::linear(root / "fc2", hidden, spec.classes, Default::default()),
            dropout: spec.architecture.dropout(),
            architecture: spec.architecture,
            normalize: Normalize::default(),
        }
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }
}

impl Cnn {
    /// The Akida model's quantisation-aware forward pass (see [`qat`]).
    fn forward_akida(&self, xs: &Tensor, train: bool) -> Tensor {
        let layers = QatLayers {
            blocks: self
                .blocks
                .iter()
                .map(|b| qat::ConvBn::of(&b.conv, &b.bn))
                .collect(),
            running: Some(self.blocks.iter().map(|b| &b.bn).collect()),
            fc1: linear_tensors(&self.fc1),
            fc2: linear_tensors(&self.fc2),
        };
        let pixels = qat::input_pixels(xs, self.normalize);
        layers.forward(pixels, self.dropout, train)
    }

    /// The fully connected layers, for the export.
    pub(crate) fn linear_layers(&self) -> [&nn::Linear; 2] {
        [&self.fc1, &self.fc2]
    }

    /// Each conv block's convolution and batch norm, for the export.
    pub(crate) fn conv_blocks(&self) -> impl Iterator<Item = (&nn::Conv2D, &nn::BatchNorm)> {
        self.blocks.iter().map(|b| (&b.conv, &b.bn))
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.architecture == Architecture::AkidaCnn {
            return self.forward_akida(xs, train);
        }
        let mut xs = xs.shallow_clone();
        for block in &self.blocks {
            let ys = xs.apply(&block.conv).apply_t(&block.bn, train);
            xs = ys.relu().max_pool2d_default(2);
        }
        let xs = xs
            .adaptive_avg_pool2d([POOLED_SIDE, POOLED_SIDE])
            .flatten(1, -1)
            .apply(&self.fc1);
        xs.relu().dropout(self.dropout, train).apply(&self.fc2)
    }
}

/// A linear layer's weight and bias, sharing storage with it.
fn linear_tensors(layer: &nn::Linear) -> (Tensor, Option<Tensor>) {
    (
        layer.ws.shallow_clone(),
        layer.bs.as_ref().map(Tensor::shallow_clone),
    )
}

/// The tensors the Akida-class forward pass runs on: the Akida model's own, or the
/// leading slices of a wider model's (see [`SubNetwork`]).
struct QatLayers<'a> {
    blocks: Vec<qat::ConvBn>,
    /// Batch norms whose running statistics training updates and evaluation folds with. A
    /// sub-network has none: it only trains, normalising with each batch's statistics.
    running: Option<Vec<&'a nn::BatchNorm>>,
    fc1: (Tensor, Option<Tensor>),
    fc2: (Tensor, Option<Tensor>),
}

impl QatLayers<'_> {
    /// Logits for `pixels` (as [`qat::input_pixels`] gives them).
    fn forward(&self, pixels: Tensor, dropout: f64, train: bool) -> Tensor {
        let mut xs = pixels;
        let last_pooled = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            let running = self.running.as_ref().map(|bns| bns[i]);
            let (w, b) = match running {
                Some(bn) if !train => block.fold_running(bn),
                _ => block.fold_batch(&xs, running),
            };
            let (max, min_scale) = qat::conv_quantisation(i);
            let w = qat::fake_quant_weights(&w, max, Granularity::PerChannel, min_scale);
            let ys = xs.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1);
            xs = qat::fake_quant_activation(&ys);
            if i < last_pooled {
                xs = xs.max_pool2d_default(2);
            }
        }
        let size = xs.size();
        let block_area = (size[2] / POOLED_SIDE) * (size[3] / POOLED_SIDE);
        let xs = xs
            .adaptive_avg_pool2d([POOLED_SIDE, POOLED_SIDE])
            .flatten(1, -1);
        let min_scale = qat::dense_min_weight_scale(block_area);
        let (fc1_w, fc1_b) = &self.fc1;
        let w1 =
            qat::fake_quant_weights(fc1_w, qat::WEIGHT_MAX, Granularity::PerChannel, min_scale);
        let hidden = qat::fake_quant_activation(&xs.linear(&w1, fc1_b.as_ref()));
        let (fc2_w, fc2_b) = &self.fc2;
        let w2 = qat::fake_quant_weights(
            fc2_w,
            qat::WEIGHT_MAX,
            Granularity::PerTensor,
            qat::LAST_MIN_WEIGHT_SCALE,
        );
        hidden.dropout(dropout, train).linear(&w2, fc2_b.as_ref())
    }
}

/// The leading channels of a wider network, trained as the narrower member that holds
/// them.
///
/// A narrower member of the federation (an Akida-class model) holds exactly the leading
/// channels of every layer of this model (see `federation::alignment`) and averages them
/// with this model's. Those channels only help it if they work as its network: without the
/// rest, on its kind of input, through its quantised arithmetic. So a node with such a
/// neighbour also trains them each step exactly as the neighbour runs them, in the manner of
/// nested ("ordered") dropout (FjORD, Horvath et al., 2021): the slices go through the
/// Akida-class forward pass, on this node's images turned grey and resized as the
/// neighbour's are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubNetwork {
    /// Share of every layer's channels kept, in (0, 1].
    pub fraction: f64,
    /// Feed the sub-network grey images (the luma of each input), as the narrower member
    /// sees them; its first-layer kernel is then the sum of this model's colour kernels.
    pub grey: bool,
    /// Side the narrower member's images are resized to, where it has one.
    pub input_side: Option<i64>,
}

impl Cnn {
    /// The training-mode forward pass of `sub`. Batch norm normalises with the batch's own
    /// statistics and leaves the running ones, which describe the whole network, alone.
    pub fn forward_sub_network(&self, xs: &Tensor, sub: SubNetwork) -> Tensor {
        self.sub_network_logits(xs, sub, Architecture::AkidaCnn.dropout())
    }

    fn sub_network_logits(&self, xs: &Tensor, sub: SubNetwork, dropout: f64) -> Tensor {
        let keep = |channels: i64| ((channels as f64 * sub.fraction).round() as i64).max(1);
        let grey = sub.grey && xs.size()[1] == 3;
        let mut blocks = Vec::new();
        let mut kept_inputs = None;
        for block in &self.blocks {
            let kept = keep(block.conv.ws.size()[0]);
            let leading = |t: &Tensor| t.narrow(0, 0, kept);
            let filters = leading(&block.conv.ws);
            let weight = match kept_inputs {
                Some(inputs) => filters.narrow(1, 0, inputs),
                None if grey => filters.sum_dim_intlist([1i64].as_slice(), true, filters.kind()),
                None => filters,
            };
            blocks.push(qat::ConvBn {
                weight,
                bias: block.conv.bs.as_ref().map(leading),
                gamma: block.bn.ws.as_ref().map(leading),
                beta: block.bn.bs.as_ref().map(leading),
            });
            kept_inputs = Some(kept);
        }
        let features = kept_inputs.unwrap_or(1) * POOLED_SIDE * POOLED_SIDE;
        let hidden = keep(self.fc1.ws.size()[0]);
        let layers = QatLayers {
            blocks,
            running: None,
            fc1: (
                self.fc1.ws.narrow(0, 0, hidden).narrow(1, 0, features),
                self.fc1.bs.as_ref().map(|b| b.narrow(0, 0, hidden)),
            ),
            fc2: (
                self.fc2.ws.narrow(1, 0, hidden),
                self.fc2.bs.as_ref().map(Tensor::shallow_clone),
            ),
        };
        let pixels = qat::input_pixels(&narrower_input(xs, sub, grey), self.normalize);
        layers.forward(pixels, dropout, true)
    }
}

/// This node's normalised images as the narrower member would see them: grey (the luma,
/// which commutes with the normalisation since its weights sum to one) and resized with
/// the antialiased filter the data loader uses.
fn narrower_input(xs: &Tensor, sub: SubNetwork, grey: bool) -> Tensor {
    let xs = if grey {
        let luma = Tensor::from_slice(&crate::data::transform::LUMA)
            .to_kind(xs.kind())
            .to_device(xs.device())
            .view([1, 3, 1, 1]);
        (xs * luma).sum_dim_intlist([1i64].as_slice(), true, xs.kind())
    } else {
        xs.shallow_clone()
    };
    let size = xs.size();
    match sub.input_side {
        Some(side) if side != size[2] || side != size[3] => {
            xs.internal_upsample_bilinear2d_aa([side, side], false, None, None)
        }
        _ => xs,
    }
}

/// Stores every 4-d parameter (the convolution kernels) in channels-last layout.
///
/// oneDNN's CPU convolutions run markedly faster on NHWC data; with kernels and inputs
/// both channels-last, libtorch keeps activations and gradients in that layout end to end.
/// Shapes and names are unchanged, so nothing else has to know.
pub fn use_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            if var.dim() == 4 {
                let nhwc = to_channels_last(&var);
                var.set_data(&nhwc);
            }
        }
    });
}

/// The same `[N, C, H, W]` tensor with channels-last strides.
pub fn to_channels_last(xs: &Tensor) -> Tensor {
    xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A digest of the architecture and every parameter's name and shape: two models can
/// exchange parameters tensor for tensor exactly when their fingerprints are equal.
pub fn fingerprint(architecture: Architecture, vs: &nn::VarStore) -> String {
    let mut vars: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.size()))
        .collect();
    vars.sort();
    let mut hasher = Sha256::new();
    hasher.update(architecture.as_str());
    for (name, shape) in vars {
        hasher.update(format!("|{name}:{shape:?}"));
    }
    hex::encode(&hasher.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn the_sub_network_ignores_every_channel_past_its_share() {
        let (vs, model) = build(Architecture::JetsonCnn, 3);
        let sub = SubNetwork {
            fraction: 0.5,
            grey: true,
            input_side: Some(28),
        };
        let xs = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        // Without dropout, whose mask would come from the process-wide generator.
        let run = |xs: &Tensor| tch::no_grad(|| model.sub_network_logits(xs, sub, 0.0));
        let before = run(&xs);
        let running_mean = vs.variables()["bn1.running_mean"].copy();

        // The trailing half of every layer, changed, changes nothing.
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                let trailing = var.size()[0] / 2;
                if name.ends_with("weight") && !name.starts_with("fc2") {
                    let _ = var.narrow(0, trailing, trailing).fill_(7.0);
                }
            }
        });
        assert!(run(&xs).allclose(&before, 1e-5, 1e-5, false));
        assert!(vs.variables()["bn1.running_mean"].equal(&running_mean));

        // Grey input: only the luma of the colours matters.
        let luma = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]);
        let grey = (&xs * &luma).sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        assert!(run(&grey.expand_as(&xs)).allclose(&before, 1e-4, 1e-4, false));
    }

    #[test]
    fn the_sub_network_computes_what_the_akida_model_holding_its_slices_computes() {
        let (jetson_vs, jetson) = build(Architecture::JetsonCnn, 3);
        let (akida_vs, mut akida) = build(Architecture::AkidaCnn, 1);
        akida.dropout = 0.0;

        // The Akida model takes the leading slice of every Jetson tensor; its grey first
        // layer takes the sum of the colour kernels.
        let wide = jetson_vs.variables();
        tch::no_grad(|| {
            for (name, mut var) in akida_vs.variables() {
                let mut slice = wide[&name].shallow_clone();
                for (dim, &size) in var.size().iter().enumerate() {
                    slice = slice.narrow(dim as i64, 0, size);
                }
                if name == "conv1.weight" {
                    let colours = wide[&name].narrow(0, 0, var.size()[0]);
                    slice = colours.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
                }
                var.copy_(&slice);
            }
        });

        let sub = SubNetwork {
            fraction: 0.5,
            grey: true,
            input_side: Some(28),
        };
        let colour = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let luma = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]);
        let grey_28 = (&colour * &luma)
            .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
            .internal_upsample_bilinear2d_aa([28, 28], false, None, None);
        let (from_slices, from_akida) = tch::no_grad(|| {
            let from_slices = jetson.sub_network_logits(&colour, sub, 0.0);
            (from_slices, akida.forward_t(&grey_28, true))
        });
        assert_eq!(from_slices.size(), vec![8, 10]);
        assert!(
            from_slices.allclose(&from_akida, 1e-4, 1e-4, false),
            "{:?}",
            (&from_slices - &from_akida).abs().max()
        );
    }

    fn build(architecture: Architecture, in_channels: i64) -> (nn::VarStore, Cnn) {
        let vs = nn::VarStore::new(Device::Cpu);
        let spec = ModelSpec {
            architecture,
            in_channels,
            classes: 10,
        };
        let model = Cnn::new(&vs.root(), spec);
        (vs, model)
    }

    #[test]
    fn same_architecture_serves_28_and_32_pixel_inputs() {
        for (arch, channels) in [(Architecture::JetsonCnn, 3), (Architecture::AkidaCnn, 1)] {
            let (_vs, model) = build(arch, channels);
            for side in [28, 32] {
                let xs = Tensor::randn([2, channels, side, side], (Kind::Float, Device::Cpu));
                assert_eq!(model.forward_t(&xs, false).size(), vec![2, 10]);
            }
        }
    }

    #[test]
    fn parameter_names_follow_pytorch_conventions() {
        let (vs, _) = build(Architecture::JetsonCnn, 3);
        let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        for expected in ["conv1.weight", "bn3.running_var", "fc1.weight", "fc2.bias"] {
            assert!(
                names.contains(expected),
                "{expected} missing from {names:?}"
            );
        }
        assert_eq!(vs.variables()["fc1.weight"].size(), vec![256, 128 * 4]);
    }

    #[test]
    fn akida_model_sees_digits_zero_padded_to_32_pixels() {
        let (vs, model) = build(Architecture::AkidaCnn, 1);
        assert_eq!(vs.variables()["fc1.weight"].size(), vec![128, 64 * 4]);
        let norm = Normalize::default();
        let bytes = Tensor::randint(256, [3, 1, 28, 28], (Kind::Float, Device::Cpu));
        // Black (byte 0) border pixels around a 28x28 image are what the model pads with.
        let padded = bytes.constant_pad_nd([2, 2, 2, 2]);
        let normalised = |t: &Tensor| (t / 255.0 - norm.mean) / norm.std;
        let small = model.forward_t(&normalised(&bytes), false);
        let large = model.forward_t(&normalised(&padded), false);
        let diff = (small - large).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn channels_last_keeps_values_and_outputs() {
        let (vs, model) = build(Architecture::JetsonCnn, 3);
        let xs = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let before = model.forward_t(&xs, false);
        use_channels_last(&vs);
        let w = &vs.variables()["conv2.weight"];
        assert_eq!(w.stride()[1], 1, "channels must be the innermost dimension");
        let after = model.forward_t(&to_channels_last(&xs), false);
        let diff = (before - after).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn fingerprints_differ_between_architectures_and_inputs() {
        let jetson = fingerprint(
            Architecture::JetsonCnn,
            &build(Architecture::JetsonCnn, 3).0,
        );
        let again = fingerprint(
            Architecture::JetsonCnn,
            &build(Architecture::JetsonCnn, 3).0,
        );
        let gray = fingerprint(
            Architecture::JetsonCnn,
            &build(Architecture::JetsonCnn, 1).0,
        );
        let akida = fingerprint(Architecture::AkidaCnn, &build(Architecture::AkidaCnn, 1).0);
        assert_eq!(jetson, again);
        assert_ne!(jetson, gray);
        assert_ne!(gray, akida);
    }
}
