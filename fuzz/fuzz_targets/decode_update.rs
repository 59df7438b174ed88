//! Feeds arbitrary bytes to the update decoder, as any peer on the network can, checked
//! against the layout of a federation of both real models, so that frames reach the
//! per-tensor checks.
//!
//! Beyond "never panics", an accepted frame must keep the promises the gossip step relies
//! on: every tensor is a parameter of the model its fingerprint names, with that model's
//! shape, as finite `f32` values, named once; and what was accepted re-encodes to a frame
//! that decodes to the same bits.
//!
//! With `EDGESYNC_FUZZ_SEEDS=<dir>` set, start-up first writes a seed corpus into `<dir>`:
//! valid frames of every encoding from both models, so that mutations start past the
//! magic number, federation name and fingerprint instead of having to guess them.

#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use edgesync_node::federation::codec::{decode, encode, Encoding, Header, Layout};
use edgesync_node::model::{self, Architecture, Cnn, ModelSpec};
use libfuzzer_sys::fuzz_target;
use tch::{nn, Device, Kind, Tensor};

const FEDERATION: &str = "fuzz";

/// The members' models: a colour Jetson-class node and a greyscale Akida-class node, as in
/// the seed testbed.
const MODELS: [(Architecture, i64); 2] =
    [(Architecture::JetsonCnn, 3), (Architecture::AkidaCnn, 1)];

/// Seeds larger than this are left out: libFuzzer sizes its inputs after the largest seed,
/// and full-precision frames of the whole Jetson model would slow every execution.
const MAX_SEED: usize = 96 * 1024;

static LAYOUT: OnceLock<Layout> = OnceLock::new();

/// A model's parameters by name, as `Trainer::parameters` lists them, and its fingerprint.
fn model_params(architecture: Architecture, in_channels: i64) -> (Vec<(String, Tensor)>, String) {
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = ModelSpec {
        architecture,
        in_channels,
        classes: 10,
    };
    let _model = Cnn::new(&vs.root(), spec);
    let mut params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    (params, model::fingerprint(architecture, &vs))
}

/// What every member of the federation accepts: frames of either model.
fn layout() -> &'static Layout {
    LAYOUT.get_or_init(|| {
        let (jetson, jetson_fp) = model_params(MODELS[0].0, MODELS[0].1);
        let (akida, akida_fp) = model_params(MODELS[1].0, MODELS[1].1);
        let shapes = akida.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        Layout::new(FEDERATION, &jetson_fp, &jetson).with_model(&akida_fp, shapes)
    })
}

fn write_seeds(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tch::manual_seed(11);
    for (arch, channels) in MODELS {
        let (params, fingerprint) = model_params(arch, channels);
        // Every entry drawn afresh, so that scales and top-k selections are not degenerate.
        let params: Vec<(String, Tensor)> = params
            .into_iter()
            .map(|(name, t)| (name, Tensor::randn_like(&t)))
            .collect();
        // Biases, batch-norm statistics and the first kernel: small frames that still carry
        // several tensors of several ranks.
        let small: Vec<(String, Tensor)> = params
            .iter()
            .filter(|(_, t)| t.numel() <= 1024)
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let encodings = [
            ("fp32", Encoding::Fp32),
            ("fp16", Encoding::Fp16),
            ("int8", Encoding::Int8),
            ("topk", Encoding::TopK(0.1)),
            ("q2", Encoding::Quantized(2)),
            ("q3", Encoding::Quantized(3)),
            ("q8", Encoding::Quantized(8)),
        ];
        for (label, encoding) in encodings {
            for (subset, tensors) in [("small", &small), ("full", &params)] {
                let keyframe = subset == "full";
                let header = Header {
                    federation: FEDERATION.into(),
                    sender: "peer-1".into(),
                    round: 3,
                    base_version: 2,
                    keyframe,
                    fingerprint: fingerprint.clone(),
                };
                let name = format!("{}-{label}-{subset}", arch.as_str());
                let (frame, _) = encode(&header, tensors, encoding);
                // A seed the decoder refuses would only teach the fuzzer the first check.
                if let Err(error) = decode(&frame, layout()) {
                    panic!("seed {name} refused: {error}");
                }
                if frame.len() <= MAX_SEED {
                    std::fs::write(dir.join(name), frame)?;
                }
            }
        }
    }
    Ok(())
}

fn check(data: &[u8], layout: &Layout) {
    let update = match decode(data, layout) {
        Ok(update) => update,
        Err(error) => {
            // Both are what the node logs and counts for a rejection.
            let _ = error.reason();
            let _ = error.to_string();
            return;
        }
    };
    assert!(data.len() <= layout.max_frame);
    assert_eq!(update.header.federation, layout.federation);
    let shapes = layout
        .models
        .get(&update.header.fingerprint)
        .expect("accepted a fingerprint that is no member's model");
    let mut names = HashSet::new();
    let mut decoded = Vec::new();
    for (name, tensor) in &update.tensors {
        assert!(names.insert(name.as_str()), "{name} returned twice");
        let expected = shapes
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a parameter of the sender's model"));
        assert_eq!(&tensor.size(), expected, "{name}");
        assert_eq!(tensor.kind(), Kind::Float, "{name}");
        let values = Vec::<f32>::try_from(&tensor.reshape([-1])).expect("f32 values");
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{name} holds non-finite values"
        );
        decoded.push(values);
    }

    let (frame, _) = encode(&update.header, &update.tensors, Encoding::Fp32);
    let again = decode(&frame, layout).expect("an accepted update re-encoded is refused");
    assert_eq!(again.header, update.header);
    assert_eq!(again.tensors.len(), decoded.len());
    for ((name, tensor), values) in again.tensors.iter().zip(&decoded) {
        let got = Vec::<f32>::try_from(&tensor.reshape([-1])).expect("f32 values");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(values), "{name} changed through fp32");
    }
}

fuzz_target!(
    init: {
        // One input at a time; libtorch's intra-op threads would only add noise.
        tch::set_num_threads(1);
        if let Some(dir) = std::env::var_os("EDGESYNC_FUZZ_SEEDS") {
            write_seeds(Path::new(&dir)).expect("writing the seed corpus");
        }
        layout();
    },
    |data: &[u8]| check(data, layout())
);
