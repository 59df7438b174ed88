//! A misbehaving member, for robustness experiments: the node trains as usual but
//! publishes a corrupted model, so that neighbours' aggregation rules can be measured
//! against a faulty or hostile peer. Set only through a `DflNode`'s `misbehaviour` field.

use edgesync_api::{Misbehaviour, MisbehaviourKind};
use tch::{Kind, Tensor};

/// What the node publishes instead of `params`, given `before`, its model before this
/// round's training. Each kind distorts the round's change `params - before`:
/// - scaled: `before + scale x change`;
/// - sign flip: `before - scale x change`;
/// - random: `before + noise`, Gaussian noise with `scale` times the change's
///   root-mean-square, per tensor.
///
/// Distorting only the latest change, rather than the model neighbours already hold,
/// keeps the published model finite for the whole run, so the attack never stops.
pub fn corrupt(misbehaviour: Misbehaviour, params: &[Tensor], before: &[Tensor]) -> Vec<Tensor> {
    let scale = misbehaviour.scale;
    tch::no_grad(|| {
        params
            .iter()
            .zip(before)
            .map(|(x, x_before)| {
                let x_before = x_before.detach().to_kind(Kind::Float);
                let change = x.detach().to_kind(Kind::Float) - &x_before;
                let distorted = match misbehaviour.kind {
                    MisbehaviourKind::Scaled => change * scale,
                    MisbehaviourKind::SignFlip => change * -scale,
                    MisbehaviourKind::Random => {
                        let rms = change.square().mean(Kind::Float).sqrt();
                        change.randn_like() * rms * scale
                    }
                };
                x_before + distorted
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor::from_slice(values)]
    }

    fn values(t: &[Tensor]) -> Vec<f32> {
        Vec::try_from(&t[0]).unwrap()
    }

    #[test]
    fn each_kind_distorts_the_change_over_the_round() {
        let params = tensors(&[2.0, 0.0]);
        let public = tensors(&[1.0, 1.0]);
        let with = |kind| Misbehaviour { kind, scale: 3.0 };

        let scaled = corrupt(with(MisbehaviourKind::Scaled), &params, &public);
        assert_eq!(values(&scaled), vec![4.0, -2.0]);
        let flipped = corrupt(with(MisbehaviourKind::SignFlip), &params, &public);
        assert_eq!(values(&flipped), vec![-2.0, 4.0]);

        // The change has an RMS of 1, so the noise is about 3 per entry.
        let big = tensors(&vec![1.0; 10_000]);
        let zero = tensors(&vec![0.0; 10_000]);
        let random = corrupt(with(MisbehaviourKind::Random), &big, &zero);
        let std = random[0].std(true).double_value(&[]);
        assert!((std - 3.0).abs() < 0.2, "{std}");
    }
}
