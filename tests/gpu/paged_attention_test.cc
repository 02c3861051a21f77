// The paged decode attention kernel (kernels/paged_attention.cuh) alone against a float64 host
// reference, at the shapes the session tests do not reach: Llama-3-8B's heads (32/8, head_dim 128)
// at a 4k context, multi-token steps whose query tiles span several tokens, a GQA group wider
// than a tile, head dims that take the kernel's 4-byte copies, rows of different lengths, pages
// shuffled over two chunks, and the same inputs at 1 split, the chosen splits and an odd count.
// Linked into cuda_session_test (the decode stage of bench/device/run_checks.sh runs it).
//
// bf16 at head_dim 64 and 128 runs the tensor-core kernel (paged_attention_mma.cu), the other
// cases the CUDA-core one; the cases below give each its query tiles spanning tokens, rows of
// different lengths, splits longer than its 1024-position page window, and MHA (group 1).
//
// Bounds: fp32 elementwise rtol 1e-5 (atol = rtol * max|ref|), as the session tests; bf16
// norm-wise 4e-3: the reference reads the same bf16 K/V/Q, so the error is the output's rounding
// to bf16 (at most 2^-9 relative per element), on tensor cores the probabilities' rounding to bf16
// for P V (the same, averaged over the positions), plus fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/paged_attention.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

using kernels::kPagedTokens;

struct PagedCase {
  std::string name;
  bool bf16;
  int64_t n;
  int heads, kv_heads, dh;
  std::vector<int64_t> starts;  // one per row
};

std::ostream& operator<<(std::ostream& os, const PagedCase& c) { return os << c.name; }

template <class T>
T FromFloat(float x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
    return __float2bfloat16_rn(x);
  }
}
template <class T>
float ToFloat(T x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
    return __bfloat162float(x);
  }
}

template <class T>
void RunCase(const PagedCase& c) {
  const int64_t batch = static_cast<int64_t>(c.starts.size()), n = c.n, dh = c.dh;
  const int64_t kv_dim = int64_t(c.kv_heads) * dh, page_elems = 2 * kPagedTokens * kv_dim;
  const int64_t q_stride = int64_t(c.heads) * dh + 6, o_stride = int64_t(c.heads) * dh + 10;  // not packed
  // Each row's pages, numbered over all rows in a shuffled order, in two chunks.
  int64_t width = 0, total = 0, max_len = 0;
  for (int64_t s : c.starts) {
    width = std::max(width, (s + n + kPagedTokens - 1) / kPagedTokens);
    max_len = std::max(max_len, s + n);
  }
  total = width * batch;
  std::vector<int32_t> ids(static_cast<size_t>(total));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(5));
  const int64_t chunk_pages = (total + 1) / 2;
  std::vector<int32_t> meta(static_cast<size_t>(batch + batch * width));
  for (int64_t r = 0; r < batch; ++r) meta[r] = static_cast<int32_t>(c.starts[r]);
  std::copy(ids.begin(), ids.end(), meta.begin() + batch);

  // Pages hold random K/V everywhere (past a row's length too: the kernel must not read those).
  std::vector<float> pages_f = RandomNormal(static_cast<size_t>(2 * chunk_pages * page_elems), 31);
  std::vector<T> pages(pages_f.size());
  for (size_t i = 0; i < pages.size(); ++i) pages[i] = FromFloat<T>(pages_f[i]);
  std::vector<float> q_f = RandomNormal(static_cast<size_t>(batch * n * q_stride), 32, 1.5f);
  std::vector<T> q(q_f.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = FromFloat<T>(q_f[i]);

  DeviceArray<T> chunk0(std::vector<T>(pages.begin(), pages.begin() + chunk_pages * page_elems));
  DeviceArray<T> chunk1(std::vector<T>(pages.begin() + chunk_pages * page_elems, pages.end()));
  DeviceArray<T*> chunks(std::vector<T*>{chunk0.get(), chunk1.get()});
  DeviceArray<int32_t> meta_d(meta);
  DeviceArray<T> q_d(q);
  DeviceArray<T> o_d(static_cast<size_t>(batch * n * o_stride));
  kernels::PagedKv<T> kv;
  kv.chunks = chunks.get();
  kv.chunk_pages = chunk_pages;
  kv.start = meta_d.get();
  kv.table = meta_d.get() + batch;
  kv.table_width = width;
  kv.kv_dim = kv_dim;

  // The reference: query (r, i, h) attends to positions 0 .. start[r] + i of row r.
  auto at = [&](int64_t r, int64_t pos) {  // K of row r at pos; V is kPagedTokens * kv_dim further
    const int64_t page = meta[batch + r * width + pos / kPagedTokens];
    return static_cast<size_t>(page * page_elems + (pos % kPagedTokens) * kv_dim);
  };
  const int group = c.heads / c.kv_heads;
  std::vector<double> ref(static_cast<size_t>(batch * n * c.heads * dh));
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t len = c.starts[r] + i + 1;
      for (int h = 0; h < c.heads; ++h) {
        const int64_t kvh = h / group;
        const T* qv = q.data() + (r * n + i) * q_stride + h * dh;
        std::vector<double> s(static_cast<size_t>(len));
        double m = -INFINITY;
        for (int64_t p = 0; p < len; ++p) {
          const T* kp = pages.data() + at(r, p) + kvh * dh;
          double dot = 0;
          for (int64_t e = 0; e < dh; ++e) dot += double(ToFloat(qv[e])) * double(ToFloat(kp[e]));
          s[p] = dot / std::sqrt(double(dh));
          m = std::max(m, s[p]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - m));
        double* out = ref.data() + ((r * n + i) * c.heads + h) * dh;
        for (int64_t p = 0; p < len; ++p) {
          const T* vp = pages.data() + at(r, p) + kPagedTokens * kv_dim + kvh * dh;
          for (int64_t e = 0; e < dh; ++e) out[e] += s[p] / sum * double(ToFloat(vp[e]));
        }
      }
    }
  }

  int device = 0, sms = 0;
  CUDA_ASSERT(cudaGetDevice(&device));
  CUDA_ASSERT(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int chosen = kernels::paged_attention_splits<T>(batch, n, c.heads, c.kv_heads, c.dh, max_len, sms);
  for (int splits : {1, chosen, 7}) {
    DeviceArray<float> ws(static_cast<size_t>(
        std::max<int64_t>(1, kernels::paged_attention_workspace_floats(batch, n, c.heads, c.dh, splits))));
    o_d.Poison();
    CUDA_ASSERT(kernels::launch_paged_attention<T>(kv, q_d.get(), q_stride, o_d.get(), o_stride, batch, n, c.heads,
                                                   c.kv_heads, c.dh, max_len, splits, ws.get(), nullptr));
    CUDA_ASSERT(cudaDeviceSynchronize());
    const std::vector<T> o = o_d.Download();
    std::vector<float> got;
    for (int64_t t = 0; t < batch * n; ++t) {
      for (int64_t e = 0; e < int64_t(c.heads) * dh; ++e) got.push_back(ToFloat(o[t * o_stride + e]));
    }
    const std::string what = c.name + " o, " + std::to_string(splits) + " splits";
    if (c.bf16) {
      ExpectNormClose(what, got, ref, 4e-3);
    } else {
      ExpectClose(what, got, ref, 1e-5);
    }
  }
}

class PagedAttentionTest : public ::testing::TestWithParam<PagedCase> {};

TEST_P(PagedAttentionTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const PagedCase& c = GetParam();
  if (c.bf16) {
    RunCase<__nv_bfloat16>(c);
  } else {
    RunCase<float>(c);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttentionTest,
    ::testing::Values(
        // bench_decode's shape: one new token after 4095 and 700 cached positions.
        PagedCase{"llama8b_decode_4k_bf16", true, 1, 32, 8, 128, {4095, 700}},
        // 5-token steps, group 3: a query tile holds queries of three tokens; a fresh row beside.
        PagedCase{"multi_token_group3_bf16", true, 5, 6, 2, 64, {300, 0, 33}},
        PagedCase{"multi_token_group4_fp32", false, 3, 8, 2, 128, {129, 1000}},
        // 40- and 72-byte rows: the kernel's 4-byte copies.
        PagedCase{"dh20_bf16", true, 2, 4, 1, 20, {77}},
        PagedCase{"dh18_fp32", false, 1, 2, 2, 18, {50, 5}},
        // group 16: two query tiles per kv head.
        PagedCase{"group16_bf16", true, 1, 16, 1, 64, {200}},
        PagedCase{"dh256_fp32", false, 1, 4, 2, 256, {515, 31}},
        // Tensor cores: 9 tokens x group 4 = three 16-query tiles, the last of them partial.
        PagedCase{"llama8b_9_tokens_bf16", true, 9, 32, 8, 128, {1500, 0, 37}},
        // A split of 2100 positions walks three page windows; group 8, two tokens per tile.
        PagedCase{"group8_long_bf16", true, 3, 16, 2, 128, {2100}},
        // MHA: one query per tile.
        PagedCase{"mha_dh64_bf16", true, 1, 4, 4, 64, {130, 0, 1025}}),
    [](const ::testing::TestParamInfo<PagedCase>& i) { return i.param.name; });

}  // namespace
}  // namespace blockd::testing
