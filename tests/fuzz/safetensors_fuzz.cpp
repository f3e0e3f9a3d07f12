// Fuzz target: the safetensors reader (include/tsp/model/safetensors.h) on arbitrary file bytes.
// It parses and validates the header, then reads every tensor small enough to hold (whole, into
// each destination dtype the file's dtype allows, and as a row range), as loading a model does.
// Rules in tests/fuzz/fuzz_util.h; run it as docs/testing.md says.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fuzz_util.h"
#include "tsp/core/error.h"
#include "tsp/model/safetensors.h"

namespace {

// Tensors above this many elements are validated but not read: the header check is what a
// hostile file attacks, and big reads only slow the fuzzer down.
constexpr int64_t kMaxReadElements = 1 << 16;

// The file's dtype when it is stored as is in a tsp tensor of this dtype (no conversion).
const char* stored_as(tsp::DType dtype) {
  switch (dtype) {
    case tsp::DType::F32:
      return "F32";
    case tsp::DType::BF16:
      return "BF16";
    case tsp::DType::I32:
      return "I32";
    case tsp::DType::I64:
      return "I64";
    case tsp::DType::F64:  // not a safetensors dtype tsp reads
      return "";
  }
  return "";
}

// Reads the tensor whole, then its second half of rows (as a layout's shard is read). Without a
// conversion the bytes read must be the file's bytes at the tensor's offsets (`buffer` is the
// data buffer of the input).
void read_into(const tsp::SafetensorsReader& reader, const tsp::SafetensorInfo& info,
               tsp::DType dtype, const uint8_t* buffer) {
  const int64_t n = std::max<int64_t>(tsp::shape_numel(info.shape), 1);
  std::vector<int64_t> storage(static_cast<size_t>(n));  // 8 bytes an element: any dtype fits
  const bool as_is = info.dtype == stored_as(dtype);
  const int64_t nbytes = info.end - info.begin;
  try {
    reader.read(info.name, tsp::TensorView(storage.data(), info.shape, dtype));
    fuzz_require(!as_is || std::memcmp(storage.data(), buffer + info.begin, nbytes) == 0,
                 "a tensor read without conversion holds the file's bytes");
  } catch (const tsp::Error&) {
    // A dtype that cannot convert (e.g. U8 into F32) is an error by design.
  }
  if (!info.shape.empty() && info.shape[0] > 1) {
    tsp::Shape rows = info.shape;
    const int64_t begin = rows[0] / 2;
    rows[0] -= begin;
    const int64_t skipped = nbytes / info.shape[0] * begin;
    try {
      reader.read_rows(info.name, begin, info.shape[0],
                       tsp::TensorView(storage.data(), rows, dtype));
      fuzz_require(!as_is || std::memcmp(storage.data(), buffer + info.begin + skipped,
                                         nbytes - skipped) == 0,
                   "rows read without conversion hold the file's bytes");
    } catch (const tsp::Error&) {
    }
  }
}

void run(const uint8_t* data, size_t size) {
  tsp_fuzz::MemFile file(data, size);
  tsp::SafetensorsReader reader(file.path());
  // Accepted, so the file holds the 8-byte header size and the header: the rest is the buffer.
  uint64_t header_size = 0;
  std::memcpy(&header_size, data, 8);
  const uint8_t* buffer = data + 8 + header_size;
  int64_t previous_end = 0;
  for (const tsp::SafetensorInfo& info : reader.tensors()) {
    // What the reader promises once the header is accepted: tensors tile the data buffer.
    fuzz_require(info.begin == previous_end && info.begin <= info.end, "offsets tile the buffer");
    previous_end = info.end;
    fuzz_require(reader.find(info.name) == &info, "find() returns the listed tensor");
    if (tsp::shape_numel(info.shape) > kMaxReadElements) continue;
    for (tsp::DType dtype : {tsp::DType::F32, tsp::DType::BF16, tsp::DType::I32, tsp::DType::I64}) {
      read_into(reader, info, dtype, buffer);
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
  return tsp_fuzz::fuzz_one(run, data, size);
}
