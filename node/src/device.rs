//! Choice of compute device and CPU thread count.

use tch::Device;

/// CUDA when libtorch sees a GPU, the CPU otherwise. Says which once, in the log, so that
/// a node silently training on the CPU of a GPU board is noticed.
pub fn select(threads: Option<usize>) -> Device {
    if let Some(n) = threads.filter(|&n| n > 0) {
        tch::set_num_threads(n as i32);
    }
    let device = Device::cuda_if_available();
    match device {
        Device::Cuda(index) => tracing::info!(
            gpu = index,
            gpus = tch::Cuda::device_count(),
            cudnn = tch::Cuda::cudnn_is_available(),
            "training on CUDA"
        ),
        _ => tracing::info!(
            threads = tch::get_num_threads(),
            "no CUDA device: training on CPU"
        ),
    }
    device
}

/// Human-readable device name for logs and reports.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}
