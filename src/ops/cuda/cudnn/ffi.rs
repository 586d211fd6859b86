//! The few cuDNN 9 entry points of its backend (graph) API, loaded with `dlopen` at run time.
//!
//! Loaded rather than linked so that a machine without cuDNN still runs mbridge (on its own
//! flash kernels): PyTorch's CUDA 13 wheels ship it as `site-packages/nvidia/cudnn/lib`,
//! which the device's `env.sh` puts on `LD_LIBRARY_PATH`. Only the library's stable C ABI is
//! used; the enum values below are those of `cudnn_graph.h` (unchanged across cuDNN 9).

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

pub type Status = i32;
pub type Raw = *mut c_void;

/// A live `cudnnHandle_t` (only [`super::handle::with_handle`] makes one, for the duration of
/// a call that holds it exclusively).
#[derive(Clone, Copy)]
pub struct Handle(pub(super) Raw);

/// Environment variable naming the cuDNN library to load instead of the default search.
pub const LIBRARY_ENV: &str = "MBRIDGE_CUDNN_LIBRARY";
/// Library names tried in order (the dynamic loader searches `LD_LIBRARY_PATH` and its cache).
const CANDIDATES: &[&str] = &["libcudnn.so.9", "libcudnn.so"];

/// The function table of a loaded cuDNN.
pub struct Api {
    /// Keeps the functions below mapped; never dropped (lives in a static).
    _lib: libloading::Library,
    pub create: unsafe extern "C" fn(*mut Raw) -> Status,
    pub set_stream: unsafe extern "C" fn(Raw, *mut c_void) -> Status,
    pub create_descriptor: unsafe extern "C" fn(i32, *mut Raw) -> Status,
    pub destroy_descriptor: unsafe extern "C" fn(Raw) -> Status,
    pub finalize: unsafe extern "C" fn(Raw) -> Status,
    pub set_attribute: unsafe extern "C" fn(Raw, i32, i32, i64, *const c_void) -> Status,
    pub get_attribute: unsafe extern "C" fn(Raw, i32, i32, i64, *mut i64, *mut c_void) -> Status,
    pub execute: unsafe extern "C" fn(Raw, Raw, Raw) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    last_error: unsafe extern "C" fn(*mut c_char, usize),
    /// `cudnnGetVersion()`: major·10000 + minor·100 + patch for cuDNN 9.
    pub version: usize,
    /// The library that was loaded.
    pub name: String,
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The loaded cuDNN, or why none could be loaded (decided once per process).
pub fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let names: Vec<String> = match std::env::var(LIBRARY_ENV) {
        Ok(n) if !n.is_empty() => vec![n],
        _ => CANDIDATES.iter().map(|s| s.to_string()).collect(),
    };
    let mut errors = Vec::new();
    for name in &names {
        match load_one(name) {
            Ok(api) if api.version >= 90000 => return Ok(api),
            Ok(api) => errors.push(format!("{name}: version {} (need 9.x)", api.version)),
            Err(e) => errors.push(e),
        }
    }
    Err(format!("cuDNN could not be loaded ({})", errors.join("; ")))
}

fn load_one(name: &str) -> Result<Api, String> {
    // SAFETY: loading runs cuDNN's initializers, which only register its sub-libraries.
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| format!("{name}: {e}"))?;
    macro_rules! sym {
        ($s:literal) => {
            // SAFETY: the signature declared in `Api` is the one `cudnn_graph.h` gives the
            // symbol (handles and descriptors are opaque pointers, enums are C ints).
            *unsafe { lib.get(concat!($s, "\0").as_bytes()) }
                .map_err(|e| format!("{name}: {}: {e}", $s))?
        };
    }
    let get_version: unsafe extern "C" fn() -> usize = sym!("cudnnGetVersion");
    Ok(Api {
        create: sym!("cudnnCreate"),
        set_stream: sym!("cudnnSetStream"),
        create_descriptor: sym!("cudnnBackendCreateDescriptor"),
        destroy_descriptor: sym!("cudnnBackendDestroyDescriptor"),
        finalize: sym!("cudnnBackendFinalize"),
        set_attribute: sym!("cudnnBackendSetAttribute"),
        get_attribute: sym!("cudnnBackendGetAttribute"),
        execute: sym!("cudnnBackendExecute"),
        error_string: sym!("cudnnGetErrorString"),
        last_error: sym!("cudnnGetLastErrorString"),
        // SAFETY: takes no arguments, returns the library's version.
        version: unsafe { get_version() },
        name: name.to_string(),
        _lib: lib,
    })
}

impl Api {
    /// `Ok` for `CUDNN_STATUS_SUCCESS`, else an error naming `what`, the status and cuDNN's
    /// own last message (which says which attribute or engine refused).
    pub fn check(&self, status: Status, what: &str) -> candle_core::Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: cudnnGetErrorString returns a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr((self.error_string)(status)) }.to_string_lossy();
        let mut buf = vec![0 as c_char; 1024];
        // SAFETY: the buffer holds `len` bytes; cuDNN writes a NUL-terminated message.
        unsafe { (self.last_error)(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated within the buffer (zero-filled, cuDNN truncates).
        let last = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        candle_core::bail!(
            "cuDNN {what}: {name} ({status}){}",
            if last.is_empty() { String::new() } else { format!(": {last}") }
        )
    }
}

/// `cudnnBackendDescriptorType_t`.
pub mod kind {
    pub const POINTWISE: i32 = 0;
    pub const ENGINECFG: i32 = 3;
    pub const ENGINEHEUR: i32 = 4;
    pub const EXECUTION_PLAN: i32 = 5;
    pub const OPERATION_POINTWISE: i32 = 13;
    pub const OPERATIONGRAPH: i32 = 15;
    pub const VARIANT_PACK: i32 = 16;
    pub const TENSOR: i32 = 17;
    pub const MATMUL: i32 = 18;
    pub const OPERATION_MATMUL: i32 = 19;
    pub const REDUCTION: i32 = 21;
    pub const OPERATION_REDUCTION: i32 = 22;
    pub const OPERATION_RESHAPE: i32 = 31;
}

/// `cudnnBackendAttributeType_t`.
pub mod ty {
    pub const HANDLE: i32 = 0;
    pub const DATA_TYPE: i32 = 1;
    pub const BOOLEAN: i32 = 2;
    pub const INT64: i32 = 3;
    pub const FLOAT: i32 = 4;
    pub const VOID_PTR: i32 = 6;
    pub const HEUR_MODE: i32 = 8;
    pub const POINTWISE_MODE: i32 = 14;
    pub const BACKEND_DESCRIPTOR: i32 = 15;
    pub const REDUCTION_OPERATOR_TYPE: i32 = 18;
}

/// `cudnnBackendAttributeName_t`.
pub mod attr {
    pub const POINTWISE_MODE: i32 = 0;
    pub const POINTWISE_MATH_PREC: i32 = 1;
    pub const POINTWISE_AXIS: i32 = 9;
    pub const ENGINEHEUR_MODE: i32 = 200;
    pub const ENGINEHEUR_OPERATION_GRAPH: i32 = 201;
    pub const ENGINEHEUR_RESULTS: i32 = 202;
    pub const EXECUTION_PLAN_ENGINE_CONFIG: i32 = 401;
    pub const EXECUTION_PLAN_WORKSPACE_SIZE: i32 = 402;
    pub const OPERATION_POINTWISE_PW_DESCRIPTOR: i32 = 750;
    pub const OPERATION_POINTWISE_XDESC: i32 = 751;
    pub const OPERATION_POINTWISE_BDESC: i32 = 752;
    pub const OPERATION_POINTWISE_YDESC: i32 = 753;
    pub const OPERATION_POINTWISE_ALPHA1: i32 = 754;
    pub const OPERATION_POINTWISE_ALPHA2: i32 = 755;
    pub const OPERATION_POINTWISE_TDESC: i32 = 758;
    pub const OPERATIONGRAPH_HANDLE: i32 = 800;
    pub const OPERATIONGRAPH_OPS: i32 = 801;
    pub const TENSOR_BYTE_ALIGNMENT: i32 = 900;
    pub const TENSOR_DATA_TYPE: i32 = 901;
    pub const TENSOR_DIMENSIONS: i32 = 902;
    pub const TENSOR_STRIDES: i32 = 903;
    pub const TENSOR_UNIQUE_ID: i32 = 906;
    pub const TENSOR_IS_VIRTUAL: i32 = 907;
    pub const TENSOR_IS_BY_VALUE: i32 = 908;
    pub const VARIANT_PACK_UNIQUE_IDS: i32 = 1000;
    pub const VARIANT_PACK_DATA_POINTERS: i32 = 1001;
    pub const VARIANT_PACK_WORKSPACE: i32 = 1003;
    pub const MATMUL_COMP_TYPE: i32 = 1500;
    pub const OPERATION_MATMUL_ADESC: i32 = 1520;
    pub const OPERATION_MATMUL_BDESC: i32 = 1521;
    pub const OPERATION_MATMUL_CDESC: i32 = 1522;
    pub const OPERATION_MATMUL_DESC: i32 = 1523;
    pub const REDUCTION_OPERATOR: i32 = 1600;
    pub const REDUCTION_COMP_TYPE: i32 = 1601;
    pub const OPERATION_REDUCTION_XDESC: i32 = 1610;
    pub const OPERATION_REDUCTION_YDESC: i32 = 1611;
    pub const OPERATION_REDUCTION_DESC: i32 = 1612;
    pub const OPERATION_RESHAPE_XDESC: i32 = 2200;
    pub const OPERATION_RESHAPE_YDESC: i32 = 2201;
}

/// `cudnnDataType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum DataType {
    Float = 0,
    Half = 2,
    Int32 = 4,
    BFloat16 = 9,
    Boolean = 11,
}

/// `cudnnPointwiseMode_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Pointwise {
    Add = 0,
    Mul = 1,
    Div = 6,
    Sub = 9,
    Exp = 13,
    Log = 15,
    Identity = 21,
    CmpGe = 303,
    GenIndex = 501,
    BinarySelect = 601,
}

/// `cudnnReduceTensorOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Reduce {
    Add = 0,
    Max = 3,
}

/// `cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A`.
pub const HEUR_MODE_A: i32 = 3;
