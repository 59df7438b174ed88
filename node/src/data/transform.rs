//! Pixel transforms: the per-dataset ones applied once at load time (grayscale, resize) and
//! the per-batch ones applied while training (normalisation, augmentation).

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::DataError;

/// ITU-R BT.601 luma weights, the conversion most image libraries use.
/// ITU-R BT.601 luma weights of red, green and blue.
pub(crate) const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// `[N, 3, H, W]` colour bytes to `[N, 1, H, W]` luminance bytes; one-channel input is
/// returned unchanged.
pub(super) fn grayscale(images: &Tensor) -> Result<Tensor, DataError> {
    if images.size()[1] == 1 {
        return Ok(images.shallow_clone());
    }
    let weights = Tensor::from_slice(&LUMA)
        .to_kind(Kind::Float)
        .view([1, 3, 1, 1]);
    let gray = (images.to_kind(Kind::Float) * weights).f_sum_dim_intlist(1, true, Kind::Float)?;
    Ok(gray.round().clamp(0.0, 255.0).to_kind(Kind::Uint8))
}

/// Resizes `[N, C, H, W]` bytes to `side` x `side` with antialiased bilinear filtering.
pub(super) fn resize(images: &Tensor, side: i64) -> Result<Tensor, DataError> {
    let resized = images
        .to_kind(Kind::Float)
        .f_internal_upsample_bilinear2d_aa([side, side], false, None, None)?;
    Ok(resized.round().clamp(0.0, 255.0).to_kind(Kind::Uint8))
}

/// Maps bytes to floats centred near zero. The same fixed constants serve every node of a
/// federation, so that models averaged across nodes see inputs on one scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: f64,
    pub std: f64,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            mean: 0.5,
            std: 0.25,
        }
    }
}

impl Normalize {
    /// `u8` `[N, C, H, W]` to normalised `f32`.
    pub fn apply(&self, images: &Tensor) -> Tensor {
        (images.to_kind(Kind::Float) / 255.0 - self.mean) / self.std
    }
}

/// Training augmentation for natural images: random crop after zero padding, and random
/// horizontal flip. Digits are not flipped: a mirrored digit is a different symbol.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub crop_padding: i64,
    pub horizontal_flip: bool,
}

impl Augment {
    /// The CIFAR-style default: 4-pixel padding and flips.
    pub fn natural_images() -> Self {
        Augment {
            crop_padding: 4,
            horizontal_flip: true,
        }
    }

    /// Applies the augmentation to a float batch `[N, C, H, W]`.
    pub fn apply(&self, batch: &Tensor, rng: &mut impl Rng) -> Tensor {
        let size = batch.size();
        let (n, h, w) = (size[0], size[2], size[3]);
        let mut out = batch.shallow_clone();

        if self.crop_padding > 0 {
            let p = self.crop_padding;
            let padded = out.constant_pad_nd([p, p, p, p]);
            let crops: Vec<Tensor> = (0..n)
                .map(|i| {
                    let dy = rng.random_range(0..=2 * p);
                    let dx = rng.random_range(0..=2 * p);
                    padded.get(i).narrow(1, dy, h).narrow(2, dx, w)
                })
                .collect();
            out = Tensor::stack(&crops, 0);
        }

        if self.horizontal_flip {
            let flips: Vec<bool> = (0..n).map(|_| rng.random_bool(0.5)).collect();
            let mask = Tensor::from_slice(&flips)
                .to_device(out.device())
                .view([n, 1, 1, 1]);
            out = out.flip([3]).where_self(&mask, &out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn grayscale_uses_luma_weights() {
        let img = Tensor::from_slice(&[255u8, 0, 0]).view([1, 3, 1, 1]);
        let g = grayscale(&img).unwrap();
        assert_eq!(g.size(), vec![1, 1, 1, 1]);
        assert_eq!(g.int64_value(&[0, 0, 0, 0]), 76); // 0.299 * 255 = 76.2
    }

    #[test]
    fn resize_changes_side_and_keeps_constant_images_constant() {
        let img = Tensor::full([2, 1, 32, 32], 100, (Kind::Uint8, tch::Device::Cpu));
        let r = resize(&img, 28).unwrap();
        assert_eq!(r.size(), vec![2, 1, 28, 28]);
        assert_eq!(r.min().int64_value(&[]), 100);
        assert_eq!(r.max().int64_value(&[]), 100);
    }

    #[test]
    fn augmentation_keeps_shape_and_content_mass() {
        let batch = Tensor::rand([8, 3, 32, 32], (Kind::Float, tch::Device::Cpu)) + 1.0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let flip_only = Augment {
            crop_padding: 0,
            horizontal_flip: true,
        };
        let out = flip_only.apply(&batch, &mut rng);
        assert_eq!(out.size(), batch.size());
        // Flipping moves pixels but never changes a sample's sum.
        let diff = (out.sum_dim_intlist(&[1, 2, 3][..], false, Kind::Float)
            - batch.sum_dim_intlist(&[1, 2, 3][..], false, Kind::Float))
        .abs()
        .max()
        .double_value(&[]);
        assert!(diff < 1e-2, "{diff}");

        let cropped = Augment::natural_images().apply(&batch, &mut rng);
        assert_eq!(cropped.size(), batch.size());
        // Padding is zero and every original pixel is at least 1, so a shifted crop shows
        // zeros somewhere in most samples.
        let zeros = cropped.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!(zeros > 0);
    }
}
