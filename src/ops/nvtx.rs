//! NVTX ranges (`nvtxRangePushA` / `nvtxRangePop`) from a library loaded at run time.
//!
//! NVTX is how Nsight Systems learns what the program was doing: nsys sets
//! `NVTX_INJECTION64_PATH`, and NVIDIA's NVTX library forwards every push/pop to the injected
//! tool (without a tool they are near-free no-ops). The library is loaded with `dlopen` rather
//! than linked because none is guaranteed to exist: CUDA 13 ships `libnvtx3interop.so.1` (the
//! `nvidia-nvtx` wheel PyTorch depends on, under `site-packages/nvidia/cu13/lib`), CUDA ≤ 12
//! shipped `libnvToolsExt.so.1`, and a CPU machine usually has neither. A missing library is
//! reported once and the ranges become no-ops: profiling must never stop training.
//!
//! It lives under `ops/` because the project keeps its `unsafe` FFI there and in
//! `parallel/comm/`.

use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

type RangePushA = unsafe extern "C" fn(*const c_char) -> c_int;
type RangePop = unsafe extern "C" fn() -> c_int;

/// Environment variable naming the NVTX library to load instead of the default search.
pub const LIBRARY_ENV: &str = "MBRIDGE_NVTX_LIBRARY";

/// Library names tried in order (the dynamic loader searches `LD_LIBRARY_PATH` and its cache).
pub const CANDIDATES: &[&str] =
    &["libnvtx3interop.so.1", "libnvtx3interop.so", "libnvToolsExt.so.1", "libnvToolsExt.so"];

struct Nvtx {
    /// Keeps the functions below mapped; never dropped (lives in a static).
    _lib: libloading::Library,
    push: RangePushA,
    pop: RangePop,
    name: String,
}

static NVTX: OnceLock<Result<Nvtx, String>> = OnceLock::new();

/// `name: error: cause: ...` (libloading's own message is only "dlopen failed").
fn describe(name: &str, e: &libloading::Error) -> String {
    let mut s = format!("{name}: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

fn load_one(name: &str) -> Result<Nvtx, String> {
    // SAFETY: loading runs the library's initializers; NVIDIA's NVTX libraries only set up
    // their function tables (the injected tool is attached lazily on the first call).
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| describe(name, &e))?;
    // SAFETY: the NVTX C API declares exactly these signatures:
    // `int nvtxRangePushA(const char*)` and `int nvtxRangePop(void)`.
    let push = unsafe { lib.get::<RangePushA>(b"nvtxRangePushA\0") }
        .map(|s| *s)
        .map_err(|e| describe(name, &e))?;
    // SAFETY: as above.
    let pop = unsafe { lib.get::<RangePop>(b"nvtxRangePop\0") }
        .map(|s| *s)
        .map_err(|e| describe(name, &e))?;
    Ok(Nvtx { _lib: lib, push, pop, name: name.to_string() })
}

fn load() -> Result<Nvtx, String> {
    let names: Vec<String> = match std::env::var(LIBRARY_ENV) {
        Ok(p) if !p.is_empty() => vec![p],
        _ => CANDIDATES.iter().map(|s| s.to_string()).collect(),
    };
    let mut tried = Vec::new();
    for name in &names {
        match load_one(name) {
            Ok(n) => return Ok(n),
            Err(e) => tried.push(e),
        }
    }
    Err(tried.join("; "))
}

/// Loads the NVTX library on first use and says once, at info or warn level, which one was
/// found or why none was. True when ranges reach a library.
pub fn available() -> bool {
    NVTX.get_or_init(|| {
        let r = load();
        match &r {
            Ok(n) => tracing::info!("NVTX ranges go through {}", n.name),
            Err(e) => tracing::warn!(
                "no NVTX library could be loaded, so nsys will show no mbridge ranges (training \
                 goes on; set {LIBRARY_ENV}=/path/to/libnvtx3interop.so.1 or put it on \
                 LD_LIBRARY_PATH): {e}"
            ),
        }
        r
    })
    .is_ok()
}

/// Opens a range named `name` on this thread (no-op without a library; call [`available`]
/// first to load it). Interior NULs are replaced, since the C API takes a C string.
pub fn push(name: &str) {
    if let Some(Ok(n)) = NVTX.get() {
        let c = CString::new(name.replace('\0', " ")).expect("NULs were replaced");
        // SAFETY: a valid NUL-terminated string that outlives the call.
        unsafe { (n.push)(c.as_ptr()) };
    }
}

/// Closes the innermost range of this thread (no-op without a library).
pub fn pop() {
    if let Some(Ok(n)) = NVTX.get() {
        // SAFETY: no arguments; popping with no open range is defined (returns an error code).
        unsafe { (n.pop)() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = load_one("libmbridge-no-such-nvtx.so.9").err().expect("must not load");
        // The loader's reason, not only libloading's bare "dlopen failed".
        assert!(e.starts_with("libmbridge-no-such-nvtx.so.9: "), "{e}");
        assert!(e.contains("cannot open shared object file"), "{e}");
    }

    #[test]
    fn a_library_without_nvtx_symbols_is_refused() {
        // libc is always there and has no nvtxRangePushA.
        let e = load_one("libc.so.6").err().expect("libc has no NVTX");
        assert!(e.contains("nvtxRangePushA") || e.contains("undefined symbol"), "{e}");
    }
}
