// Safetensors reader and writer (format: https://github.com/huggingface/safetensors).
//
// The reader uses pread, not mmap: a file truncated by someone else after it was opened then gives
// a short read (a tsp::Error) instead of SIGBUS, and read_rows still touches only the bytes of the
// requested rows. Every header field is validated before any data is read, with the same rules as
// the reference implementation: offsets must tile the byte buffer exactly (no overlap, no hole,
// nothing after the last tensor) and each tensor's byte size must equal numel · dtype size.
#include "tsp/model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "model/io_internal.h"
#include "tsp/core/error.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

namespace tsp {

namespace {

// The reference implementation refuses headers above 100 MB (a DoS guard); so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

int64_t st_dtype_size(const std::string& dtype) {
  static const std::unordered_map<std::string, int64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// IEEE half -> float (exact: every half is a float).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // ±0
  } else {
    // Subnormal half: normalise the mantissa.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

struct SafetensorsReader::File {
  int fd = -1;
  int64_t size = 0;
  std::unordered_map<std::string, size_t> index;  // name -> position in tensors_
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  file_ = std::make_unique<File>();
  file_->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TSP_CHECK(file_->fd >= 0, "cannot open safetensors file {}: {}", path, std::strerror(errno));
  struct stat st;
  TSP_CHECK(::fstat(file_->fd, &st) == 0, "{}: fstat failed: {}", path, std::strerror(errno));
  TSP_CHECK(S_ISREG(st.st_mode), "{} is not a regular file", path);
  file_->size = st.st_size;

  TSP_CHECK(file_->size >= 8,
            "{}: not a safetensors file: {} bytes, too short for the 8-byte header size", path,
            file_->size);
  uint64_t header_size = 0;
  io::pread_all(file_->fd, &header_size, 8, 0, path);
  TSP_CHECK(header_size <= kMaxHeaderBytes,
            "{}: header size {} is larger than the 100 MB limit (corrupt or not a safetensors "
            "file)",
            path, header_size);
  TSP_CHECK(header_size <= static_cast<uint64_t>(file_->size - 8),
            "{}: header size {} exceeds the file size {} (truncated or corrupt file)", path,
            header_size, file_->size);
  std::string header(header_size, '\0');
  io::pread_all(file_->fd, header.data(), header.size(), 8, path);
  data_start_ = 8 + static_cast<int64_t>(header_size);
  const int64_t buffer_size = file_->size - data_start_;

  TSP_CHECK(!header.empty() && header[0] == '{',
            "{}: header does not start with '{{' (not a safetensors file?)", path);
  nlohmann::json j;
  std::set<std::string> top_keys;
  std::string duplicate;
  try {
    // The callback sees keys as they are parsed: duplicated top-level names would otherwise be
    // silently merged (last one wins), making the file's meaning ambiguous.
    j = nlohmann::json::parse(
        header, [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
          if (ev == nlohmann::json::parse_event_t::key && depth == 1 &&
              !top_keys.insert(parsed.get<std::string>()).second && duplicate.empty()) {
            duplicate = parsed.get<std::string>();
          }
          return true;
        });
  } catch (const nlohmann::json::exception& e) {
    TSP_FAIL("{}: header is not valid JSON: {}", path, e.what());
  }
  TSP_CHECK(duplicate.empty(), "{}: header names \"{}\" twice", path, duplicate);
  TSP_CHECK(j.is_object(), "{}: header must be a JSON object", path);

  for (auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      TSP_CHECK(entry.is_object(), "{}: __metadata__ must be an object of strings", path);
      for (auto& [k, v] : entry.items()) {
        TSP_CHECK(v.is_string(), "{}: __metadata__[\"{}\"] must be a string, got {}", path, k,
                  v.dump());
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    TSP_CHECK(entry.is_object(), "{}: entry for tensor \"{}\" must be an object", path, name);
    SafetensorInfo info;
    info.name = name;
    auto dt = entry.find("dtype");
    TSP_CHECK(dt != entry.end() && dt->is_string(), "{}: tensor \"{}\" has no string \"dtype\"",
              path, name);
    info.dtype = dt->get<std::string>();
    const int64_t esize = st_dtype_size(info.dtype);
    TSP_CHECK(esize > 0, "{}: tensor \"{}\" has unknown dtype \"{}\"", path, name, info.dtype);

    auto sh = entry.find("shape");
    TSP_CHECK(sh != entry.end() && sh->is_array(), "{}: tensor \"{}\" has no \"shape\" array", path,
              name);
    // numel · size with overflow checks: a hostile shape must not wrap around to a small size.
    int64_t nbytes = esize;
    for (auto& d : *sh) {
      TSP_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                "{}: tensor \"{}\" has an invalid dimension {} in its shape", path, name, d.dump());
      const uint64_t ud = d.get<uint64_t>();
      TSP_CHECK(
          ud <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) &&
              (ud == 0 || nbytes <= std::numeric_limits<int64_t>::max() / static_cast<int64_t>(ud)),
          "{}: tensor \"{}\" shape {} is too large", path, name, sh->dump());
      info.shape.push_back(static_cast<int64_t>(ud));
      nbytes *= static_cast<int64_t>(ud);
    }
    auto off = entry.find("data_offsets");
    TSP_CHECK(off != entry.end() && off->is_array() && off->size() == 2 &&
                  (*off)[0].is_number_unsigned() && (*off)[1].is_number_unsigned(),
              "{}: tensor \"{}\" needs \"data_offsets\": [begin, end] with non-negative integers",
              path, name);
    const uint64_t b = (*off)[0].get<uint64_t>(), e = (*off)[1].get<uint64_t>();
    TSP_CHECK(b <= e && e <= static_cast<uint64_t>(buffer_size),
              "{}: tensor \"{}\" data_offsets [{}, {}) lie outside the {}-byte data buffer "
              "(truncated or corrupt file)",
              path, name, b, e, buffer_size);
    info.begin = static_cast<int64_t>(b);
    info.end = static_cast<int64_t>(e);
    TSP_CHECK(info.end - info.begin == nbytes,
              "{}: tensor \"{}\" is {} {} = {} bytes but its data_offsets [{}, {}) span {}", path,
              name, info.dtype, shape_str(info.shape), nbytes, b, e, info.end - info.begin);
    tensors_.push_back(std::move(info));
  }

  // Offsets must tile [0, buffer_size) exactly, in some order.
  std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t expected = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    TSP_CHECK(t.begin >= expected, "{}: tensors \"{}\" [{}, {}) and \"{}\" [{}, {}) overlap", path,
              tensors_[i - 1].name, tensors_[i - 1].begin, tensors_[i - 1].end, t.name, t.begin,
              t.end);
    TSP_CHECK(t.begin == expected,
              "{}: bytes [{}, {}) before tensor \"{}\" belong to no tensor (the format forbids "
              "holes)",
              path, expected, t.begin, t.name);
    expected = t.end;
    file_->index[t.name] = i;
  }
  TSP_CHECK(expected == buffer_size,
            "{}: {} bytes after the last tensor belong to no tensor (data buffer {} bytes, "
            "tensors end at {})",
            path, buffer_size - expected, buffer_size, expected);
}

SafetensorsReader::~SafetensorsReader() = default;

const SafetensorInfo* SafetensorsReader::find(const std::string& name) const {
  auto it = file_->index.find(name);
  return it == file_->index.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsReader::read(const std::string& name, TensorView dst) const {
  const SafetensorInfo* info = find(name);
  TSP_CHECK(info != nullptr, "{}: no tensor named \"{}\" ({} tensors in the file)", path_, name,
            tensors_.size());
  TSP_CHECK(dst.shape() == info->shape,
            "{}: tensor \"{}\" has shape {} but the destination has shape {}", path_, name,
            shape_str(info->shape), shape_str(dst.shape()));
  read_rows(name, 0, info->shape.empty() ? 1 : info->shape[0],
            info->shape.empty() ? dst.reshape({1}) : dst);
}

void SafetensorsReader::read_rows(const std::string& name, int64_t row_begin, int64_t row_end,
                                  TensorView dst) const {
  const SafetensorInfo* info = find(name);
  TSP_CHECK(info != nullptr, "{}: no tensor named \"{}\" ({} tensors in the file)", path_, name,
            tensors_.size());
  check_host(dst);  // files are read into host memory (ShardStore::load stages, then uploads)
  // A 0-d tensor reads as one row of one element.
  Shape shape = info->shape.empty() ? Shape{1} : info->shape;
  TSP_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= shape[0],
            "{}: rows [{}, {}) are outside tensor \"{}\" of shape {}", path_, row_begin, row_end,
            name, shape_str(info->shape));
  Shape want = shape;
  want[0] = row_end - row_begin;
  TSP_CHECK(dst.shape() == want,
            "{}: rows [{}, {}) of tensor \"{}\" {} have shape {} but the destination has shape {}",
            path_, row_begin, row_end, name, shape_str(info->shape), shape_str(want),
            shape_str(dst.shape()));
  const int64_t esize = st_dtype_size(info->dtype);
  const int64_t row_elems = shape[0] ? shape_numel(shape) / shape[0] : 0;
  const int64_t n = dst.numel();
  const int64_t offset = data_start_ + info->begin + row_begin * row_elems * esize;
  if (n == 0) return;

  const std::string& sd = info->dtype;
  const DType dd = dst.dtype();
  const bool same = (sd == "F32" && dd == DType::F32) || (sd == "BF16" && dd == DType::BF16) ||
                    (sd == "I32" && dd == DType::I32) || (sd == "I64" && dd == DType::I64);
  if (same) {
    io::pread_all(file_->fd, dst.data(), static_cast<size_t>(n * esize), offset, path_);
    return;
  }
  const bool float_src = sd == "F32" || sd == "BF16" || sd == "F16";
  TSP_CHECK(float_src && (dd == DType::F32 || dd == DType::BF16),
            "{}: tensor \"{}\" is {} and cannot be read into a {} tensor (floating-point tensors "
            "convert between F32/BF16/F16; integer tensors need the same dtype)",
            path_, name, sd, dtype_name(dd));
  // Convert in chunks through a bounce buffer: bounded extra memory, and the file's bytes need
  // not be aligned for their type.
  constexpr int64_t kChunk = 1 << 16;
  std::vector<unsigned char> raw(static_cast<size_t>(std::min(n, kChunk) * esize));
  std::vector<float> f32(static_cast<size_t>(std::min(n, kChunk)));
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    io::pread_all(file_->fd, raw.data(), static_cast<size_t>(m * esize), offset + i * esize, path_);
    if (sd == "F32") {
      std::memcpy(f32.data(), raw.data(), static_cast<size_t>(m * 4));
    } else {
      for (int64_t k = 0; k < m; ++k) {
        uint16_t u;
        std::memcpy(&u, raw.data() + 2 * k, 2);
        f32[k] = sd == "BF16" ? bf16::to_float(u) : half_to_float(u);
      }
    }
    if (dd == DType::F32) {
      std::memcpy(static_cast<float*>(dst.data()) + i, f32.data(), static_cast<size_t>(m * 4));
    } else {
      convert_f32_to_bf16(f32.data(), static_cast<bf16*>(dst.data()) + i, m);
    }
  }
}

void SafetensorsWriter::add(const std::string& name, TensorView t) {
  TSP_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name \"{}\"",
            name);
  for (const auto& [n, v] : tensors_) {
    TSP_CHECK(n != name, "safetensors: tensor \"{}\" added twice", name);
  }
  TSP_CHECK(t.data() != nullptr || t.numel() == 0, "safetensors: tensor \"{}\" has no data", name);
  check_host(t);  // written from host memory (Layout::gather delivers host tensors)
  tensors_.emplace_back(name, t);
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::write(const std::string& path) const {
  std::vector<io::HeaderEntry> entries;
  for (const auto& [name, t] : tensors_) entries.push_back({name, t.dtype(), t.shape()});
  const std::string header = io::safetensors_header(entries, metadata_);
  io::AtomicFile out(path);
  out.write(header.data(), header.size());
  for (const auto& [name, t] : tensors_) out.write(t.data(), t.nbytes());
  out.commit();
}

namespace io {

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::BF16:
      return "BF16";
    case DType::I32:
      return "I32";
    case DType::I64:
      return "I64";
    case DType::F64:
      return "F64";
  }
  TSP_FAIL("unknown dtype {}", static_cast<int>(t));
}

std::string safetensors_header(const std::vector<HeaderEntry>& entries,
                               const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the data order in the header, as the reference writer does.
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    j["__metadata__"] = m;
  }
  int64_t offset = 0;
  for (const auto& e : entries) {
    const int64_t bytes = shape_numel(e.shape) * static_cast<int64_t>(dtype_size(e.dtype));
    j[e.name] = {{"dtype", safetensors_dtype(e.dtype)},
                 {"shape", e.shape},
                 {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = j.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  std::memcpy(out.data(), &n, 8);
  return out + text;
}

void pread_all(int fd, void* dst, size_t bytes, int64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, p, bytes, offset);
    if (got < 0 && errno == EINTR) continue;
    TSP_CHECK(got >= 0, "{}: read failed at byte {}: {}", path, offset, std::strerror(errno));
    TSP_CHECK(got > 0, "{}: unexpected end of file at byte {} (was the file truncated?)", path,
              offset);
    p += got;
    bytes -= static_cast<size_t>(got);
    offset += got;
  }
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  struct stat st;
  if (::stat(path_.c_str(), &st) == 0) {
    TSP_CHECK(!S_ISDIR(st.st_mode), "cannot write {}: it is a directory; give a file name", path_);
    in_place_ = !S_ISREG(st.st_mode);
  }
  if (in_place_) {
    tmp_ = path_;
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
    TSP_CHECK(fd_ >= 0, "cannot open {} for writing: {}", path_, std::strerror(errno));
    return;
  }
  tmp_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TSP_CHECK(fd_ >= 0, "cannot create {}: {} (does the directory exist and is it writable?)", tmp_,
            std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !in_place_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  TSP_CHECK(fd_ >= 0 && !committed_, "{}: write after commit", path_);
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t put = ::write(fd_, p, bytes);
    const int err = errno;
    if (put < 0 && err == EINTR) continue;
    // On failure the destructor removes the temporary file, so a previous file at path_ stays
    // as it was.
    TSP_CHECK(
        put > 0, "cannot write {}: {}{}", path_,
        put < 0 ? std::strerror(err) : "the write made no progress",
        in_place_ ? "" : fmt::format(" (writing {}; any previous {} is unchanged)", tmp_, path_));
    p += put;
    bytes -= static_cast<size_t>(put);
  }
}

void AtomicFile::write_converted(const void* src, DType from, DType to, int64_t n) {
  if (from == to) {
    write(src, static_cast<size_t>(n) * dtype_size(from));
    return;
  }
  constexpr int64_t kChunk = 1 << 16;
  if (from == DType::F32 && to == DType::BF16) {
    std::vector<bf16> buf(static_cast<size_t>(std::min(n, kChunk)));
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min(kChunk, n - i);
      convert_f32_to_bf16(static_cast<const float*>(src) + i, buf.data(), m);
      write(buf.data(), static_cast<size_t>(m) * 2);
    }
  } else if (from == DType::BF16 && to == DType::F32) {
    std::vector<float> buf(static_cast<size_t>(std::min(n, kChunk)));
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min(kChunk, n - i);
      convert_bf16_to_f32(static_cast<const bf16*>(src) + i, buf.data(), m);
      write(buf.data(), static_cast<size_t>(m) * 4);
    }
  } else {
    TSP_FAIL("{}: cannot convert {} to {}", path_, dtype_name(from), dtype_name(to));
  }
}

void AtomicFile::commit() {
  TSP_CHECK(fd_ >= 0 && !committed_, "{}: committed twice", path_);
  if (in_place_) {
    // A device or FIFO may not support fsync (EINVAL, ENOTSUP, EROFS): that is not an error;
    // any other failure is (it can report a write the device lost).
    if (::fsync(fd_) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EROFS) {
      TSP_FAIL("cannot write {}: fsync failed: {}", path_, std::strerror(errno));
    }
    const int rc = ::close(fd_);
    fd_ = -1;
    TSP_CHECK(rc == 0, "cannot write {}: close failed: {}", path_, std::strerror(errno));
    committed_ = true;
    return;
  }
  // fsync and close report write-back failures (a full disk on NFS, a failing device) that the
  // writes themselves did not; either leaves the previous file in place.
  TSP_CHECK(::fsync(fd_) == 0,
            "cannot write {}: fsync of {} failed: {} (any previous {} is "
            "unchanged)",
            path_, tmp_, std::strerror(errno), path_);
  const int rc = ::close(fd_);
  fd_ = -1;
  TSP_CHECK(rc == 0, "cannot write {}: closing {} failed: {} (any previous {} is unchanged)", path_,
            tmp_, std::strerror(errno), path_);
  TSP_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "renaming {} to {} failed: {}", tmp_, path_,
            std::strerror(errno));
  committed_ = true;
  // Make the rename itself durable (best effort: some filesystems refuse fsync on directories).
  std::string dir = std::filesystem::path(path_).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace io

}  // namespace tsp
