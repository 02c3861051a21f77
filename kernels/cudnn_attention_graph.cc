// Graph building for cudnn_attention (see cudnn_attention_graph.h). Layout: cuDNN's tensors are
// 4-d [batch, heads, seq, head_dim]; blockd's rows are tokens with the heads side by side, so a
// tensor with row stride r has strides [seq * r, head_dim, r, 1]. K (and V in the backward) enter
// the products transposed, [batch, kv_heads, head_dim, seq] with strides [seq * r, head_dim, 1, r],
// as in the reference. Query heads outnumber kv heads in the products' batch dimension; cuDNN
// broadcasts each kv head over its group, and the backward sums dK and dV over the group with a
// reduction, so K and V are never expanded.
//
// Virtual tensors (never in memory) get the dims, strides and types the reference gives them.
#include "kernels/cudnn_attention_graph.h"

#include <array>
#include <string>

namespace blockd::kernels::cudnn {
namespace {

using Dims = std::array<int64_t, 4>;

class GraphMaker {
 public:
  GraphMaker(Builder& b, AttentionGraph* g) : b_(b), g_(g) {}

  const Descriptor& Tensor(const std::string& name, int64_t uid, cudnnDataType_t type, const Dims& dims,
                           const Dims& strides, bool is_virtual = false, bool by_value = false) {
    Descriptor& t = Keep(b_.Make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor " + name));
    const int64_t alignment = 16;
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_DATA_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &type);
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_DIMENSIONS), CUDNN_TYPE_INT64, 4, dims.data());
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_STRIDES), CUDNN_TYPE_INT64, 4, strides.data());
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_UNIQUE_ID), CUDNN_TYPE_INT64, 1, &uid);
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT), CUDNN_TYPE_INT64, 1, &alignment);
    // cuDNN reads these two as C `bool`.
    const bool v = is_virtual, bv = by_value;
    b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_IS_VIRTUAL), CUDNN_TYPE_BOOLEAN, 1, &v);
    if (by_value) b_.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_IS_BY_VALUE), CUDNN_TYPE_BOOLEAN, 1, &bv);
    b_.Finalize(t);
    return t;
  }
  const Descriptor& Virtual(const std::string& name, cudnnDataType_t type, const Dims& dims, const Dims& strides) {
    return Tensor(name, next_virtual_++, type, dims, strides, /*is_virtual=*/true);
  }
  // An fp32 [1, 1, 1, 1] scalar passed by value (a host pointer in the variant pack).
  const Descriptor& Scalar(const std::string& name, int64_t uid) {
    return Tensor(name, uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, /*by_value=*/true);
  }

  // y = mode(x[, b][, t]); `axis` only for GEN_INDEX.
  void Pointwise(const std::string& name, cudnnPointwiseMode_t mode, cudnnDataType_t prec, const Descriptor& x,
                 const Descriptor* bin, const Descriptor& y, const Descriptor* t = nullptr, int64_t axis = -1) {
    Descriptor& pw = Keep(b_.Make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise descriptor of " + name));
    b_.Set(pw, CUDNN_ATTR(CUDNN_ATTR_POINTWISE_MODE), CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    b_.Set(pw, CUDNN_ATTR(CUDNN_ATTR_POINTWISE_MATH_PREC), CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) b_.Set(pw, CUDNN_ATTR(CUDNN_ATTR_POINTWISE_AXIS), CUDNN_TYPE_INT64, 1, &axis);
    b_.Finalize(pw);
    Descriptor& op = Keep(b_.Make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "node " + name));
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR), pw);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_XDESC), x);
    if (bin != nullptr) b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_BDESC), *bin);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_YDESC), y);
    if (t != nullptr) b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_TDESC), *t);
    AddOp(op);
  }

  // c = a b over the last two dims, batched (and broadcast) over the first two; fp32 math.
  void Matmul(const std::string& name, const Descriptor& a, const Descriptor& bm, const Descriptor& c) {
    Descriptor& mm = Keep(b_.Make(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul descriptor of " + name));
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    b_.Set(mm, CUDNN_ATTR(CUDNN_ATTR_MATMUL_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &comp);
    b_.Finalize(mm);
    Descriptor& op = Keep(b_.Make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "node " + name));
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_MATMUL_ADESC), a);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_MATMUL_BDESC), bm);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_MATMUL_CDESC), c);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_MATMUL_DESC), mm);
    AddOp(op);
  }

  // y = reduce(x) over the dims where y has extent 1 and x does not (or, for dK/dV, over the
  // query heads of each kv head); fp32 math.
  void Reduction(const std::string& name, cudnnReduceTensorOp_t reduce, const Descriptor& x, const Descriptor& y) {
    Descriptor& red = Keep(b_.Make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction descriptor of " + name));
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    b_.Set(red, CUDNN_ATTR(CUDNN_ATTR_REDUCTION_OPERATOR), CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce);
    b_.Set(red, CUDNN_ATTR(CUDNN_ATTR_REDUCTION_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &comp);
    b_.Finalize(red);
    Descriptor& op = Keep(b_.Make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "node " + name));
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_XDESC), x);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_YDESC), y);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_DESC), red);
    AddOp(op);
  }

  // A view of x with y's dims, strides and type (the reference's transposes of K, P and dS).
  void Reshape(const std::string& name, const Descriptor& x, const Descriptor& y) {
    Descriptor& op = Keep(b_.Make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "node " + name));
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_RESHAPE_XDESC), x);
    b_.SetDesc(op, CUDNN_ATTR(CUDNN_ATTR_OPERATION_RESHAPE_YDESC), y);
    AddOp(op);
  }

 private:
  Descriptor& Keep(Descriptor d) {
    g_->descriptors.push_back(std::move(d));
    return g_->descriptors.back();
  }
  void AddOp(Descriptor& op) {
    b_.Finalize(op);
    g_->ops.push_back(op.get());
  }

  Builder& b_;
  AttentionGraph* g_;
  int64_t next_virtual_ = kUidFirstVirtual;
};

cudnnDataType_t IoType(const CudnnAttentionProblem& p) {
  return p.dtype == CudnnAttentionDType::kFp16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
}

// [b, h, s, d] from blockd rows of stride r.
Dims RowsDims(const CudnnAttentionProblem& p, int64_t h) { return {p.batch, h, p.seq, p.head_dim}; }
Dims RowsStrides(const CudnnAttentionProblem& p, int64_t r) { return {p.seq * r, p.head_dim, r, 1}; }
// The transpose [b, h, d, s] of the same memory.
Dims RowsTDims(const CudnnAttentionProblem& p, int64_t h) { return {p.batch, h, p.head_dim, p.seq}; }
Dims RowsTStrides(const CudnnAttentionProblem& p, int64_t r) { return {p.seq * r, p.head_dim, 1, r}; }

}  // namespace

void BuildForwardGraph(Builder& b, const CudnnAttentionProblem& p, AttentionGraph* g) {
  GraphMaker m(b, g);
  const cudnnDataType_t io = IoType(p), f32 = CUDNN_DATA_FLOAT;
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, S = p.seq;
  const Dims ss_dims = {B, H, S, S}, ss_strides = {H * S * S, S * S, S, 1};
  const Dims row_dims = {B, H, S, 1}, row_strides = {H * S, S, 1, 1};

  const Descriptor& q = m.Tensor("Q", kUidQ, io, RowsDims(p, H), RowsStrides(p, p.q_stride));
  const Descriptor& kt = m.Tensor("K^T", kUidK, io, RowsTDims(p, Hkv), RowsTStrides(p, p.k_stride));
  const Descriptor& v = m.Tensor("V", kUidV, io, RowsDims(p, Hkv), RowsStrides(p, p.v_stride));
  const Descriptor& o = m.Tensor("O", kUidO, io, RowsDims(p, H), RowsStrides(p, p.o_stride));
  const Descriptor& stats = m.Tensor("stats", kUidStats, f32, row_dims, row_strides);
  const Descriptor& scale = m.Scalar("attn_scale", kUidScale);

  const Descriptor& s = m.Virtual("S = Q K^T", f32, ss_dims, ss_strides);
  m.Matmul("S = Q K^T", q, kt, s);
  const Descriptor& s_scaled = m.Virtual("S * scale", f32, ss_dims, ss_strides);
  m.Pointwise("S * scale", CUDNN_POINTWISE_MUL, f32, s, &scale, s_scaled);
  const Descriptor* s_masked = &s_scaled;
  if (p.causal) {
    // Keep S[i][j] where row i >= column j, else -inf.
    const Descriptor& col = m.Virtual("column index", CUDNN_DATA_INT32, ss_dims, ss_strides);
    m.Pointwise("column index", CUDNN_POINTWISE_GEN_INDEX, f32, s_scaled, nullptr, col, nullptr, /*axis=*/3);
    const Descriptor& row = m.Virtual("row index", CUDNN_DATA_INT32, ss_dims, ss_strides);
    m.Pointwise("row index", CUDNN_POINTWISE_GEN_INDEX, f32, s_scaled, nullptr, row, nullptr, /*axis=*/2);
    const Descriptor& keep = m.Virtual("row >= column", CUDNN_DATA_BOOLEAN, ss_dims, ss_strides);
    m.Pointwise("row >= column", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, &col, keep);
    const Descriptor& neg_inf = m.Scalar("-inf", kUidNegInf);
    const Descriptor& masked = m.Virtual("causal S", f32, ss_dims, ss_strides);
    m.Pointwise("causal mask select", CUDNN_POINTWISE_BINARY_SELECT, f32, s_scaled, &neg_inf, masked, &keep);
    s_masked = &masked;
  }
  const Descriptor& mx = m.Virtual("row max", f32, row_dims, row_strides);
  m.Reduction("row max", CUDNN_REDUCE_TENSOR_MAX, *s_masked, mx);
  const Descriptor& shifted = m.Virtual("S - max", f32, ss_dims, ss_strides);
  m.Pointwise("S - max", CUDNN_POINTWISE_SUB, f32, *s_masked, &mx, shifted);
  const Descriptor& e = m.Virtual("exp(S - max)", f32, ss_dims, ss_strides);
  m.Pointwise("exp(S - max)", CUDNN_POINTWISE_EXP, f32, shifted, nullptr, e);
  const Descriptor& sum = m.Virtual("row sum", f32, row_dims, row_strides);
  m.Reduction("row sum", CUDNN_REDUCE_TENSOR_ADD, e, sum);
  const Descriptor& log_sum = m.Virtual("log(row sum)", f32, row_dims, row_strides);
  m.Pointwise("log(row sum)", CUDNN_POINTWISE_LOG, f32, sum, nullptr, log_sum);
  m.Pointwise("stats = max + log(sum)", CUDNN_POINTWISE_ADD, f32, mx, &log_sum, stats);
  const Descriptor& prob = m.Virtual("P", io, ss_dims, ss_strides);
  m.Pointwise("P = exp / sum", CUDNN_POINTWISE_DIV, f32, e, &sum, prob);
  m.Matmul("O = P V", prob, v, o);
}

void BuildBackwardGraph(Builder& b, const CudnnAttentionProblem& p, AttentionGraph* g) {
  GraphMaker m(b, g);
  const cudnnDataType_t io = IoType(p), f32 = CUDNN_DATA_FLOAT;
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, S = p.seq, D = p.head_dim;
  const Dims ss_dims = {B, H, S, S}, ss_strides = {H * S * S, S * S, S, 1};
  const Dims ss_t_strides = {H * S * S, S * S, 1, S};  // the transpose, for P^T and dS^T
  const Dims row_dims = {B, H, S, 1}, row_strides = {H * S, S, 1, 1};
  const Dims packed_dims = {B, H, S, D}, packed_strides = {H * S * D, S * D, D, 1};

  const Descriptor& q = m.Tensor("Q", kUidQ, io, RowsDims(p, H), RowsStrides(p, p.q_stride));
  const Descriptor& kt = m.Tensor("K^T", kUidK, io, RowsTDims(p, Hkv), RowsTStrides(p, p.k_stride));
  const Descriptor& vt = m.Tensor("V^T", kUidV, io, RowsTDims(p, Hkv), RowsTStrides(p, p.v_stride));
  const Descriptor& o = m.Tensor("O", kUidO, io, RowsDims(p, H), RowsStrides(p, p.o_stride));
  const Descriptor& scale = m.Scalar("attn_scale", kUidScale);
  const Descriptor& one = m.Scalar("1.0", kUidOne);
  const Descriptor& stats = m.Tensor("stats", kUidStats, f32, row_dims, row_strides);
  const Descriptor& d_o = m.Tensor("dO", kUidDO, io, RowsDims(p, H), RowsStrides(p, p.do_stride));
  const Descriptor& dq = m.Tensor("dQ", kUidDQ, io, RowsDims(p, H), RowsStrides(p, p.dq_stride));
  const Descriptor& dk = m.Tensor("dK", kUidDK, io, RowsDims(p, Hkv), RowsStrides(p, p.dk_stride));
  const Descriptor& dv = m.Tensor("dV", kUidDV, io, RowsDims(p, Hkv), RowsStrides(p, p.dv_stride));
  // Two fp32 buffers the reference keeps in memory (cuDNN's engine writes them): rowsum(dO * O)
  // and dQ's accumulator. They live in the caller's workspace after cuDNN's own.
  const Descriptor& softmax_sum = m.Tensor("softmax_sum", kUidSoftmaxSum, f32, row_dims, row_strides);
  const Descriptor& dq_accum = m.Tensor("dQ_accum", kUidDQAccum, f32, packed_dims, packed_strides);

  // Node order as in the reference.
  const Descriptor& dp = m.Virtual("dP = dO V^T", f32, ss_dims, ss_strides);
  m.Matmul("dP = dO V^T", d_o, vt, dp);
  const Descriptor& s = m.Virtual("S = Q K^T", f32, ss_dims, ss_strides);
  m.Matmul("S = Q K^T", q, kt, s);
  // The reference gives dO * O seq stride H * D (not D); it is virtual, so only its shape matters
  // to the result, but the pattern matcher sees what PyTorch sends.
  const Descriptor& do_o = m.Virtual("dO * O", f32, packed_dims, {H * S * D, S * D, H * D, 1});
  m.Pointwise("dO * O", CUDNN_POINTWISE_MUL, f32, d_o, &o, do_o);
  const Descriptor& k = m.Virtual("K", f32, {B, Hkv, S, D}, {Hkv * S * D, S * D, D, 1});
  m.Reshape("K = (K^T)^T", kt, k);
  const Descriptor& s_scaled = m.Virtual("S * scale", f32, ss_dims, ss_strides);
  m.Pointwise("S * scale", CUDNN_POINTWISE_MUL, f32, s, &scale, s_scaled);
  const Descriptor& s_lse = m.Virtual("S * scale - stats", f32, ss_dims, ss_strides);
  m.Pointwise("S * scale - stats", CUDNN_POINTWISE_SUB, f32, s_scaled, &stats, s_lse);
  const Descriptor* s_masked = &s_lse;
  if (p.causal) {
    const Descriptor& col = m.Virtual("column index", CUDNN_DATA_INT32, ss_dims, ss_strides);
    m.Pointwise("column index", CUDNN_POINTWISE_GEN_INDEX, f32, s_lse, nullptr, col, nullptr, /*axis=*/3);
    const Descriptor& row = m.Virtual("row index", CUDNN_DATA_INT32, ss_dims, ss_strides);
    m.Pointwise("row index", CUDNN_POINTWISE_GEN_INDEX, f32, s_lse, nullptr, row, nullptr, /*axis=*/2);
    const Descriptor& keep = m.Virtual("row >= column", CUDNN_DATA_BOOLEAN, ss_dims, ss_strides);
    m.Pointwise("row >= column", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, &col, keep);
    const Descriptor& neg_inf = m.Scalar("-inf", kUidNegInf);
    const Descriptor& masked = m.Virtual("causal S", f32, ss_dims, ss_strides);
    m.Pointwise("causal mask select", CUDNN_POINTWISE_BINARY_SELECT, f32, s_lse, &neg_inf, masked, &keep);
    s_masked = &masked;
  }
  const Descriptor& prob = m.Virtual("P", f32, ss_dims, ss_strides);
  m.Pointwise("P = exp(S * scale - stats)", CUDNN_POINTWISE_EXP, f32, *s_masked, nullptr, prob);
  const Descriptor& prob_t = m.Virtual("P^T", io, ss_dims, ss_t_strides);
  m.Reshape("P^T", prob, prob_t);
  const Descriptor& dv_heads = m.Virtual("dV per query head", io, packed_dims, packed_strides);
  m.Matmul("dV per query head = P^T dO", prob_t, d_o, dv_heads);
  const Descriptor& delta = m.Virtual("rowsum(dO * O)", f32, row_dims, row_strides);
  m.Reduction("rowsum(dO * O)", CUDNN_REDUCE_TENSOR_ADD, do_o, delta);
  m.Pointwise("softmax_sum = rowsum * 1.0", CUDNN_POINTWISE_MUL, f32, delta, &one, softmax_sum);
  const Descriptor& dp_delta = m.Virtual("dP - softmax_sum", f32, ss_dims, ss_strides);
  m.Pointwise("dP - softmax_sum", CUDNN_POINTWISE_SUB, f32, dp, &softmax_sum, dp_delta);
  const Descriptor& ds_unscaled = m.Virtual("P (dP - softmax_sum)", f32, ss_dims, ss_strides);
  m.Pointwise("P (dP - softmax_sum)", CUDNN_POINTWISE_MUL, f32, dp_delta, &prob, ds_unscaled);
  const Descriptor& ds = m.Virtual("dS", f32, ss_dims, ss_strides);
  m.Pointwise("dS = P (dP - softmax_sum) * scale", CUDNN_POINTWISE_MUL, f32, ds_unscaled, &scale, ds);
  m.Matmul("dQ_accum = dS K", ds, k, dq_accum);
  m.Pointwise("dQ = dQ_accum", CUDNN_POINTWISE_IDENTITY, f32, dq_accum, nullptr, dq);
  const Descriptor& ds_t = m.Virtual("dS^T", io, ss_dims, ss_t_strides);
  m.Reshape("dS^T", ds, ds_t);
  const Descriptor& dk_heads = m.Virtual("dK per query head", io, packed_dims, packed_strides);
  m.Matmul("dK per query head = dS^T Q", ds_t, q, dk_heads);
  m.Reduction("dK = sum over the group", CUDNN_REDUCE_TENSOR_ADD, dk_heads, dk);
  m.Reduction("dV = sum over the group", CUDNN_REDUCE_TENSOR_ADD, dv_heads, dv);
}

}  // namespace blockd::kernels::cudnn
