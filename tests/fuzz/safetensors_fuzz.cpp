// Fuzz target: the safetensors reader (include/tsp/model/safetensors.h) on arbitrary file bytes.
// It parses and validates the header, then reads every tensor small enough to hold (whole, into
// each destination dtype the file's dtype allows, and as a row range), as loading a model does.
// Rules in tests/fuzz/fuzz_util.h; run it as docs/testing.md says.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "tsp/core/error.h"
#include "tsp/model/safetensors.h"

namespace {

// Tensors above this many elements are validated but not read: the header check is what a
// hostile file attacks, and big reads only slow the fuzzer down.
constexpr int64_t kMaxReadElements = 1 << 16;

void read_into(const tsp::SafetensorsReader& reader, const tsp::SafetensorInfo& info,
               tsp::DType dtype) {
  const int64_t n = std::max<int64_t>(tsp::shape_numel(info.shape), 1);
  std::vector<int64_t> storage(static_cast<size_t>(n));  // 8 bytes an element: any dtype fits
  try {
    reader.read(info.name, tsp::TensorView(storage.data(), info.shape, dtype));
  } catch (const tsp::Error&) {
    // A dtype that cannot convert (e.g. U8 into F32) is an error by design.
  }
  if (!info.shape.empty() && info.shape[0] > 1) {
    // The second half of the rows, as a layout's shard is read.
    tsp::Shape rows = info.shape;
    const int64_t begin = rows[0] / 2;
    rows[0] -= begin;
    try {
      reader.read_rows(info.name, begin, info.shape[0],
                       tsp::TensorView(storage.data(), rows, dtype));
    } catch (const tsp::Error&) {
    }
  }
}

void run(const uint8_t* data, size_t size) {
  tsp_fuzz::MemFile file(data, size);
  tsp::SafetensorsReader reader(file.path());
  int64_t previous_end = 0;
  for (const tsp::SafetensorInfo& info : reader.tensors()) {
    // What the reader promises once the header is accepted: tensors tile the data buffer.
    fuzz_require(info.begin == previous_end && info.begin <= info.end, "offsets tile the buffer");
    previous_end = info.end;
    fuzz_require(reader.find(info.name) == &info, "find() returns the listed tensor");
    if (tsp::shape_numel(info.shape) > kMaxReadElements) continue;
    for (tsp::DType dtype : {tsp::DType::F32, tsp::DType::BF16, tsp::DType::I32, tsp::DType::I64}) {
      read_into(reader, info, dtype);
    }
  }
  try {
    reader.read("no such tensor", tsp::TensorView());
    fuzz_require(false, "reading an absent tensor throws");
  } catch (const tsp::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto fds_before = tsp_fuzz::open_fds();
  try {
    run(data, size);
  } catch (const tsp::Error&) {
    // Bad input, reported as it should be.
  }
  fuzz_require(tsp_fuzz::open_fds() == fds_before, "no file descriptor leaked");
  return 0;
}
