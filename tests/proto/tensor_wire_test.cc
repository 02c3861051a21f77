// proto/tensor_wire.h against protobuf itself: a message parsed with its tensor's bytes left in
// the slices is, field for field, what ParseFromString makes of the same bytes, however gRPC cut
// them into slices; bytes protobuf refuses are refused; a message serialised with its tensor's
// bytes as a slice is what protobuf reads back.
#include "proto/tensor_wire.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include "absl/strings/escaping.h"

#include <random>
#include <string>
#include <vector>

namespace blockd {
namespace {

using google::protobuf::util::MessageDifferencer;

std::string RandomBytes(std::mt19937& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

v1::ForwardRequest SampleRequest(std::mt19937& rng, size_t data_bytes) {
  v1::ForwardRequest r;
  r.add_block_ids("b0");
  r.add_block_ids("layer.1");
  v1::Tensor* t = r.mutable_input();
  t->set_dtype(v1::DTYPE_BFLOAT16);
  t->add_shape(2);
  t->add_shape(static_cast<int64_t>(data_bytes / 2));
  t->set_data(RandomBytes(rng, data_bytes));
  r.set_keep_activations(true);
  r.set_position_offset(300);
  return r;
}

// `bytes` cut into slices at `cuts` (ascending offsets).
grpc::ByteBuffer Cut(const std::string& bytes, std::vector<size_t> cuts) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  cuts.push_back(bytes.size());
  for (size_t c : cuts) {
    slices.emplace_back(bytes.data() + at, c - at);  // copies: the buffer owns its slices
    at = c;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::string Flatten(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(b.Dump(&slices).ok());
  std::string s;
  for (const grpc::Slice& x : slices) s.append(reinterpret_cast<const char*>(x.begin()), x.size());
  return s;
}

// What protobuf makes of `bytes`, split as ParseWithTensorBytes splits it; false when it refuses.
bool ProtobufParse(const std::string& bytes, v1::ForwardRequest* msg, std::string* data) {
  if (!msg->ParseFromString(bytes)) return false;
  *data = msg->input().data();
  if (msg->has_input()) msg->mutable_input()->clear_data();
  return true;
}

void ExpectSameAsProtobuf(const std::string& bytes, const grpc::ByteBuffer& wire) {
  v1::ForwardRequest want;
  std::string want_data;
  const bool want_ok = ProtobufParse(bytes, &want, &want_data);
  v1::ForwardRequest got;
  WireBytes data;
  const absl::Status s = ParseWithTensorBytes(wire, v1::ForwardRequest::kInputFieldNumber, &got, &data);
  ASSERT_EQ(s.ok(), want_ok) << s << " " << absl::CHexEscape(bytes);
  if (!want_ok) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  EXPECT_TRUE(MessageDifferencer::Equals(got, want)) << got.DebugString() << "\nwant\n" << want.DebugString();
  std::string got_data(data.size(), '\0');
  data.CopyTo(got_data.data(), 0, data.size());
  EXPECT_EQ(got_data, want_data);
  EXPECT_EQ(data.size(), want_data.size());
}

TEST(TensorWireTest, ParsesAsProtobufHoweverTheSlicesAreCut) {
  std::mt19937 rng(7);
  const std::string bytes = SampleRequest(rng, 5000).SerializeAsString();
  ExpectSameAsProtobuf(bytes, Cut(bytes, {}));
  for (size_t every : {1, 2, 7, 64, 1000, 4999}) {
    std::vector<size_t> cuts;
    for (size_t c = every; c < bytes.size(); c += every) cuts.push_back(c);
    SCOPED_TRACE(every);
    ExpectSameAsProtobuf(bytes, Cut(bytes, cuts));
  }
}

TEST(TensorWireTest, GathersAnyRangeOfTheBytes) {
  std::mt19937 rng(8);
  // Large enough that CopyTo spreads over threads (base/parallel_copy.h).
  const v1::ForwardRequest r = SampleRequest(rng, (size_t{9} << 20) + 13);
  const std::string bytes = r.SerializeAsString();
  std::vector<size_t> cuts;
  for (size_t c = 100; c < bytes.size(); c += 65536 + (rng() % 9000)) cuts.push_back(c);
  v1::ForwardRequest got;
  WireBytes data;
  ASSERT_TRUE(ParseWithTensorBytes(Cut(bytes, cuts), v1::ForwardRequest::kInputFieldNumber, &got, &data).ok());
  ASSERT_EQ(data.contiguous(), nullptr);
  const std::string& want = r.input().data();
  ASSERT_EQ(data.size(), want.size());
  for (int i = 0; i < 20; ++i) {
    const size_t from = rng() % want.size();
    const size_t n = i == 0 ? want.size() - from : rng() % (want.size() - from);
    std::string out(n, '\0');
    data.CopyTo(out.data(), from, n);
    ASSERT_EQ(out, want.substr(from, n)) << from << " " << n;
  }
}

TEST(TensorWireTest, OnePieceIsReadInPlace) {
  std::mt19937 rng(9);
  const v1::ForwardRequest r = SampleRequest(rng, 100);
  const std::string bytes = r.SerializeAsString();
  v1::ForwardRequest got;
  WireBytes data;
  ASSERT_TRUE(ParseWithTensorBytes(Cut(bytes, {}), v1::ForwardRequest::kInputFieldNumber, &got, &data).ok());
  ASSERT_NE(data.contiguous(), nullptr);
  EXPECT_EQ(std::string(data.contiguous(), data.size()), r.input().data());
}

TEST(TensorWireTest, MergesRepeatedTensorsAsProtobufDoes) {
  std::mt19937 rng(10);
  v1::ForwardRequest a = SampleRequest(rng, 40);
  v1::ForwardRequest b;
  b.mutable_input()->add_shape(9);  // shape appends, dtype and data stay a's
  v1::ForwardRequest c;
  c.mutable_input()->set_data("last wins");
  const std::string ab = a.SerializeAsString() + b.SerializeAsString();
  const std::string abc = ab + c.SerializeAsString();
  ExpectSameAsProtobuf(ab, Cut(ab, {3, 50}));
  ExpectSameAsProtobuf(abc, Cut(abc, {1, 60, 61}));
  // No tensor at all, and a tensor without data.
  v1::ForwardRequest none;
  none.add_block_ids("x");
  ExpectSameAsProtobuf(none.SerializeAsString(), Cut(none.SerializeAsString(), {}));
  ExpectSameAsProtobuf(b.SerializeAsString(), Cut(b.SerializeAsString(), {1}));
  ExpectSameAsProtobuf("", Cut("", {}));
}

// Hostile bytes: truncations, flipped bytes, inserted garbage. Whatever protobuf accepts parses to
// the same message; whatever it refuses is INVALID_ARGUMENT, never a read past the slices.
TEST(TensorWireTest, AgreesWithProtobufOnDamagedMessages) {
  std::mt19937 rng(11);
  v1::ForwardRequest r = SampleRequest(rng, 64);
  r.mutable_output_shared_memory()->set_region("r");
  r.mutable_output_shared_memory()->set_byte_size(64);
  const std::string good = r.SerializeAsString();
  for (size_t n = 0; n < good.size(); ++n) {
    const std::string cut = good.substr(0, n);
    ExpectSameAsProtobuf(cut, Cut(cut, n > 2 ? std::vector<size_t>{n / 2} : std::vector<size_t>{}));
  }
  int refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string bad = good;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % bad.size();
      switch (rng() % 3) {
        case 0: bad[at] = static_cast<char>(rng()); break;
        case 1: bad.insert(at, RandomBytes(rng, 1 + rng() % 4)); break;
        default: bad.erase(at, 1 + rng() % 4); break;
      }
    }
    std::vector<size_t> cuts;
    for (size_t c = 1 + rng() % 16; c < bad.size(); c += 1 + rng() % 16) cuts.push_back(c);
    SCOPED_TRACE(i);
    ExpectSameAsProtobuf(bad, Cut(bad, cuts));
    v1::ForwardRequest probe;
    refused += probe.ParseFromString(bad) ? 0 : 1;
  }
  EXPECT_GT(refused, 1000);  // the damage reached the refusals, not only the data's bytes
}

TEST(TensorWireTest, SerialisedWithItsBytesAsASliceReadsBackInProtobuf) {
  std::mt19937 rng(12);
  v1::ForwardResponse rest;
  rest.set_activation_id("act-1");
  v1::Tensor meta;
  meta.set_dtype(v1::DTYPE_FLOAT32);
  meta.add_shape(1);
  meta.add_shape(3);
  meta.add_shape(4);
  const std::string data = RandomBytes(rng, 48);
  const grpc::ByteBuffer b =
      SerializeWithTensorBytes(rest, v1::ForwardResponse::kOutputFieldNumber, meta, SliceOwning(data));
  v1::ForwardResponse got;
  ASSERT_TRUE(got.ParseFromString(Flatten(b)));
  v1::ForwardResponse want = rest;
  *want.mutable_output() = meta;
  want.mutable_output()->set_data(data);
  EXPECT_TRUE(MessageDifferencer::Equals(got, want)) << got.DebugString();

  // No bytes (the output went to a shared-memory region): no data field, as protobuf writes it.
  meta.mutable_shared_memory()->set_region("out");
  const grpc::ByteBuffer e =
      SerializeWithTensorBytes(rest, v1::ForwardResponse::kOutputFieldNumber, meta, grpc::Slice());
  want = rest;
  *want.mutable_output() = meta;
  ASSERT_TRUE(got.ParseFromString(Flatten(e)));
  EXPECT_TRUE(MessageDifferencer::Equals(got, want)) << got.DebugString();
  EXPECT_EQ(Flatten(e).size(), want.ByteSizeLong());

  // An uninitialised slice, filled, as the daemon's reply is.
  grpc::Slice s = UninitializedSlice(48);
  std::copy(data.begin(), data.end(), MutableSliceData(s));
  const grpc::ByteBuffer f =
      SerializeWithTensorBytes(v1::BackwardResponse(), v1::BackwardResponse::kGradInputFieldNumber, meta, std::move(s));
  v1::BackwardResponse back;
  ASSERT_TRUE(back.ParseFromString(Flatten(f)));
  EXPECT_EQ(back.grad_input().data(), data);
  EXPECT_EQ(back.grad_input().shared_memory().region(), "out");
}

}  // namespace
}  // namespace blockd
