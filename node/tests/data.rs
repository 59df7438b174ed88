//! The loaders on the real datasets in ../shared/data.

mod common;

use common::shared_data;
use edgesync_node::data::{self, DatasetKind, DatasetSpec, Split};

fn spec(dir: &str, grayscale: bool, resize: Option<u32>) -> DatasetSpec {
    DatasetSpec {
        kind: DatasetKind::Auto,
        path: shared_data().join(dir),
        grayscale,
        resize,
    }
}

#[test]
fn cifar10_image_folder_test_split_is_complete_and_balanced() {
    let test = data::load(&spec("cifar10", false, None), Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.image_shape(), (3, 32, 32));
    assert_eq!(test.classes[0], "airplane");
    assert!(test.histogram().iter().all(|&n| n == 1000));
}

#[test]
fn cifar10_can_be_seen_as_28_pixel_grayscale() {
    let test = data::load(&spec("cifar10", true, Some(28)), Split::Test).unwrap();
    assert_eq!(test.image_shape(), (1, 28, 28));
}

#[test]
fn mnist_idx_files_load_with_digit_labels() {
    let train = data::load(&spec("mnist", false, None), Split::Train).unwrap();
    assert_eq!(train.len(), 7996);
    assert_eq!(train.image_shape(), (1, 28, 28));
    assert_eq!(train.classes.len(), 10);
    assert_eq!(train.histogram().iter().sum::<usize>(), 7996);
}
