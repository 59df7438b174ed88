//! The IDX layout of MNIST and Fashion-MNIST: a big-endian magic number (0x00000803 for
//! images, 0x00000801 for labels), the item count, then rows and columns for images,
//! followed by one byte per pixel or label. Files may be gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{from_raw, io_error, DataError, Dataset, Split};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The file `stem` in `dir`, plain or with a `.gz` suffix.
pub(super) fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

pub(super) fn load(dir: &Path, split: Split, classes: Vec<String>) -> Result<Dataset, DataError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_stem = format!("{prefix}-images-idx3-ubyte");
    let labels_stem = format!("{prefix}-labels-idx1-ubyte");
    let images_path = find(dir, &images_stem).unwrap_or_else(|| dir.join(&images_stem));
    let labels_path = find(dir, &labels_stem).unwrap_or_else(|| dir.join(&labels_stem));

    let images = read_maybe_gzip(&images_path)?;
    let labels = read_maybe_gzip(&labels_path)?;

    let header = parse_header(&images_path, &images, IMAGES_MAGIC, 4)?;
    let (count, rows, cols) = (header[0], header[1], header[2]);
    let pixels = &images[16..];
    let expected = count * rows * cols;
    if pixels.len() < expected {
        return Err(DataError::Truncated {
            path: images_path,
            detail: format!(
                "{count} images of {rows}x{cols} need {expected} bytes, found {}",
                pixels.len()
            ),
        });
    }

    let label_count = parse_header(&labels_path, &labels, LABELS_MAGIC, 2)?[0];
    let label_bytes = &labels[8..];
    if label_bytes.len() < label_count {
        return Err(DataError::Truncated {
            path: labels_path,
            detail: format!(
                "{label_count} labels declared, {} present",
                label_bytes.len()
            ),
        });
    }
    if label_count != count {
        return Err(DataError::Inconsistent {
            path: labels_path,
            detail: format!(
                "{label_count} labels for {count} images in {}",
                images_path.display()
            ),
        });
    }

    let labels: Vec<i64> = label_bytes[..count].iter().map(|&b| b as i64).collect();
    let shape = [count as i64, 1, rows as i64, cols as i64];
    from_raw(
        &labels_path,
        pixels[..expected].to_vec(),
        shape,
        labels,
        classes,
    )
}

fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_error(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Truncated {
                path: path.to_path_buf(),
                detail: format!("gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks the magic number and returns the `fields - 1` dimension sizes that follow it.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    fields: usize,
) -> Result<Vec<usize>, DataError> {
    // A short file of the wrong kind (labels where images belong) is best reported as the
    // wrong file, so the magic number is checked before the header's length.
    if let Some(w) = bytes.get(..4) {
        let found = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
        if found != magic {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                found,
                expected: magic,
            });
        }
    }
    if bytes.len() < 4 * fields {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "{} bytes is shorter than the {}-byte header",
                bytes.len(),
                4 * fields
            ),
        });
    }
    let words: Vec<u32> = bytes[..4 * fields]
        .chunks_exact(4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    Ok(words[1..].iter().map(|&w| w as usize).collect())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn idx_images(count: u32, side: u32, fill: u8) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [IMAGES_MAGIC, count, side, side] {
            b.extend(w.to_be_bytes());
        }
        b.extend(std::iter::repeat_n(fill, (count * side * side) as usize));
        b
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [LABELS_MAGIC, labels.len() as u32] {
            b.extend(w.to_be_bytes());
        }
        b.extend(labels);
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn digits() -> Vec<String> {
        (0..10).map(|d| d.to_string()).collect()
    }

    #[test]
    fn reads_plain_and_gzip_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_images(2, 5, 9),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte.gz"),
            gzip(&idx_labels(&[4, 7])),
        )
        .unwrap();

        let data = load(dir.path(), Split::Test, digits()).unwrap();
        assert_eq!(data.image_shape(), (1, 5, 5));
        assert_eq!(data.labels_vec(), vec![4, 7]);
    }

    #[test]
    fn wrong_magic_is_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), idx_labels(&[1])).unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), idx_labels(&[1])).unwrap();

        let err = load(dir.path(), Split::Test, digits())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("magic"),
            "{err}"
        );
    }

    #[test]
    fn truncated_pixels_and_mismatched_counts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = idx_images(3, 4, 0);
        images.truncate(images.len() - 1);
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), images).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx_labels(&[1, 2, 3]),
        )
        .unwrap();
        let err = load(dir.path(), Split::Test, digits())
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");

        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_images(3, 4, 0),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx_labels(&[1, 2]),
        )
        .unwrap();
        let err = load(dir.path(), Split::Test, digits())
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 labels for 3 images"), "{err}");
    }

    #[test]
    fn label_out_of_range_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_images(2, 4, 0),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx_labels(&[1, 10]),
        )
        .unwrap();
        let err = load(dir.path(), Split::Test, digits())
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 10"), "{err}");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = gzip(&idx_images(2, 4, 0));
        gz.truncate(gz.len() / 2);
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), gz).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx_labels(&[1, 2]),
        )
        .unwrap();
        let err = load(dir.path(), Split::Test, digits())
            .unwrap_err()
            .to_string();
        assert!(err.contains("gzip"), "{err}");
    }
}
