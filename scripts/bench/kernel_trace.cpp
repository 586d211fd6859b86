// A CUDA kernel tracer loaded into any process through CUDA_INJECTION64_PATH (benchmarks
// only; the product never loads it). It records every kernel, memcpy and memset with CUPTI's
// activity API and, at exit, prints one table per process: time per name summed over the
// window, divided by KERNEL_TRACE_ITERS (so a row reads "per iteration"), largest first.
// The window is what lies between cuProfilerStart and cuProfilerStop (mbridge's
// `profiling.use_nsys_profiler` steps, which synchronize the device at both ends); a process
// that never calls them is traced from KERNEL_TRACE_SKIP_MS after its first kernel on.
//
// Built on the GPU machine against the CUPTI that ships with PyTorch's wheels
// (scripts/bench/gpu_kernels.sh): the record layout must match the library's version, so the
// newest CUpti_ActivityKernelN (MemcpyN, MemsetN) of those headers is passed in as KREC
// (MCREC, MSREC).
#include <cupti.h>
#include <cxxabi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Total {
  double ns = 0;
  long count = 0;
};

std::mutex lock;
std::map<std::string, Total> totals;
uint64_t first_start = 0;
// cuProfilerStart/Stop timestamps; 0 = not seen.
uint64_t window_begin = 0, window_end = 0;
uint64_t busy_begin = UINT64_MAX, busy_end = 0;
// Every recorded activity, for the idle gaps between them.
struct Span {
  uint64_t start, end;
  std::string name;
};
std::vector<Span> spans;

// Short readable names: demangled, template arguments and parameter lists cut.
std::string short_name(const char* mangled) {
  if (!mangled) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : mangled;
  free(d);
  auto paren = s.find('(');
  if (paren != std::string::npos) s = s.substr(0, paren);
  if (s.size() > 110) s = s.substr(0, 110);
  return s;
}

void record(const std::string& name, uint64_t start, uint64_t end) {
  static double skip_ns = [] {
    const char* v = getenv("KERNEL_TRACE_SKIP_MS");
    return v ? atof(v) * 1e6 : 0.0;
  }();
  std::lock_guard<std::mutex> g(lock);
  if (window_begin != 0) {
    if (start < window_begin || (window_end != 0 && start > window_end)) return;
  } else {
    if (first_start == 0) first_start = start;
    if (start < first_start + skip_ns) return;
  }
  busy_begin = std::min(busy_begin, start);
  busy_end = std::max(busy_end, end);
  Total& t = totals[name];
  t.ns += double(end - start);
  t.count += 1;
  spans.push_back({start, end, name});
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t*>(aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        auto* k = reinterpret_cast<KREC*>(rec);
        record(short_name(k->name), k->start, k->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto* m = reinterpret_cast<MCREC*>(rec);
        record("[memcpy kind " + std::to_string(m->copyKind) + "]", m->start, m->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto* m = reinterpret_cast<MSREC*>(rec);
        record("[memset]", m->start, m->end);
        break;
      }
      default:
        break;
    }
  }
  free(buffer);
}

void CUPTIAPI on_driver_call(void*, CUpti_CallbackDomain, CUpti_CallbackId id, const void* data) {
  auto* info = static_cast<const CUpti_CallbackData*>(data);
  uint64_t now = 0;
  if (id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart && info->callbackSite == CUPTI_API_EXIT) {
    cuptiGetTimestamp(&now);
    std::lock_guard<std::mutex> g(lock);
    if (window_begin == 0) {
      window_begin = now;
      // Records of kernels before the window may already be counted: start over.
      totals.clear();
      spans.clear();
      busy_begin = UINT64_MAX;
      busy_end = 0;
    }
  } else if (id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStop && info->callbackSite == CUPTI_API_ENTER) {
    cuptiGetTimestamp(&now);
    std::lock_guard<std::mutex> g(lock);
    window_end = now;
  }
}

// Where the GPU sat idle: time with no activity running, summed per (activity before, activity
// after) pair, largest first (KERNEL_TRACE_GAPS pairs, default 10).
void report_gaps(double iters) {
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.start < b.start; });
  std::map<std::string, Total> gaps;
  double idle = 0;
  uint64_t busy_until = 0;
  const std::string* last = nullptr;
  for (const Span& s : spans) {
    if (last && s.start > busy_until) {
      Total& g = gaps[*last + "  ->  " + s.name];
      g.ns += double(s.start - busy_until);
      g.count += 1;
      idle += double(s.start - busy_until);
    }
    if (s.end >= busy_until) {
      busy_until = s.end;
      last = &s.name;
    }
  }
  std::vector<std::pair<std::string, Total>> rows(gaps.begin(), gaps.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  fprintf(stderr, "KTRACE idle %.3f ms per iteration between activities; largest:\n",
          idle / iters / 1e6);
  int top = getenv("KERNEL_TRACE_GAPS") ? atoi(getenv("KERNEL_TRACE_GAPS")) : 10;
  for (int i = 0; i < int(rows.size()) && i < top; i++) {
    auto& [pair, g] = rows[i];
    fprintf(stderr, "KTRACE idle %8.3f ms %6.1f times  %s\n", g.ns / iters / 1e6,
            g.count / iters, pair.c_str());
  }
}

void report() {
  cuptiActivityFlushAll(1);
  const char* it = getenv("KERNEL_TRACE_ITERS");
  double iters = it ? std::max(1.0, atof(it)) : 1.0;
  std::vector<std::pair<std::string, Total>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  double sum = 0;
  for (auto& r : rows) sum += r.second.ns;
  if (rows.empty()) return;
  uint64_t span = window_end > window_begin && window_begin != 0 ? window_end - window_begin
                                                                  : busy_end - busy_begin;
  fprintf(stderr,
          "KTRACE pid %d: %.2f ms kernel time per iteration, %.2f ms wall per iteration (%s)\n",
          int(getpid()), sum / iters / 1e6, double(span) / iters / 1e6,
          window_begin ? "cuProfilerStart..Stop" : "first to last kernel");
  int top = getenv("KERNEL_TRACE_TOP") ? atoi(getenv("KERNEL_TRACE_TOP")) : 45;
  for (int i = 0; i < int(rows.size()) && i < top; i++) {
    auto& [name, t] = rows[i];
    fprintf(stderr, "KTRACE %8.3f ms %5.1f%% %6.1f calls  %s\n", t.ns / iters / 1e6,
            100.0 * t.ns / sum, t.count / iters, name.c_str());
  }
  report_gaps(iters);
}

}  // namespace

extern "C" int InitializeInjection() {
  cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  CUpti_SubscriberHandle subscriber;
  cuptiSubscribe(&subscriber, on_driver_call, nullptr);
  cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart);
  cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop);
  atexit(report);
  return 1;
}
