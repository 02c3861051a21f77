// base/safetensors.h: write -> read round trips (F32, BF16, F16, metadata, 0-d and empty
// tensors; in memory and through a file), and the strict reader's rejections, each checked for a
// message that names the problem.
#include "base/safetensors.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace blockd {
namespace {

using ::blockd::testing::Rand;
using ::blockd::testing::TestSeed;

std::string Le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file with the given header text and data buffer.
std::string File(const std::string& header, const std::string& data) { return Le64(header.size()) + header + data; }

std::string RandomBytes(Rand& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng.Bits32());
  return s;
}

::testing::AssertionResult Rejected(const absl::StatusOr<SafetensorsFile>& f, absl::string_view needle) {
  if (f.ok()) return ::testing::AssertionFailure() << "parsed, expected an error containing \"" << needle << "\"";
  if (f.status().code() != absl::StatusCode::kInvalidArgument ||
      absl::string_view(f.status().message()).find(needle) == absl::string_view::npos) {
    return ::testing::AssertionFailure() << "got " << f.status() << ", expected INVALID_ARGUMENT containing \""
                                         << needle << "\"";
  }
  return ::testing::AssertionSuccess();
}

class SafetensorsTest : public ::testing::Test {
 protected:
  SafetensorsTest() : rng_(TestSeed(900)) {
    w32_ = RandomBytes(rng_, 2 * 3 * 4);
    b16_ = RandomBytes(rng_, 4 * 2);
    h16_ = RandomBytes(rng_, 3 * 1 * 2 * 2);
    scalar_ = RandomBytes(rng_, 4);
    tensors_ = {{"layer.w32", DType::kFloat32, {2, 3}, w32_},
                {"b16", DType::kBFloat16, {4}, b16_},
                {"h16", DType::kFloat16, {3, 1, 2}, h16_},
                {"scalar", DType::kFloat32, {}, scalar_},
                {"empty", DType::kFloat32, {0, 5}, ""},
                {"empty_bf16", DType::kBFloat16, {3, 0}, ""}};
    metadata_ = {{"format", "pt"}, {"block_id", "b0"}};
  }
  ~SafetensorsTest() override {
    for (const std::string& p : paths_) unlink(p.c_str());
  }

  std::string TempPath(const std::string& name) {
    paths_.push_back(::testing::TempDir() + "/blockd_safetensors_" + std::to_string(getpid()) + "_" + name);
    return paths_.back();
  }

  void ExpectSameAsWritten(const SafetensorsFile& f) {
    EXPECT_EQ(f.metadata(), metadata_);
    ASSERT_EQ(f.tensors().size(), tensors_.size());
    for (const SafetensorsTensorRef& t : tensors_) {
      const SafetensorsEntry* e = f.Find(t.name);
      ASSERT_NE(e, nullptr) << t.name;
      EXPECT_EQ(e->dtype, t.dtype) << t.name;
      EXPECT_EQ(e->shape, t.shape) << t.name;
      EXPECT_EQ(e->size, t.bytes.size()) << t.name;
      EXPECT_EQ(f.data(*e), t.bytes) << t.name << ": bytes differ after the round trip";
    }
    EXPECT_EQ(f.Find("nope"), nullptr);
  }

  Rand rng_;
  std::string w32_, b16_, h16_, scalar_;
  std::vector<SafetensorsTensorRef> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::string> paths_;
};

TEST_F(SafetensorsTest, RoundTripInMemory) {
  auto bytes = SerializeSafetensors(tensors_, metadata_);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  // The header is padded to a multiple of 8 bytes and is a JSON object.
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>((*bytes)[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ((*bytes)[8], '{');
  EXPECT_EQ(bytes->size(), 8 + n + w32_.size() + b16_.size() + h16_.size() + scalar_.size());
  // Data follows the header in the order given.
  EXPECT_EQ(bytes->substr(8 + n), w32_ + b16_ + h16_ + scalar_);
  auto f = SafetensorsFile::Parse(*bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  ExpectSameAsWritten(*f);
  EXPECT_EQ(SafetensorsDTypeName(DType::kBFloat16), "BF16");
}

TEST_F(SafetensorsTest, RoundTripThroughAFile) {
  const std::string path = TempPath("roundtrip.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors_, metadata_).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ExpectSameAsWritten(*f);
  // The mapping outlives the file's name.
  unlink(path.c_str());
  EXPECT_EQ(f->data(*f->Find("layer.w32")), w32_);

  // Without metadata and without tensors.
  auto empty = SerializeSafetensors({}, {});
  ASSERT_TRUE(empty.ok());
  auto g = SafetensorsFile::Parse(*empty);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(g->tensors().empty());
  EXPECT_TRUE(g->metadata().empty());
}

TEST_F(SafetensorsTest, ReadsAHandWrittenHeader) {
  // As another writer might lay it out: tensors out of order in the header, unpadded.
  const std::string data = RandomBytes(rng_, 16 + 6);
  auto f = SafetensorsFile::Parse(File(
      R"({"b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]},"__metadata__":{"k":"v"},)"
      R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})",
      data));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->data(*f->Find("a")), data.substr(0, 16));
  EXPECT_EQ(f->data(*f->Find("b")), data.substr(16));
  EXPECT_EQ(f->Find("b")->dtype, DType::kFloat16);
  EXPECT_EQ(f->metadata().at("k"), "v");
}

TEST_F(SafetensorsTest, RejectsMalformedFilesNamingTheProblem) {
  const std::string t16 = R"({"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  const std::string d16(16, 'x');
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(""), "shorter than the 8-byte header length"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse("abc"), "shorter than the 8-byte header length"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(Le64(1000) + "{}"), "header length 1000 exceeds"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(Le64(~0ull) + "{}"), "header length"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File("{not json", "")), "not a valid JSON object"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"a":1} trailing)", "")), "not a valid JSON object"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File("[1,2,3]", "")), "does not start with '{'"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File("", "")), "does not start with '{'"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"a":)" + t16 + R"(,"a":)" + t16 + "}", d16)),
                       "names \"a\" twice"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})", d16)), "dtype F64"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", d16.substr(0, 12))),
      "has 12 bytes, but its shape and dtype need 16"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[-1,4],"data_offsets":[0,16]}})", d16)),
      "shape entry that is not a non-negative integer"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d16.substr(0, 8))),
      "not a non-negative integer"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(
                           R"({"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,16]}})",
                           d16)),
                       "shape overflows"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"a":)" + t16 + "}", d16.substr(0, 8))),
                       "data_offsets [0, 16] fall outside the 8-byte data buffer"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", d16)), "fall outside"));
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", d16)),
      "data_offsets must be two non-negative integers"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"a":{"dtype":"F32","shape":[4]}})", d16)),
                       "must have exactly dtype, shape and data_offsets"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"__metadata__":[1]})", "")), "__metadata__ is not an object"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"__metadata__":{"k":1}})", "")), "is not a string"));
  // Overlap: b starts inside a.
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":)" + t16 + R"(,"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                  std::string(24, 'x'))),
      "\"b\" starts at byte 8, expected 16 (it overlaps another tensor)"));
  // A hole between a and b.
  EXPECT_TRUE(Rejected(
      SafetensorsFile::Parse(File(R"({"a":)" + t16 + R"(,"b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}})",
                                  std::string(36, 'x'))),
      "\"b\" starts at byte 20, expected 16 (a hole before it)"));
  EXPECT_TRUE(Rejected(SafetensorsFile::Parse(File(R"({"a":)" + t16 + "}", d16 + "tail")),
                       "4 bytes after the last tensor"));
  // Sanity: the same file without its defect parses, so each case fails for the reason named.
  EXPECT_TRUE(SafetensorsFile::Parse(File(R"({"a":)" + t16 + "}", d16)).ok());
}

TEST_F(SafetensorsTest, OpenReportsThePath) {
  const std::string missing = TempPath("missing.safetensors");
  auto f = SafetensorsFile::Open(missing);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(f.status().message()).find(missing), std::string::npos) << f.status();

  const std::string bad = TempPath("trailing.safetensors");
  {
    std::ofstream out(bad, std::ios::binary);
    out << File(R"({"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", "abcdXY");
  }
  auto g = SafetensorsFile::Open(bad);
  EXPECT_TRUE(Rejected(g, bad));
  EXPECT_TRUE(Rejected(g, "2 bytes after the last tensor"));

  const std::string empty = TempPath("empty.safetensors");
  { std::ofstream out(empty, std::ios::binary); }
  EXPECT_TRUE(Rejected(SafetensorsFile::Open(empty), "shorter than the 8-byte header length"));
}

TEST_F(SafetensorsTest, WriterRefusesInconsistentTensors) {
  const std::string w = w32_;
  auto dup = SerializeSafetensors({{"a", DType::kFloat32, {6}, w}, {"a", DType::kFloat32, {6}, w}}, {});
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(dup.status().message()).find("\"a\""), std::string::npos) << dup.status();
  auto reserved = SerializeSafetensors({{"__metadata__", DType::kFloat32, {6}, w}}, {});
  EXPECT_EQ(reserved.status().code(), absl::StatusCode::kInvalidArgument);
  auto size = SerializeSafetensors({{"a", DType::kBFloat16, {6}, w}}, {});
  EXPECT_EQ(size.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(size.status().message()).find("24 bytes for 6 elements"), std::string::npos) << size.status();
}

}  // namespace
}  // namespace blockd
