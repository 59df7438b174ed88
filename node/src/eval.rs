//! Evaluation on held-out data: accuracy, loss and a confusion matrix.

use serde::Serialize;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use crate::data::{Dataset, Normalize};
use crate::model::to_channels_last;

const EVAL_BATCH: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub samples: usize,
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// `confusion[true_class][predicted_class]`.
    pub confusion: Vec<Vec<u64>>,
}

/// Evaluates `model` on all of `data` in inference mode.
pub fn evaluate(
    model: &impl ModuleT,
    data: &Dataset,
    normalize: Normalize,
    device: Device,
    channels_last: bool,
) -> EvalReport {
    let classes = data.classes.len() as i64;
    let _guard = tch::no_grad_guard();
    let mut loss_sum = 0.0;
    let mut confusion = Tensor::zeros([classes * classes], (Kind::Int64, Device::Cpu));
    let n = data.len();
    let mut start = 0;
    while start < n {
        let len = EVAL_BATCH.min(n - start);
        let images = data
            .images
            .narrow(0, start as i64, len as i64)
            .to_device(device);
        let labels = data
            .labels
            .narrow(0, start as i64, len as i64)
            .to_device(device);
        let mut inputs = normalize.apply(&images);
        if channels_last {
            inputs = to_channels_last(&inputs);
        }
        let logits = model.forward_t(&inputs, false);
        loss_sum += logits
            .cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100, 0.0)
            .double_value(&[]);
        let predicted = logits.argmax(-1, false);
        let cells = (&labels * classes + predicted).to_device(Device::Cpu);
        confusion += cells.bincount::<Tensor>(None, classes * classes);
        start += len;
    }
    let flat: Vec<i64> = Vec::try_from(&confusion).unwrap_or_default();
    let confusion: Vec<Vec<u64>> = flat
        .chunks(classes as usize)
        .map(|row| row.iter().map(|&c| c as u64).collect())
        .collect();
    let correct: u64 = (0..classes as usize).map(|c| confusion[c][c]).sum();
    EvalReport {
        samples: n,
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        loss: if n == 0 { 0.0 } else { loss_sum / n as f64 },
        confusion,
    }
}
