// base/dtype.h against references computed in float64 from the formats' definitions: every
// bfloat16 and float16 code decoded, and float32 rounded to each format by searching the table of
// its representable values for the nearest one (ties to the even code), over every tie point, its
// neighbours, edge values and a million random floats. Plus NaN/inf handling, the bulk converters
// and AllFinite.
#include "base/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace blockd {
namespace {

using ::blockd::testing::Rand;
using ::blockd::testing::TestSeed;

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// A 16-bit float format: its non-negative finite values with their codes, in increasing order,
// then the value one step past the largest (2^emax+1), which carries the code of +infinity: IEEE
// rounding goes there, and so to infinity, from the midpoint up.
struct Format {
  const char* name;
  int mantissa_bits;  // stored fraction bits: 7 for bfloat16, 10 for float16
  int bias;           // exponent bias: 127, 15
  int exponent_bits;  // 8, 5
  std::vector<double> value;
  std::vector<uint16_t> code;

  uint16_t inf_code() const { return static_cast<uint16_t>(((1u << exponent_bits) - 1) << mantissa_bits); }

  // The value of `c` by the definition: (-1)^s * 2^(e - bias) * (1 + m / 2^p), subnormal when e == 0.
  double Decode(uint16_t c) const {
    const int e = (c >> mantissa_bits) & ((1 << exponent_bits) - 1);
    const int m = c & ((1 << mantissa_bits) - 1);
    const double sign = (c & 0x8000) ? -1.0 : 1.0;
    if (e == (1 << exponent_bits) - 1) return m == 0 ? sign * INFINITY : std::nan("");
    if (e == 0) return sign * std::ldexp(m, 1 - bias - mantissa_bits);
    return sign * std::ldexp((1 << mantissa_bits) + m, e - bias - mantissa_bits);
  }

  // float32 -> this format, round to nearest, ties to even; not for NaN.
  uint16_t Round(float f) const {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(static_cast<double>(f));
    if (std::isinf(a)) return sign | inf_code();
    const size_t last = value.size() - 1;  // the overflow entry
    const size_t lo = static_cast<size_t>(std::upper_bound(value.begin(), value.end(), a) - value.begin()) - 1;
    if (lo >= last) return sign | inf_code();
    if (value[lo] == a) return sign | code[lo];
    const double d_lo = a - value[lo], d_hi = value[lo + 1] - a;
    if (d_lo < d_hi) return sign | code[lo];
    if (d_hi < d_lo) return sign | code[lo + 1];
    return sign | ((code[lo] & 1) == 0 ? code[lo] : code[lo + 1]);
  }
};

Format MakeFormat(const char* name, int mantissa_bits, int exponent_bits, int bias) {
  Format f{name, mantissa_bits, bias, exponent_bits, {}, {}};
  for (uint32_t c = 0; c < f.inf_code(); ++c) {
    f.value.push_back(f.Decode(static_cast<uint16_t>(c)));
    f.code.push_back(static_cast<uint16_t>(c));
  }
  f.value.push_back(std::ldexp(1.0, (1 << exponent_bits) - 1 - bias));  // 2^128, 2^16
  f.code.push_back(f.inf_code());
  return f;
}

const Format& BF16() {
  static const Format f = MakeFormat("bfloat16", 7, 8, 127);
  return f;
}
const Format& F16() {
  static const Format f = MakeFormat("float16", 10, 5, 15);
  return f;
}

// Float32s that stress rounding to `fmt`: every midpoint between neighbours (exact in float32,
// which has more bits than either format) and the floats just beside it, both signs, and edges.
std::vector<float> EdgeValues(const Format& fmt) {
  std::vector<float> v = {0.f,
                          -0.f,
                          1.f,
                          -1.f,
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::max(),
                          -std::numeric_limits<float>::max(),
                          65504.f,
                          65519.996f,
                          65520.f,
                          65536.f,
                          1e5f,
                          std::ldexp(1.f, -24),
                          std::ldexp(1.f, -25),
                          std::ldexp(3.f, -26),
                          std::ldexp(1.f, -14),
                          std::ldexp(1.f, -126),
                          FromBits(0x3f808000u),
                          FromBits(0x3f818000u),
                          FromBits(0x7f7f8000u),
                          FromBits(0x7f7f7fffu)};
  for (size_t i = 0; i + 1 < fmt.value.size(); ++i) {
    const float mid = static_cast<float>((fmt.value[i] + fmt.value[i + 1]) / 2);
    if (static_cast<double>(mid) != (fmt.value[i] + fmt.value[i + 1]) / 2) continue;  // never, but be sure
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, INFINITY), static_cast<float>(fmt.value[i])}) {
      v.push_back(x);
      v.push_back(-x);
    }
  }
  return v;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_EQ(DTypeName(DType::kFloat32), "float32");
  EXPECT_EQ(DTypeName(DType::kBFloat16), "bfloat16");
  EXPECT_EQ(DTypeName(DType::kFloat16), "float16");
}

void ExpectDecodesEveryCode(const Format& fmt, float (*decode)(uint16_t)) {
  for (uint32_t c = 0; c <= 0xffff; ++c) {
    const float got = decode(static_cast<uint16_t>(c));
    const double want = fmt.Decode(static_cast<uint16_t>(c));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << fmt.name << " code 0x" << std::hex << c << " is a NaN, got " << got;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << fmt.name << " code 0x" << std::hex << c;
    ASSERT_EQ(std::signbit(got), std::signbit(want)) << fmt.name << " code 0x" << std::hex << c << " (sign of zero)";
  }
}

TEST(DTypeTest, BFloat16DecodesEveryCode) { ExpectDecodesEveryCode(BF16(), BFloat16ToFloat32); }
TEST(DTypeTest, Float16DecodesEveryCode) { ExpectDecodesEveryCode(F16(), Float16ToFloat32); }

void ExpectRoundsLikeTheReference(const Format& fmt, uint16_t (*encode)(float), const std::vector<float>& values) {
  int failures = 0;
  for (float f : values) {
    const uint16_t got = encode(f), want = fmt.Round(f);
    if (got != want && ++failures <= 10) {
      ADD_FAILURE() << fmt.name << "(" << f << " = 0x" << std::hex << Bits(f) << ") = 0x" << got << ", expected 0x"
                    << want << std::dec << " (" << fmt.Decode(want) << ")";
    }
  }
  EXPECT_EQ(failures, 0) << "of " << values.size() << " values";
}

std::vector<float> RandomFloats(uint64_t salt, int exp_lo, int exp_hi) {
  Rand rng(TestSeed(salt));
  std::vector<float> v;
  for (int i = 0; i < 500000; ++i) {  // any bit pattern but NaN
    const float f = FromBits(rng.Bits32());
    if (!std::isnan(f)) v.push_back(f);
  }
  for (int i = 0; i < 500000; ++i) {  // exponents around the format's range
    const uint32_t e = static_cast<uint32_t>(rng.Int(exp_lo, exp_hi));
    v.push_back(FromBits((rng.Bits32() & 0x807fffffu) | (e << 23)));
  }
  return v;
}

TEST(DTypeTest, BFloat16RoundsToNearestEven) {
  // 0x3f808000 is exactly halfway between bfloat16 0x3f80 (1.0) and 0x3f81: the even one wins.
  EXPECT_EQ(Float32ToBFloat16(FromBits(0x3f808000u)), 0x3f80);
  EXPECT_EQ(Float32ToBFloat16(FromBits(0x3f818000u)), 0x3f82);
  EXPECT_EQ(Float32ToBFloat16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(Float32ToBFloat16(FromBits(0xbf808000u)), 0xbf80);
  EXPECT_EQ(Float32ToBFloat16(std::numeric_limits<float>::max()), 0x7f80) << "rounds past the largest bfloat16";
  EXPECT_EQ(Float32ToBFloat16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(Float32ToBFloat16(-0.f), 0x8000);
  ExpectRoundsLikeTheReference(BF16(), Float32ToBFloat16, EdgeValues(BF16()));
  ExpectRoundsLikeTheReference(BF16(), Float32ToBFloat16, RandomFloats(1, 0, 254));
}

TEST(DTypeTest, Float16RoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(Float32ToFloat16(65504.f), 0x7bff);
  EXPECT_EQ(Float32ToFloat16(65519.996f), 0x7bff);
  EXPECT_EQ(Float32ToFloat16(65520.f), 0x7c00) << "the tie with 2^16 goes to the even code: infinity";
  EXPECT_EQ(Float32ToFloat16(-1e6f), 0xfc00);
  EXPECT_EQ(Float32ToFloat16(std::ldexp(1.f, -24)), 0x0001) << "smallest subnormal";
  EXPECT_EQ(Float32ToFloat16(std::ldexp(1.f, -25)), 0x0000) << "halfway to the smallest subnormal: even (zero)";
  EXPECT_EQ(Float32ToFloat16(std::nextafter(std::ldexp(1.f, -25), 1.f)), 0x0001);
  EXPECT_EQ(Float32ToFloat16(std::ldexp(3.f, -25)), 0x0002) << "1.5 subnormal units: even";
  EXPECT_EQ(Float32ToFloat16(std::ldexp(1.f, -14)), 0x0400) << "smallest normal";
  EXPECT_EQ(Float32ToFloat16(1.f + std::ldexp(1.f, -11)), 0x3c00) << "tie below 1 + 2^-10 goes to 1";
  EXPECT_EQ(Float32ToFloat16(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);
  ExpectRoundsLikeTheReference(F16(), Float32ToFloat16, EdgeValues(F16()));
  ExpectRoundsLikeTheReference(F16(), Float32ToFloat16, RandomFloats(2, 100, 145));
}

TEST(DTypeTest, NaNStaysNaNAndInfinityStaysInfinity) {
  for (uint32_t nan_bits : {0x7f800001u, 0x7f800100u, 0x7fbfffffu, 0x7fc00000u, 0x7fffffffu, 0xff800001u, 0xffc00000u,
                            0xffffffffu}) {
    const float nan = FromBits(nan_bits);
    const uint16_t b = Float32ToBFloat16(nan), h = Float32ToFloat16(nan);
    EXPECT_TRUE(std::isnan(BFloat16ToFloat32(b))) << std::hex << "float 0x" << nan_bits << " -> bfloat16 0x" << b;
    EXPECT_TRUE(std::isnan(Float16ToFloat32(h))) << std::hex << "float 0x" << nan_bits << " -> float16 0x" << h;
    EXPECT_EQ(b >> 15, nan_bits >> 31) << "sign of NaN 0x" << std::hex << nan_bits;
    EXPECT_EQ(h >> 15, nan_bits >> 31) << "sign of NaN 0x" << std::hex << nan_bits;
  }
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Float32ToBFloat16(inf), 0x7f80);
  EXPECT_EQ(Float32ToBFloat16(-inf), 0xff80);
  EXPECT_EQ(Float32ToFloat16(inf), 0x7c00);
  EXPECT_EQ(Float32ToFloat16(-inf), 0xfc00);
  EXPECT_EQ(BFloat16ToFloat32(0xff80), -inf);
  EXPECT_EQ(Float16ToFloat32(0x7c00), inf);
}

TEST(DTypeTest, BulkConversionsMatchTheScalarOnesOnUnalignedBuffers) {
  Rand rng(TestSeed(3));
  const size_t n = 1001;
  std::vector<float> src(n);
  for (float& f : src) f = static_cast<float>(rng.Uniform(-70000, 70000) * std::pow(10.0, rng.Uniform(-8, 0)));
  for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(std::string(DTypeName(t)));
    std::vector<char> buf(n * DTypeSize(t) + 1);
    ConvertFromFloat32(src.data(), n, t, buf.data() + 1);
    std::vector<float> back(n);
    ConvertToFloat32(t, buf.data() + 1, n, back.data());
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, buf.data() + 1 + 2 * i, 2);
      float expected = src[i];
      if (t == DType::kBFloat16) {
        ASSERT_EQ(h, Float32ToBFloat16(src[i])) << "element " << i;
        expected = BFloat16ToFloat32(h);
      } else if (t == DType::kFloat16) {
        ASSERT_EQ(h, Float32ToFloat16(src[i])) << "element " << i;
        expected = Float16ToFloat32(h);
      }
      ASSERT_EQ(Bits(back[i]), Bits(expected)) << "element " << i;
    }
  }
}

TEST(DTypeTest, AllFinite) {
  Rand rng(TestSeed(4));
  std::vector<float> x(257);
  for (float& f : x) f = FromBits(rng.Bits32() & 0xff7fffffu);  // any finite value (exponent < 255)
  x[3] = std::numeric_limits<float>::max();
  x[4] = -std::numeric_limits<float>::max();
  x[5] = std::numeric_limits<float>::denorm_min();
  x[6] = -0.f;
  EXPECT_TRUE(AllFinite(x.data(), x.size()));
  EXPECT_TRUE(AllFinite(x.data(), 0));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
    for (size_t at : {size_t{0}, size_t{128}, x.size() - 1}) {
      std::vector<float> y = x;
      y[at] = bad;
      EXPECT_FALSE(AllFinite(y.data(), y.size())) << bad << " at " << at;
    }
  }
}

}  // namespace
}  // namespace blockd
