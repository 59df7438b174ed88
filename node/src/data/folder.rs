//! Image-folder trees, `<root>/<split>/<class>/*.jpg|png`: how users keep their own camera
//! data. Classes are the sub-folders sorted by name; label `i` is the `i`-th of them.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{from_raw, io_error, DataError, Dataset, Split};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Loads `<root>/<split>/`. Images of different sizes need `resize`; with it every image is
/// scaled to `resize` x `resize` while decoding.
pub(super) fn load(root: &Path, split: Split, resize: Option<u32>) -> Result<Dataset, DataError> {
    let split_dir = root.join(split.as_str());
    let classes = class_folders(&split_dir)?;

    let mut files: Vec<(PathBuf, i64)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_dir = split_dir.join(class);
        let mut images: Vec<PathBuf> = std::fs::read_dir(&class_dir)
            .map_err(io_error(&class_dir))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        if images.is_empty() {
            return Err(DataError::EmptyClass { path: class_dir });
        }
        images.sort();
        files.extend(images.into_iter().map(|p| (p, label as i64)));
    }

    // Decoding tens of thousands of small files is the slow part of start-up, and each file
    // is independent, so it is spread over all cores.
    let decoded: Vec<(image::RgbImage, usize)> = files
        .par_iter()
        .map(|(path, _)| decode(path, resize))
        .collect::<Result<_, _>>()?;

    let (first, _) = &decoded[0];
    let (width, height) = first.dimensions();
    let channels = if decoded.iter().all(|(_, c)| *c == 1) {
        1
    } else {
        3
    };
    let mut pixels = Vec::with_capacity(decoded.len() * channels * (width * height) as usize);
    for ((img, _), (path, _)) in decoded.iter().zip(&files) {
        if img.dimensions() != (width, height) {
            let (w, h) = img.dimensions();
            return Err(DataError::SizeMismatch {
                path: path.clone(),
                found: format!("{w}x{h}"),
                expected: format!("{width}x{height}"),
            });
        }
        push_planar(&mut pixels, img, channels);
    }

    let labels = files.iter().map(|(_, l)| *l).collect();
    let shape = [
        decoded.len() as i64,
        channels as i64,
        height as i64,
        width as i64,
    ];
    from_raw(&split_dir, pixels, shape, labels, classes)
}

fn class_folders(split_dir: &Path) -> Result<Vec<String>, DataError> {
    let mut classes: Vec<String> = std::fs::read_dir(split_dir)
        .map_err(io_error(split_dir))?
        .filter_map(|entry| entry.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: split_dir.to_path_buf(),
        });
    }
    classes.sort();
    Ok(classes)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes one file to RGB, returning how many channels the source had (1 or 3).
fn decode(path: &Path, resize: Option<u32>) -> Result<(image::RgbImage, usize), DataError> {
    let img = image::open(path).map_err(|e| DataError::UnreadableImage {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let channels = if img.color().has_color() { 3 } else { 1 };
    let img = match resize {
        Some(side) if img.width() != side || img.height() != side => {
            img.resize_exact(side, side, FilterType::Triangle)
        }
        _ => img,
    };
    Ok((img.to_rgb8(), channels))
}

/// Appends an image in planar `[C, H, W]` order, as the model expects.
fn push_planar(out: &mut Vec<u8>, img: &image::RgbImage, channels: usize) {
    for c in 0..channels {
        out.extend(img.pixels().map(|p| p.0[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, side: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(side, side, image::Rgb([value, value / 2, 0]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn classes_are_sorted_folder_names() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/zebra/a.png"), 8, 10);
        write_png(&dir.path().join("train/ant/a.png"), 8, 20);
        write_png(&dir.path().join("train/ant/b.png"), 8, 30);

        let data = load(dir.path(), Split::Train, None).unwrap();
        assert_eq!(data.classes, vec!["ant", "zebra"]);
        assert_eq!(data.labels_vec(), vec![0, 0, 1]);
        assert_eq!(data.image_shape(), (3, 8, 8));
        let red: u8 = data.images.int64_value(&[2, 0, 0, 0]) as u8;
        assert_eq!(red, 10);
    }

    #[test]
    fn empty_class_and_unreadable_image_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/ant/a.png"), 8, 10);
        std::fs::create_dir_all(dir.path().join("train/bee")).unwrap();
        let err = load(dir.path(), Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bee") && err.contains("no images"), "{err}");

        std::fs::write(dir.path().join("train/bee/broken.jpg"), b"not a jpeg").unwrap();
        let err = load(dir.path(), Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.jpg") && err.contains("unreadable"),
            "{err}"
        );
    }

    #[test]
    fn mixed_sizes_need_a_resize() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("train/a/1.png"), 8, 10);
        write_png(&dir.path().join("train/a/2.png"), 12, 10);
        let err = load(dir.path(), Split::Train, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("12x12"), "{err}");

        let data = load(dir.path(), Split::Train, Some(6)).unwrap();
        assert_eq!(data.image_shape(), (3, 6, 6));
    }
}
