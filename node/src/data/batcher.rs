//! Seeded mini-batch sampling over a node's local data.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use super::{Augment, Dataset, Normalize};

/// Draws shuffled mini-batches epoch after epoch, reproducibly from a seed.
pub struct Batcher {
    order: Vec<i64>,
    position: usize,
    batch_size: usize,
    normalize: Normalize,
    augment: Option<Augment>,
    rng: ChaCha8Rng,
}

impl Batcher {
    pub fn new(
        len: usize,
        batch_size: usize,
        normalize: Normalize,
        augment: Option<Augment>,
        seed: u64,
    ) -> Self {
        let mut batcher = Batcher {
            order: (0..len as i64).collect(),
            position: 0,
            batch_size: batch_size.min(len).max(1),
            normalize,
            augment,
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        batcher.order.shuffle(&mut batcher.rng);
        batcher
    }

    /// The next batch as `(inputs, labels)` on `device`; inputs are normalised floats.
    pub fn next_batch(&mut self, data: &Dataset, device: Device) -> (Tensor, Tensor) {
        if self.position + self.batch_size > self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.position = 0;
        }
        let idx = &self.order[self.position..self.position + self.batch_size];
        self.position += self.batch_size;

        let idx = Tensor::from_slice(idx);
        let images = data.images.index_select(0, &idx).to_device(device);
        let labels = data.labels.index_select(0, &idx).to_device(device);
        let mut inputs = self.normalize.apply(&images);
        if let Some(augment) = &self.augment {
            inputs = augment.apply(&inputs, &mut self.rng);
        }
        (inputs, labels)
    }
}
