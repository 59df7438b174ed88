//! Which parameters two members of different architectures hold in common, and how one's
//! tensor maps onto the other's.
//!
//! The Akida-class model is a sub-network of the Jetson-class one, in the manner of
//! HeteroFL (Diao et al., 2021): every layer keeps the first channels of the wider layer,
//! so each of its parameters is the leading slice of the corresponding Jetson parameter
//! (for `fc1`, whose inputs are the flattened channels, the leading inputs are exactly the
//! kept channels). Two members exchange through the *overlap*, the slice both hold:
//!
//! - what a neighbour sends is cut down to the overlap and kept in that shape;
//! - mixing compares it with the overlap of the node's own public estimate, and lifts the
//!   difference back into the node's shape with zeros where the neighbour holds nothing,
//!   so that each entry is averaged over the members holding it and a non-holder's weight
//!   stays with the node.
//!
//! The first layer sees one grey channel on one side and three colour channels on the
//! other. A grey image fed to a colour model has the same value in all three channels, so
//! a colour kernel acts on it as the sum of its three channel kernels: the overlap of the
//! input weight is that sum, and a difference lifted back into the colour model is spread
//! evenly, a third to each channel, which moves the sum by exactly the difference.
//!
//! A batch norm's scale and shift travel with the convolution they follow: both models
//! train with each batch's own statistics, so a channel's scale and shift mean the same on
//! either side, and a wider model trains its leading channels' through the narrower
//! model's forward pass (see [`SubNetwork`]). The running statistics stay with each
//! member: they describe one model's activations on its own data (as in FedBN), which
//! differ between the two even where the weights agree, and each member re-estimates them
//! for the weights the round leaves before it evaluates.

use edgesync_api::SharedLayers;
use tch::{Kind, Tensor};

use crate::model::SubNetwork;

/// A member's model as seen from outside: its fingerprint, its parameters' names and
/// shapes, and which of them is the input layer's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShapes {
    pub fingerprint: String,
    pub params: Vec<(String, Vec<i64>)>,
}

/// The name of the first layer's weight, whose second dimension is the input channels.
const INPUT_WEIGHT: &str = "conv1.weight";

/// How one of this node's parameters corresponds to a neighbour's.
#[derive(Debug, Clone, PartialEq)]
pub enum Alignment {
    /// The same parameter with the same shape: used whole.
    Whole,
    /// The leading `overlap` entries along every dimension are shared.
    Slice {
        overlap: Vec<i64>,
        channels: Channels,
    },
}

/// How the input channels of the first layer correspond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Channels {
    /// As any other dimension: leading slice.
    Sliced,
    /// The neighbour has colour input and this node grey: sum the neighbour's channels.
    TheirsSummed,
    /// This node has colour input and the neighbour grey: sum this node's channels.
    MineSummed,
}

/// For each of `mine`'s parameters, its alignment with `theirs`, or `None` where nothing
/// is shared. Identical fingerprints share everything whole; different ones share the
/// layers `shared` names, batch-norm running statistics never.
pub fn plan(
    mine: &ModelShapes,
    theirs: &ModelShapes,
    shared: SharedLayers,
) -> Vec<Option<Alignment>> {
    if mine.fingerprint == theirs.fingerprint {
        return mine.params.iter().map(|_| Some(Alignment::Whole)).collect();
    }
    mine.params
        .iter()
        .map(|(name, shape)| {
            if !is_shared(name, shared) {
                return None;
            }
            let (_, other) = theirs.params.iter().find(|(n, _)| n == name)?;
            between(name, shape, other)
        })
        .collect()
}

/// When a neighbour's model is a narrower sub-network of `mine` that shares the first
/// layer, the part of `mine` it holds, which this node should also train on its own. The
/// shapes do not tell the neighbour's image side: the caller fills it in.
pub fn narrower_neighbour(
    mine: &ModelShapes,
    alignment: &[Option<Alignment>],
) -> Option<SubNetwork> {
    let i = mine.params.iter().position(|(n, _)| n == INPUT_WEIGHT)?;
    let Some(Alignment::Slice { overlap, channels }) = &alignment[i] else {
        return None;
    };
    let filters = mine.params[i].1[0];
    (overlap[0] < filters).then(|| SubNetwork {
        fraction: overlap[0] as f64 / filters as f64,
        grey: *channels == Channels::MineSummed,
        input_side: None,
    })
}

fn is_shared(name: &str, shared: SharedLayers) -> bool {
    let (layer, field) = name.split_once('.').unwrap_or((name, ""));
    let batch_norm_affine = layer.starts_with("bn") && matches!(field, "weight" | "bias");
    let features = layer.starts_with("conv") || batch_norm_affine;
    match shared {
        SharedLayers::None => false,
        SharedLayers::Features => features,
        SharedLayers::All => features || layer.starts_with("fc"),
    }
}

fn between(name: &str, mine: &[i64], theirs: &[i64]) -> Option<Alignment> {
    if mine.len() != theirs.len() || mine.iter().chain(theirs).any(|&d| d < 1) {
        return None;
    }
    if mine == theirs {
        return Some(Alignment::Whole);
    }
    let mut overlap: Vec<i64> = mine.iter().zip(theirs).map(|(a, b)| *a.min(b)).collect();
    let mut channels = Channels::Sliced;
    if name == INPUT_WEIGHT && mine.len() == 4 && mine[1] != theirs[1] {
        channels = match (mine[1], theirs[1]) {
            (1, _) => Channels::TheirsSummed,
            (_, 1) => Channels::MineSummed,
            // Neither is grey: no stated rule relates, say, 3 and 4 channels.
            _ => return None,
        };
        overlap[1] = 1;
    }
    Some(Alignment::Slice { overlap, channels })
}

impl Alignment {
    /// A neighbour's tensor (or a difference of two) cut down to what is shared.
    pub fn theirs_to_overlap(&self, theirs: &Tensor) -> Tensor {
        match self {
            Alignment::Whole => theirs.shallow_clone(),
            Alignment::Slice { overlap, channels } => {
                cut(theirs, overlap, *channels == Channels::TheirsSummed)
            }
        }
    }

    /// This node's tensor cut down to what is shared.
    pub fn mine_to_overlap(&self, mine: &Tensor) -> Tensor {
        match self {
            Alignment::Whole => mine.shallow_clone(),
            Alignment::Slice { overlap, channels } => {
                cut(mine, overlap, *channels == Channels::MineSummed)
            }
        }
    }

    /// A difference in the overlap, in this node's shape: zero outside the overlap, and
    /// spread evenly over colour channels that the overlap sums.
    pub fn lift(&self, difference: Tensor, mine: &Tensor) -> Tensor {
        let Alignment::Slice { overlap, channels } = self else {
            return difference;
        };
        let full = Tensor::zeros(mine.size(), (Kind::Float, mine.device()));
        let mut region = full.shallow_clone();
        for (dim, &len) in overlap.iter().enumerate() {
            if dim == 1 && *channels == Channels::MineSummed {
                continue;
            }
            region = region.narrow(dim as i64, 0, len);
        }
        let difference = if *channels == Channels::MineSummed {
            difference / mine.size()[1] as f64
        } else {
            difference
        };
        // `copy_` broadcasts the single summed channel over all of the node's channels.
        region.copy_(&difference);
        full
    }
}

/// The leading `overlap` slice of `t`, with dimension 1 summed instead when `sum_channels`.
fn cut(t: &Tensor, overlap: &[i64], sum_channels: bool) -> Tensor {
    let mut v = t.shallow_clone();
    for (dim, &len) in overlap.iter().enumerate() {
        v = if dim == 1 && sum_channels {
            v.sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        } else {
            v.narrow(dim as i64, 0, len)
        };
    }
    v.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn shapes(fingerprint: &str, params: &[(&str, &[i64])]) -> ModelShapes {
        ModelShapes {
            fingerprint: fingerprint.into(),
            params: params
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_vec()))
                .collect(),
        }
    }

    fn jetson() -> ModelShapes {
        shapes(
            "jetson",
            &[
                ("bn1.running_mean", &[32]),
                ("bn1.weight", &[32]),
                ("conv1.weight", &[32, 3, 3, 3]),
                ("conv2.weight", &[64, 32, 3, 3]),
                ("fc2.bias", &[10]),
                ("fc2.weight", &[10, 256]),
            ],
        )
    }

    fn akida() -> ModelShapes {
        shapes(
            "akida",
            &[
                ("bn1.running_mean", &[16]),
                ("bn1.weight", &[16]),
                ("conv1.weight", &[16, 1, 3, 3]),
                ("conv2.weight", &[32, 16, 3, 3]),
                ("fc2.bias", &[10]),
                ("fc2.weight", &[10, 128]),
            ],
        )
    }

    #[test]
    fn the_smaller_model_is_a_slice_of_the_larger_batch_norm_statistics_stay_local() {
        let plan = plan(&jetson(), &akida(), SharedLayers::All);
        assert_eq!(plan[0], None, "running statistics are never shared");
        let sliced = |n| {
            Some(Alignment::Slice {
                overlap: vec![n],
                channels: Channels::Sliced,
            })
        };
        assert_eq!(
            plan[1],
            sliced(16),
            "scale and shift go with their convolution"
        );
        assert_eq!(
            plan[2],
            Some(Alignment::Slice {
                overlap: vec![16, 1, 3, 3],
                channels: Channels::MineSummed
            })
        );
        assert_eq!(
            plan[3],
            Some(Alignment::Slice {
                overlap: vec![32, 16, 3, 3],
                channels: Channels::Sliced
            })
        );
        assert_eq!(plan[4], Some(Alignment::Whole));

        let sub = narrower_neighbour(&jetson(), &plan).unwrap();
        assert_eq!((sub.fraction, sub.grey), (0.5, true));
        assert_eq!(
            narrower_neighbour(
                &akida(),
                &super::plan(&akida(), &jetson(), SharedLayers::All)
            ),
            None
        );

        let features = super::plan(&jetson(), &akida(), SharedLayers::Features);
        assert!(features[4].is_none() && features[5].is_none());
        assert!(features[1].is_some() && features[3].is_some());
        let none = super::plan(&jetson(), &akida(), SharedLayers::None);
        assert!(none.iter().all(Option::is_none));
        let same = super::plan(&jetson(), &jetson(), SharedLayers::None);
        assert!(same.iter().all(|a| *a == Some(Alignment::Whole)));
    }

    #[test]
    fn grey_and_colour_first_layers_meet_through_the_channel_sum() {
        let colour = Tensor::randn([32, 3, 3, 3], (Kind::Float, Device::Cpu));
        let grey = Tensor::randn([16, 1, 3, 3], (Kind::Float, Device::Cpu));
        let from_colour = &plan(&akida(), &jetson(), SharedLayers::Features)[2];
        let from_grey = &plan(&jetson(), &akida(), SharedLayers::Features)[2];
        let (a, j) = (from_colour.as_ref().unwrap(), from_grey.as_ref().unwrap());

        // Both sides see the same overlap: the colour kernels' sum for the first 16 filters.
        let sum = colour
            .narrow(0, 0, 16)
            .sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        assert!(a
            .theirs_to_overlap(&colour)
            .allclose(&sum, 1e-6, 1e-6, false));
        assert!(j.mine_to_overlap(&colour).allclose(&sum, 1e-6, 1e-6, false));
        assert!(a.mine_to_overlap(&grey).equal(&grey));

        // Lifting a difference into the colour model moves its channel sum by exactly that
        // difference, and leaves the filters the grey model lacks untouched.
        let difference = &grey - &sum;
        let lifted = j.lift(difference.shallow_clone(), &colour);
        let moved = &colour + &lifted;
        assert!(j.mine_to_overlap(&moved).allclose(&grey, 1e-5, 1e-5, false));
        assert_eq!(
            lifted
                .narrow(0, 16, 16)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        let per_channel = lifted.narrow(1, 0, 1);
        assert!(lifted.narrow(1, 2, 1).equal(&per_channel));
    }

    #[test]
    fn a_slice_lifts_back_with_zeros_around_it() {
        let big = Tensor::randn([64, 32, 3, 3], (Kind::Float, Device::Cpu));
        let small = Tensor::randn([32, 16, 3, 3], (Kind::Float, Device::Cpu));
        let align = between("conv2.weight", &[64, 32, 3, 3], &[32, 16, 3, 3]).unwrap();
        let overlap = align.mine_to_overlap(&big);
        assert!(overlap.equal(&big.narrow(0, 0, 32).narrow(1, 0, 16)));
        let lifted = align.lift(&small - &overlap, &big);
        let moved = &big + &lifted;
        assert!(moved
            .narrow(0, 0, 32)
            .narrow(1, 0, 16)
            .allclose(&small, 1e-6, 1e-6, false));
        assert!(moved.narrow(0, 32, 32).equal(&big.narrow(0, 32, 32)));
        assert!(moved.narrow(1, 16, 16).equal(&big.narrow(1, 16, 16)));
    }

    #[test]
    fn unrelated_shapes_share_nothing() {
        assert_eq!(between("fc1.weight", &[128, 256], &[128]), None);
        assert_eq!(
            between("conv1.weight", &[16, 3, 3, 3], &[16, 4, 3, 3]),
            None
        );
        assert_eq!(between("fc1.bias", &[0], &[4]), None);
    }
}
