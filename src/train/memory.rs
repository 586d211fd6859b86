//! GPU memory statistics for the log (Megatron's `memory (GB) | allocated | max allocated |
//! reserved | max reserved` report and the peak on every log line). CPU runs have none.

use candle_core::Device;

/// Bytes of the device's memory pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub allocated: u64,
    pub max_allocated: u64,
    pub reserved: u64,
    pub max_reserved: u64,
}

const GB: f64 = (1u64 << 30) as f64;

impl MemStats {
    /// Megatron's once-per-run report line, in GiB ("GB" as Megatron prints it).
    pub fn report(&self, iteration: u64) -> String {
        format!(
            "[Rank 0] (after {iteration} iterations) memory (GB) | allocated: {:.2} | max allocated: {:.2} | reserved: {:.2} | max reserved: {:.2}",
            self.allocated as f64 / GB,
            self.max_allocated as f64 / GB,
            self.reserved as f64 / GB,
            self.max_reserved as f64 / GB
        )
    }

    /// Peak allocated memory in GiB (the log line's `mem-max-allocated-gigabytes`).
    pub fn max_allocated_gb(&self) -> f64 {
        self.max_allocated as f64 / GB
    }
}

/// Current and peak memory of `device`'s pool; `None` on the CPU (or if the driver query fails,
/// which must not stop training: the statistics are informative only).
pub fn device_memory(device: &Device) -> Option<MemStats> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use crate::ops::cuda::memory::{current_bytes, peak_bytes};
        let stats = current_bytes(dev).and_then(|(a, r)| {
            peak_bytes(dev).map(|(ma, mr)| MemStats {
                allocated: a,
                max_allocated: ma,
                reserved: r,
                max_reserved: mr,
            })
        });
        return match stats {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("GPU memory statistics unavailable: {e}");
                None
            }
        };
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_megatron_shaped() {
        let s = MemStats {
            allocated: 3 << 30,
            max_allocated: 5 << 30,
            reserved: 6 << 30,
            max_reserved: 7 << 30,
        };
        assert_eq!(
            s.report(10),
            "[Rank 0] (after 10 iterations) memory (GB) | allocated: 3.00 | max allocated: 5.00 | reserved: 6.00 | max reserved: 7.00"
        );
        assert_eq!(s.max_allocated_gb(), 5.0);
    }

    #[test]
    fn cpu_has_no_gpu_memory() {
        assert_eq!(device_memory(&Device::Cpu), None);
    }
}
