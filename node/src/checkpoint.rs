//! Crash-safe checkpoints in the safetensors format.
//!
//! A checkpoint is one safetensors file: tensors under PyTorch-style names (the model's
//! parameters as they are, other state under a prefix such as `optimizer.`) and string
//! metadata (round, step, architecture). PyTorch reads the model part with
//! `safetensors.torch.load_file` and `load_state_dict(strict=False)`.
//!
//! Writing goes to a temporary file in the same folder, which is flushed to disk and then
//! renamed over the old checkpoint: a process killed mid-write leaves the previous
//! checkpoint intact, never a half-written one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot access checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not valid safetensors: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("tensor {name} has unsupported type {kind:?}")]
    UnsupportedKind { name: String, kind: Kind },
    #[error("checkpoint {path} lacks metadata field {field}")]
    MissingField { path: PathBuf, field: String },
}

/// Tensors and metadata read back from a checkpoint file.
#[derive(Debug)]
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
    pub path: PathBuf,
}

impl Checkpoint {
    /// A metadata field parsed as `T`, or an error naming the field.
    pub fn field<T: std::str::FromStr>(&self, name: &str) -> Result<T, CheckpointError> {
        self.metadata
            .get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| CheckpointError::MissingField {
                path: self.path.clone(),
                field: name.to_string(),
            })
    }
}

fn dtype_of(name: &str, kind: Kind) -> Result<Dtype, CheckpointError> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        kind => {
            return Err(CheckpointError::UnsupportedKind {
                name: name.to_string(),
                kind,
            })
        }
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        _ => return None,
    })
}

/// Writes `tensors` and `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    save_stalling(path, tensors, metadata, None)
}

/// [`save`], pausing for `stall_halfway` (when set) with half the temporary file written
/// and flushed: the window in which a fault test kills the process.
pub fn save_stalling(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    stall_halfway: Option<Duration>,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(name, tensor.kind())?;
        let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
        tensor
            .f_copy_data_u8(&mut bytes, tensor.numel())
            .map_err(|e| CheckpointError::Format {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let encoded =
        safetensors::serialize(views, Some(info)).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = temporary_path(path);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    if let Some(stall) = stall_halfway {
        let (first, rest) = encoded.split_at(encoded.len() / 2);
        file.write_all(first).map_err(io)?;
        file.sync_all().map_err(io)?;
        tracing::warn!(path = %tmp.display(), ?stall, "stalling a checkpoint write halfway");
        std::thread::sleep(stall);
        file.write_all(rest).map_err(io)?;
    } else {
        file.write_all(&encoded).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads a checkpoint written by [`save`] (or any safetensors file) onto the CPU.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let format = |reason: String| CheckpointError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| format(format!("tensor {name} has unsupported dtype")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| format(e.to_string()))?;
        tensors.insert(name, tensor);
    }
    Ok(Checkpoint {
        tensors,
        metadata,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.safetensors");
        let w = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        let steps = Tensor::from_slice(&[7i64]);
        let meta = BTreeMap::from([("round".to_string(), "12".to_string())]);
        save(
            &path,
            &[("fc.weight".into(), w.shallow_clone()), ("n".into(), steps)],
            &meta,
        )
        .unwrap();

        let ck = load(&path).unwrap();
        assert!(ck.tensors["fc.weight"].allclose(&w, 0.0, 0.0, false));
        assert_eq!(ck.tensors["n"].int64_value(&[0]), 7);
        assert_eq!(ck.field::<u64>("round").unwrap(), 12);
        assert!(ck.field::<u64>("step").is_err());
        assert!(!temporary_path(&path).exists());
    }

    #[test]
    fn an_interrupted_write_leaves_the_previous_checkpoint_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.safetensors");
        let meta = BTreeMap::from([("round".to_string(), "1".to_string())]);
        save(&path, &[("a".into(), Tensor::from_slice(&[1.0f32]))], &meta).unwrap();
        // A crash during the next save leaves only a partial temporary file behind.
        std::fs::write(temporary_path(&path), b"partial").unwrap();

        let ck = load(&path).unwrap();
        assert_eq!(ck.field::<u64>("round").unwrap(), 1);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not valid"),
            "{err}"
        );
    }
}
