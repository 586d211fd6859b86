//! One cuDNN handle per GPU, bound to candle's stream for each use.

use super::ffi::{api, Handle as Live, Raw};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

struct Handle(Raw);

// SAFETY: a cuDNN handle may move between threads; every use holds the map's mutex, so no
// two threads use one handle at a time.
unsafe impl Send for Handle {}

fn handles() -> &'static Mutex<HashMap<usize, Handle>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}

/// Runs `f` with `dev`'s cuDNN handle (created on first use), its work queued on `dev`'s
/// stream. The handle stays locked for the duration of `f`.
pub fn with_handle<R>(dev: &CudaDevice, f: impl FnOnce(Live) -> Result<R>) -> Result<R> {
    let api = api().map_err(candle_core::Error::Msg)?;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    // cuDNN works on the calling thread's current context.
    ctx.bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("cuDNN: binding the CUDA context: {e:?}")))?;
    let mut map = handles().lock().map_err(|_| candle_core::Error::Msg("cuDNN handles".into()))?;
    let handle = match map.entry(ctx.ordinal()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut().0,
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut raw = std::ptr::null_mut();
            // SAFETY: writes one handle for the current context's device.
            api.check(unsafe { (api.create)(&mut raw) }, "create handle")?;
            e.insert(Handle(raw)).0
        }
    };
    // SAFETY: the handle is valid; candle's stream outlives this call.
    api.check(unsafe { (api.set_stream)(handle, stream.cu_stream() as Raw) }, "set stream")?;
    f(Live(handle))
}
