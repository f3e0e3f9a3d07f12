// Hugging Face safetensors, read and written to the format's specification: 8-byte little-endian
// header size N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// optional "__metadata__": {str: str}}, then the byte buffer (offsets relative to its start).
// Truncated or malformed files, overlapping/out-of-range offsets, unknown dtypes and wrong shapes
// are rejected with a tsp::Error naming the file and the problem, never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tsp/core/tensor.h"

namespace tsp {

struct SafetensorInfo {
  std::string name;
  std::string dtype;  // as in the file: "F32", "BF16", "F16", "I32", "I64", ...
  Shape shape;
  int64_t begin = 0, end = 0;  // byte offsets into the data buffer
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);  // parses and validates the header
  ~SafetensorsReader();
  const std::string& path() const { return path_; }
  const std::vector<SafetensorInfo>& tensors() const { return tensors_; }
  const SafetensorInfo* find(const std::string& name) const;  // nullptr when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Read a whole tensor into dst, converting F32/BF16 (and F16) to dst's dtype (F32 or BF16);
  // I32/I64 only into the same dtype. Errors name the tensor and both shapes on a mismatch.
  void read(const std::string& name, TensorView dst) const;
  // Read rows [row_begin, row_end) of the first dimension (a layout's shard of a weight).
  void read_rows(const std::string& name, int64_t row_begin, int64_t row_end, TensorView dst) const;

 private:
  std::string path_;
  std::vector<SafetensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  int64_t data_start_ = 0;
  struct File;
  std::unique_ptr<File> file_;
};

class SafetensorsWriter {
 public:
  // The view must stay alive until write(). Stored with the view's dtype (F32, BF16, I32, I64).
  void add(const std::string& name, TensorView t);
  void set_metadata(const std::string& key, const std::string& value);
  // Writes to "<path>.tmp.<pid>", fsyncs, then renames over path: a reader never sees a torn file.
  // Every write, the fsync, close and rename are checked: a full disk throws tsp::Error naming
  // path and leaves a previous file there unchanged. A device or FIFO (/dev/stdout) is written
  // in place.
  void write(const std::string& path) const;

 private:
  std::vector<std::pair<std::string, TensorView>> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace tsp
