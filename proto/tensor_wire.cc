#include "proto/tensor_wire.h"

#include <grpc/slice.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "base/parallel_copy.h"
#include "base/status_macros.h"

namespace blockd {

namespace {

constexpr int kTensorDataField = v1::Tensor::kDataFieldNumber;
constexpr int kMaxGroupDepth = 100;  // protobuf's own recursion limit

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kStartGroup = 3, kEndGroup = 4, kFixed32 = 5 };

void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

}  // namespace

// Walks a received message's pieces once: the tensor's data is recorded as pieces, everything
// else is copied byte for byte into a small message for protobuf to parse.
class TensorWireParser {
 public:
  explicit TensorWireParser(const grpc::ByteBuffer& wire) {
    // Dump refuses only a buffer never filled: gRPC's empty message, parsed as one.
    if (wire.Dump(&slices_).ok()) {
      for (const grpc::Slice& s : slices_) {
        if (s.size() == 0) continue;
        pieces_.emplace_back(reinterpret_cast<const char*>(s.begin()), s.size());
        size_ += s.size();
      }
    }
  }

  absl::Status Parse(int tensor_field, google::protobuf::Message* msg, WireBytes* data) {
    std::string rest;  // the message without the tensor's data
    while (pos_ < size_) {
      uint64_t tag = 0;
      if (!Tag(&tag, size_)) return Malformed("a field's tag runs past the end");
      if (tag >> 3 == static_cast<uint64_t>(tensor_field) && (tag & 7) == kLengthDelimited) {
        std::string tensor;
        RETURN_IF_ERROR(Tensor(&tensor, data));
        PutVarint(tag, &rest);
        PutVarint(tensor.size(), &rest);
        rest += tensor;
      } else {
        PutVarint(tag, &rest);
        RETURN_IF_ERROR(Field(tag, size_, &rest, 0));
      }
    }
    if (!msg->ParseFromString(rest)) return Malformed("its fields do not parse");
    if (data->present_) {
      data->slices_ = std::move(slices_);
      size_t at = 0;
      for (absl::string_view p : data->pieces_) {
        data->starts_.push_back(at);
        at += p.size();
      }
    }
    return absl::OkStatus();
  }

 private:
  static absl::Status Malformed(absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("the message does not parse: ", why));
  }

  // The v1::Tensor at the current position (its length first): its data to *data, the rest of
  // its fields to *out.
  absl::Status Tensor(std::string* out, WireBytes* data) {
    uint64_t len = 0;
    if (!Varint(&len, size_, nullptr) || len > size_ - pos_) return Malformed("a tensor runs past the end");
    const size_t end = pos_ + static_cast<size_t>(len);
    while (pos_ < end) {
      uint64_t tag = 0;
      if (!Tag(&tag, end)) return Malformed("a tensor field's tag runs past the tensor");
      if (tag == (kTensorDataField << 3 | kLengthDelimited)) {
        uint64_t n = 0;
        if (!Varint(&n, end, nullptr) || n > end - pos_) return Malformed("a tensor's data runs past the tensor");
        data->pieces_.clear();  // sent twice: the last one wins, as in protobuf
        data->starts_.clear();
        data->size_ = static_cast<size_t>(n);
        data->present_ = true;
        Take(static_cast<size_t>(n), &data->pieces_);
      } else {
        PutVarint(tag, out);
        RETURN_IF_ERROR(Field(tag, end, out, 0));
      }
    }
    return absl::OkStatus();
  }

  // Copies the value of a field whose tag was just read (not past `limit`) to *out.
  absl::Status Field(uint64_t tag, size_t limit, std::string* out, int depth) {
    if (tag >> 3 == 0) return Malformed("a field numbered 0");
    switch (tag & 7) {
      case kVarint: {
        uint64_t v = 0;
        return Varint(&v, limit, out) ? absl::OkStatus() : Malformed("a varint runs past the end");
      }
      case kFixed64:
        return Copy(8, limit, out) ? absl::OkStatus() : Malformed("a fixed64 runs past the end");
      case kFixed32:
        return Copy(4, limit, out) ? absl::OkStatus() : Malformed("a fixed32 runs past the end");
      case kLengthDelimited: {
        uint64_t n = 0;
        if (!Varint(&n, limit, out) || n > limit - pos_ || !Copy(static_cast<size_t>(n), limit, out)) {
          return Malformed("a length-delimited field runs past the end");
        }
        return absl::OkStatus();
      }
      case kStartGroup: {
        if (depth >= kMaxGroupDepth) return Malformed("groups nested too deep");
        for (;;) {
          uint64_t inner = 0;
          if (!Tag(&inner, limit)) return Malformed("a group runs past the end");
          PutVarint(inner, out);
          if ((inner & 7) == kEndGroup) {
            if (inner >> 3 != tag >> 3) return Malformed("a group ends with another field's number");
            return absl::OkStatus();
          }
          RETURN_IF_ERROR(Field(inner, limit, out, depth + 1));
        }
      }
      default:
        return Malformed("a field of an unknown wire type");
    }
  }

  // Reads a field's tag as protobuf does: a varint of at most 5 bytes, kept to its low 32 bits.
  bool Tag(uint64_t* tag, size_t limit) {
    if (!Varint(tag, limit, nullptr, 5)) return false;
    *tag &= 0xffffffffu;
    return true;
  }

  // Reads a varint (at most `max_bytes`, not past `limit`), its bytes appended to *raw when set.
  bool Varint(uint64_t* v, size_t limit, std::string* raw, int max_bytes = 10) {
    *v = 0;
    for (int shift = 0; shift < 7 * max_bytes; shift += 7) {
      if (pos_ >= limit) return false;
      const uint8_t b = static_cast<uint8_t>(pieces_[piece_][at_]);
      Advance(1);
      if (raw != nullptr) raw->push_back(static_cast<char>(b));
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }

  // Appends the next n bytes (not past `limit`) to *out.
  bool Copy(size_t n, size_t limit, std::string* out) {
    if (n > limit - pos_) return false;
    while (n > 0) {
      const size_t take = std::min(n, pieces_[piece_].size() - at_);
      out->append(pieces_[piece_].data() + at_, take);
      Advance(take);
      n -= take;
    }
    return true;
  }

  // Records the next n bytes (the caller checked they are there) as pieces.
  void Take(size_t n, std::vector<absl::string_view>* into) {
    while (n > 0) {
      const size_t take = std::min(n, pieces_[piece_].size() - at_);
      into->push_back(pieces_[piece_].substr(at_, take));
      Advance(take);
      n -= take;
    }
  }

  // Moves on n bytes within the current piece (at most to its end).
  void Advance(size_t n) {
    at_ += n;
    pos_ += n;
    if (at_ == pieces_[piece_].size()) {
      ++piece_;
      at_ = 0;
    }
  }

  std::vector<grpc::Slice> slices_;
  std::vector<absl::string_view> pieces_;  // the non-empty slices, in order
  size_t piece_ = 0, at_ = 0;              // the position: a piece, and bytes into it
  size_t pos_ = 0, size_ = 0;              // the position and the end, from the message's start
};

const char* WireBytes::contiguous() const {
  if (pieces_.size() == 1) return pieces_[0].data();
  return pieces_.empty() ? "" : nullptr;
}

void WireBytes::CopyTo(void* dst, size_t from, size_t n) const {
  if (n == 0) return;
  // The piece holding byte `from`: the engine reads a tensor a chunk at a time, and gRPC's slices
  // can be a few KB each.
  const size_t first = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), from) - starts_.begin()) - 1;
  ParallelGather(dst, absl::MakeConstSpan(pieces_).subspan(first), from - starts_[first], n);
}

absl::Status ParseWithTensorBytes(const grpc::ByteBuffer& wire, int tensor_field, google::protobuf::Message* msg,
                                  WireBytes* data) {
  *data = WireBytes();
  return TensorWireParser(wire).Parse(tensor_field, msg, data);
}

grpc::ByteBuffer SerializeWithTensorBytes(const google::protobuf::Message& msg, int tensor_field,
                                          const v1::Tensor& tensor, grpc::Slice data) {
  std::string head;
  msg.AppendToString(&head);
  std::string meta;
  tensor.AppendToString(&meta);
  std::string data_tag;  // none for no bytes, as protobuf writes an empty `bytes` field
  const size_t n = data.size();
  if (n > 0) {
    PutVarint(kTensorDataField << 3 | kLengthDelimited, &data_tag);
    PutVarint(n, &data_tag);
  }
  PutVarint(static_cast<uint64_t>(tensor_field) << 3 | kLengthDelimited, &head);
  PutVarint(meta.size() + data_tag.size() + n, &head);
  head += meta;
  head += data_tag;
  grpc::Slice parts[2] = {grpc::Slice(head), std::move(data)};
  return grpc::ByteBuffer(parts, 2);
}

grpc::Slice UninitializedSlice(size_t n) { return grpc::Slice(grpc_slice_malloc_large(n), grpc::Slice::STEAL_REF); }

grpc::Slice SliceOwning(std::string bytes) {
  auto* owned = new std::string(std::move(bytes));
  return grpc::Slice(owned->data(), owned->size(), [](void* p) { delete static_cast<std::string*>(p); }, owned);
}

}  // namespace blockd
