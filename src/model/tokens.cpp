// llm.c token files: a header of 256 int32 (magic, version, token count, the rest zero) followed by
// the ids, uint16 (magic 20240520, version 1) or uint32 (magic 20240801, version 7).
#include "tsp/model/tokens.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "model/io_internal.h"
#include "tsp/core/error.h"

namespace tsp {

namespace {

constexpr int32_t kMagic16 = 20240520, kVersion16 = 1;
constexpr int32_t kMagic32 = 20240801, kVersion32 = 7;
constexpr int64_t kHeaderInts = 256, kHeaderBytes = kHeaderInts * 4;

class Fd {
 public:
  explicit Fd(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    TSP_CHECK(fd_ >= 0, "cannot open token file {}: {}", path, std::strerror(errno));
  }
  ~Fd() { ::close(fd_); }
  int get() const { return fd_; }

 private:
  int fd_;
};

// header = the first three int32 (magic, version, count) of a file of `size` bytes.
bool layout_matches(const int32_t* header, int64_t size) {
  const int64_t bytes_per_token = header[1] == kVersion16 ? 2 : header[1] == kVersion32 ? 4 : 0;
  return bytes_per_token > 0 && header[2] >= 0 &&
         size == kHeaderBytes + int64_t{header[2]} * bytes_per_token;
}

TokenFileInfo read_info(int fd, const std::string& path) {
  struct stat st;
  TSP_CHECK(::fstat(fd, &st) == 0, "{}: fstat failed: {}", path, std::strerror(errno));
  TSP_CHECK(st.st_size >= kHeaderBytes,
            "{}: {} bytes is shorter than the 1024-byte header of an llm.c token file "
            "(truncated, or not a token file)",
            path, static_cast<int64_t>(st.st_size));
  int32_t header[3];
  io::pread_all(fd, header, sizeof header, 0, path);
  TokenFileInfo info;
  info.magic = header[0];
  info.version = header[1];
  if (info.magic == kMagic16) {
    TSP_CHECK(info.version == kVersion16,
              "{}: uint16 token file (magic {}) has unsupported version {}; expected {}", path,
              kMagic16, info.version, kVersion16);
    info.bytes_per_token = 2;
  } else if (info.magic == kMagic32) {
    TSP_CHECK(info.version == kVersion32,
              "{}: uint32 token file (magic {}) has unsupported version {}; expected {}", path,
              kMagic32, info.version, kVersion32);
    info.bytes_per_token = 4;
  } else {
    TSP_FAIL(
        "{}: bad magic number {}{}; an llm.c token file starts with {} (uint16 ids) or {} "
        "(uint32 ids). Write one with `tsp encode`",
        path, info.magic,
        layout_matches(header, st.st_size)
            ? " (its version and token count are llm.c's: the magic number is damaged)"
            : "",
        kMagic16, kMagic32);
  }
  TSP_CHECK(header[2] >= 0, "{}: negative token count {} in the header", path, header[2]);
  info.num_tokens = header[2];
  const int64_t expected = kHeaderBytes + info.num_tokens * info.bytes_per_token;
  TSP_CHECK(st.st_size == expected,
            "{}: header announces {} tokens ({} bytes with the header) but the file has {} bytes "
            "(truncated or corrupt)",
            path, info.num_tokens, expected, static_cast<int64_t>(st.st_size));
  return info;
}

}  // namespace

TokenFileInfo read_token_file_info(const std::string& path) {
  Fd fd(path);
  return read_info(fd.get(), path);
}

bool has_llmc_layout(const std::string& path) {
  Fd fd(path);
  struct stat st;
  TSP_CHECK(::fstat(fd.get(), &st) == 0, "{}: fstat failed: {}", path, std::strerror(errno));
  if (st.st_size < kHeaderBytes) return false;
  int32_t header[3];
  io::pread_all(fd.get(), header, sizeof header, 0, path);
  return layout_matches(header, st.st_size);
}

std::vector<int32_t> read_tokens(const std::string& path, int64_t begin, int64_t count) {
  Fd fd(path);
  const TokenFileInfo info = read_info(fd.get(), path);
  TSP_CHECK(
      begin >= 0 && count >= 0 && begin <= info.num_tokens && count <= info.num_tokens - begin,
      "{}: tokens [{}, {}) are out of bounds for a file of {} tokens", path, begin, begin + count,
      info.num_tokens);
  std::vector<int32_t> ids(static_cast<size_t>(count));
  if (count == 0) return ids;
  const int64_t offset = kHeaderBytes + begin * info.bytes_per_token;
  if (info.bytes_per_token == 2) {
    std::vector<uint16_t> raw(ids.size());
    io::pread_all(fd.get(), raw.data(), raw.size() * 2, offset, path);
    for (size_t i = 0; i < raw.size(); ++i) ids[i] = raw[i];
  } else {
    std::vector<uint32_t> raw(ids.size());
    io::pread_all(fd.get(), raw.data(), raw.size() * 4, offset, path);
    for (size_t i = 0; i < raw.size(); ++i) {
      TSP_CHECK(raw[i] <= static_cast<uint32_t>(std::numeric_limits<int32_t>::max()),
                "{}: token {} has id {}, beyond the int32 range", path, begin + int64_t(i), raw[i]);
      ids[i] = static_cast<int32_t>(raw[i]);
    }
  }
  return ids;
}

std::vector<int32_t> read_all_tokens(const std::string& path) {
  return read_tokens(path, 0, read_token_file_info(path).num_tokens);
}

void write_token_file(const std::string& path, const std::vector<int32_t>& ids, bool force_uint32) {
  TSP_CHECK(ids.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
            "{}: {} tokens do not fit the int32 count of an llm.c header; split the data", path,
            ids.size());
  bool fits16 = !force_uint32;
  for (size_t i = 0; i < ids.size(); ++i) {
    TSP_CHECK(ids[i] >= 0, "{}: token {} has negative id {}", path, i, ids[i]);
    if (ids[i] > 65535) fits16 = false;
  }
  int32_t header[kHeaderInts] = {};
  header[0] = fits16 ? kMagic16 : kMagic32;
  header[1] = fits16 ? kVersion16 : kVersion32;
  header[2] = static_cast<int32_t>(ids.size());
  // AtomicFile checks every write, the fsync, the close and the rename (a full disk is an error
  // naming the file), and writes a device or pipe (/dev/stdout) in place.
  io::AtomicFile out(path);
  out.write(header, sizeof header);
  constexpr size_t kChunk = 1 << 16;
  for (size_t i = 0; i < ids.size(); i += kChunk) {
    const size_t m = std::min(kChunk, ids.size() - i);
    if (fits16) {
      std::vector<uint16_t> buf(ids.begin() + i, ids.begin() + i + m);
      out.write(buf.data(), m * 2);
    } else {
      out.write(ids.data() + i, m * 4);  // non-negative int32 has the uint32 bit pattern
    }
  }
  out.commit();
}

}  // namespace tsp
