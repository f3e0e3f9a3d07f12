// Internal helpers shared by the model I/O files (safetensors, token files, model directories):
// an atomically published output file, and the safetensors header writer. Not a public header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tsp/core/tensor.h"

namespace tsp::io {

// A file written under a temporary name "<path>.tmp.<pid>" in the same directory and renamed over
// `path` by commit() after fsync, so readers see either the old file or the complete new one. If
// the object dies without commit() (an exception), the temporary file is removed. Every write,
// the fsync, the close and the rename are checked (a full disk is an error naming the file).
// A path that exists and is not a regular file (/dev/null, /dev/stdout, a FIFO) is written in
// place: renaming over a device would replace it.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t bytes);
  // Writes n elements of src converted to `to` (F32 <-> BF16, or same dtype as a plain copy).
  void write_converted(const void* src, DType from, DType to, int64_t n);
  void commit();  // fsync, close, rename over path, fsync the directory
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
  bool in_place_ = false;  // path is a device or FIFO: written directly, never renamed or removed
};

// Reads exactly `bytes` bytes at `offset` (retrying short reads and EINTR); an error or an early
// end of file is an error naming `path` and the byte offset.
void pread_all(int fd, void* dst, size_t bytes, int64_t offset, const std::string& path);

// Safetensors dtype string of one of our dtypes ("F32", "BF16", "I32", "I64").
const char* safetensors_dtype(DType t);

struct HeaderEntry {
  std::string name;
  DType dtype;
  Shape shape;
};
// The 8-byte little-endian length followed by the JSON header, space-padded so the data buffer
// starts at a multiple of 8 bytes (as the Hugging Face library does). Tensors are laid out in the
// order given, back to back. "__metadata__" is written only when non-empty.
std::string safetensors_header(const std::vector<HeaderEntry>& entries,
                               const std::map<std::string, std::string>& metadata);

}  // namespace tsp::io
