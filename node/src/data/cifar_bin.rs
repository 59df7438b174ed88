//! CIFAR-10's official binary layout: records of one label byte followed by 1024 red, 1024
//! green and 1024 blue bytes of a 32x32 image, in row-major order.

use std::path::Path;

use super::{from_raw, io_error, names, DataError, Dataset, Split, CIFAR10_CLASSES};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

pub(super) fn load(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let files: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".to_string()],
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(DataError::Truncated {
                path,
                detail: format!(
                    "{} bytes is not a whole number of {RECORD}-byte records",
                    bytes.len()
                ),
            });
        }
        let first = labels.len();
        for record in bytes.chunks_exact(RECORD) {
            labels.push(record[0] as i64);
            pixels.extend_from_slice(&record[1..]);
        }
        // Check labels per file so that the error names the file holding the bad record.
        if let Some(offset) = labels[first..].iter().position(|&l| l >= 10) {
            return Err(DataError::LabelOutOfRange {
                path,
                index: offset,
                label: labels[first + offset],
                classes: 10,
            });
        }
    }
    let n = labels.len() as i64;
    let shape = [n, 3, SIDE as i64, SIDE as i64];
    from_raw(dir, pixels, shape, labels, names(&CIFAR10_CLASSES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, fill: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(fill, PIXELS));
        r
    }

    #[test]
    fn reads_records_written_in_the_official_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(3, 7);
        bytes.extend(record(9, 200));
        std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();

        let data = load(dir.path(), Split::Test).unwrap();
        assert_eq!(data.labels_vec(), vec![3, 9]);
        assert_eq!(data.image_shape(), (3, 32, 32));
        let second: Vec<u8> = Vec::try_from(data.images.get(1).flatten(0, -1)).unwrap();
        assert!(second.iter().all(|&p| p == 200));
        assert_eq!(data.classes[3], "cat");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(1, 0);
        bytes.truncate(RECORD - 5);
        std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();

        let err = load(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.contains("test_batch.bin") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn label_out_of_range_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(1, 0);
        bytes.extend(record(12, 0));
        std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();

        let err = load(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.contains("label 12") && err.contains("record 1"),
            "{err}"
        );
    }

    #[test]
    fn missing_training_batch_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data_batch_1.bin"), record(0, 0)).unwrap();

        let err = load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("data_batch_2.bin"), "{err}");
    }
}
