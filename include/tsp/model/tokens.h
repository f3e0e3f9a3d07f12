// Token files in llm.c's format: a header of 256 int32 (magic 20240520, version 1, token count)
// followed by uint16 ids, or magic 20240801, version 7 with uint32 ids.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tsp {

struct TokenFileInfo {
  int32_t magic = 0;
  int32_t version = 0;
  int64_t num_tokens = 0;
  int bytes_per_token = 2;
};

// Validates magic, version and that the file holds the announced number of tokens.
TokenFileInfo read_token_file_info(const std::string& path);
// True when the file has an llm.c header whatever its magic number: a version of 1 (uint16 ids)
// or 7 (uint32 ids) and a token count that matches the file size. A file for which this holds but
// whose magic number is wrong is a token file with a damaged magic number, not text.
bool has_llmc_layout(const std::string& path);
// Tokens [begin, begin + count) (random access: a rank reads only what it needs).
std::vector<int32_t> read_tokens(const std::string& path, int64_t begin, int64_t count);
std::vector<int32_t> read_all_tokens(const std::string& path);
// Writes the uint16 format when every id < 65536 and !force_uint32, else the uint32 one.
// Atomic (temporary file + rename) for a regular file; a device or pipe that exists at `path`
// (/dev/stdout) is written in place. Every write, fsync and close is checked: a full disk is a
// tsp::Error naming the file.
void write_token_file(const std::string& path, const std::vector<int32_t>& ids,
                      bool force_uint32 = false);

}  // namespace tsp
