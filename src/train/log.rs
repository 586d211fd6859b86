//! The Megatron training log line and validation box, formatted exactly as Megatron prints them.

/// Everything one log line reports (averaged over the iterations since the previous line).
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub iteration: u64,
    pub train_iters: u64,
    pub consumed_samples: u64,
    pub skipped_samples: u64,
    pub elapsed_ms_per_iter: f64,
    /// Model TFLOP/s per GPU, printed when `logger.log_throughput`.
    pub tflops_per_gpu: Option<f64>,
    /// Peak GPU memory allocated so far (GiB); printed on GPU runs only.
    pub mem_max_allocated_gb: Option<f64>,
    pub learning_rate: f64,
    pub global_batch_size: usize,
    /// `lm loss` averaged over the interval; None when no iteration advanced.
    pub lm_loss: Option<f64>,
    pub loss_scale: f64,
    pub grad_norm: Option<f64>,
    /// L2 norm of the trainable parameters after the step (`logger.log_params_norm`).
    pub params_norm: Option<f64>,
    pub skipped_iterations: u64,
    pub nan_iterations: u64,
}

impl LogLine {
    /// ` [2026-01-01 12:00:00] iteration      100/    1000 | consumed samples: ... |`
    pub fn render(&self, timestamp: &str) -> String {
        let mut s = format!(" [{timestamp}]");
        s += &format!(" iteration {:8}/{:8} |", self.iteration, self.train_iters);
        s += &format!(" consumed samples: {:12} |", self.consumed_samples);
        if self.skipped_samples > 0 {
            s += &format!(" skipped samples: {:12} |", self.skipped_samples);
        }
        s += &format!(" elapsed time per iteration (ms): {:.1} |", self.elapsed_ms_per_iter);
        if let Some(t) = self.tflops_per_gpu {
            s += &format!(" throughput per GPU (TFLOP/s/GPU): {t:.1} |");
        }
        if let Some(m) = self.mem_max_allocated_gb {
            s += &format!(" mem-max-allocated-gigabytes: {m:.2} |");
        }
        s += &format!(" learning rate: {} |", sci(self.learning_rate));
        s += &format!(" global batch size: {:5} |", self.global_batch_size);
        if let Some(l) = self.lm_loss {
            s += &format!(" lm loss: {} |", sci(l));
        }
        s += &format!(" loss scale: {:.1} |", self.loss_scale);
        if let Some(g) = self.grad_norm {
            s += &format!(" grad norm: {g:.3} |");
        }
        if let Some(p) = self.params_norm {
            s += &format!(" params norm: {p:.3} |");
        }
        s += &format!(" number of skipped iterations: {:3} |", self.skipped_iterations);
        s += &format!(" number of nan iterations: {:3} |", self.nan_iterations);
        s
    }
}

/// Python's `"{:.6E}".format(x)`: `3.000000E-04`.
pub fn sci(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NAN".into()
        } else if x > 0.0 {
            "INF".into()
        } else {
            "-INF".into()
        };
    }
    python_exponent(&format!("{x:.6E}"), 'E')
}

/// Rust's exponent notation (`3.000000E-4`, `3.00e12`) as Python writes it: the exponent
/// with a sign and at least two digits (`3.000000E-04`, `3.00e+12`). `e` is the exponent mark.
pub fn python_exponent(rust: &str, e: char) -> String {
    let (mantissa, exp) = rust.split_once(e).expect("exponent notation");
    let exp: i32 = exp.parse().expect("exponent");
    format!("{mantissa}{e}{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

/// Perplexity as Megatron reports it: `exp(min(20, loss))`.
pub fn perplexity(loss: f64) -> f64 {
    loss.min(20.0).exp()
}

/// The dashed validation box: `validation loss at iteration 100 on validation set | ...`
/// (`validation-<name> loss at ...` for one of several validation sets: `suffix`).
pub fn validation_box(suffix: &str, prefix: &str, lm_loss: f64) -> String {
    let body = format!(
        " validation{suffix} loss at {prefix} | lm loss value: {} | lm loss PPL: {} | ",
        sci(lm_loss),
        sci(perplexity(lm_loss))
    );
    let rule = "-".repeat(body.chars().count() + 1);
    format!("{rule}\n{body}\n{rule}")
}

/// Megatron's timestamps (`datetime.now().strftime(...)`): `2026-01-01 12:00:00`.
pub const TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// Local wall-clock time as [`TIMESTAMP_FORMAT`].
pub fn timestamp() -> String {
    chrono::Local::now().format(TIMESTAMP_FORMAT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_test_vectors() {
        assert_eq!(sci(0.0003), "3.000000E-04");
        assert_eq!(sci(2.345678), "2.345678E+00");
        assert_eq!(sci(perplexity(2.0)), "7.389056E+00");
        assert_eq!(sci(perplexity(25.0)), "4.851652E+08");
        assert_eq!(format!("{:8}", 100), "     100");
    }

    /// Megatron's example line (iteration 100 of 1000, global batch 512).
    fn example() -> LogLine {
        LogLine {
            iteration: 100,
            train_iters: 1000,
            consumed_samples: 51200,
            skipped_samples: 0,
            elapsed_ms_per_iter: 1234.5,
            tflops_per_gpu: None,
            mem_max_allocated_gb: None,
            learning_rate: 3e-4,
            global_batch_size: 512,
            lm_loss: Some(2.345678),
            loss_scale: 1.0,
            grad_norm: Some(0.812),
            params_norm: None,
            skipped_iterations: 0,
            nan_iterations: 0,
        }
    }

    #[test]
    fn log_line_matches_megatron_example() {
        assert_eq!(
            example().render("2026-01-01 12:00:00"),
            " [2026-01-01 12:00:00] iteration      100/    1000 | consumed samples:        51200 | elapsed time per iteration (ms): 1234.5 | learning rate: 3.000000E-04 | global batch size:   512 | lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 0.812 | number of skipped iterations:   0 | number of nan iterations:   0 |"
        );
    }

    /// `logger.log_params_norm`: Megatron's ` params norm: {:.3} |` right after the grad norm.
    #[test]
    fn params_norm_follows_the_grad_norm() {
        let r = LogLine { params_norm: Some(123.45678), ..example() }.render("t");
        assert!(
            r.contains("| grad norm: 0.812 | params norm: 123.457 | number of skipped iterations:"),
            "{r}"
        );
    }

    #[test]
    fn gpu_peak_memory_follows_throughput() {
        let line = LogLine {
            tflops_per_gpu: Some(512.25),
            mem_max_allocated_gb: Some(19.876),
            grad_norm: None,
            ..example()
        };
        let r = line.render("t");
        assert!(
            r.contains("| throughput per GPU (TFLOP/s/GPU): 512.2 | mem-max-allocated-gigabytes: 19.88 | learning rate:"),
            "{r}"
        );
    }

    #[test]
    fn validation_box_is_framed() {
        let b = validation_box("", "iteration 100 on validation set", 2.0);
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("lm loss value: 2.000000E+00 | lm loss PPL: 7.389056E+00"));
        assert_eq!(lines[0].len(), lines[1].len() + 1);
    }
}
