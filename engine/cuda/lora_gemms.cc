#include "engine/cuda/lora_gemms.h"

#include <algorithm>

namespace blockd::cuda {
namespace {

using kernels::GemmArgs;
using kernels::GemmType;

bool Targeted(const LoraConfig& lora, const LoraTarget& t) {
  return std::find(lora.target_modules.begin(), lora.target_modules.end(), t.module) != lora.target_modules.end();
}

// The site a base projection belongs to, its columns in the site's output and the site's input width.
struct Place {
  LoraSite site;
  int64_t col, out, in;
};
Place PlaceOf(ParamId base, const BlockConfig& c) {
  const int64_t d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), f = c.intermediate_size;
  switch (base) {
    case ParamId::kQProj: return {LoraSite::kQkv, 0, qd, d};
    case ParamId::kKProj: return {LoraSite::kQkv, qd, kvd, d};
    case ParamId::kVProj: return {LoraSite::kQkv, qd + kvd, kvd, d};
    case ParamId::kOProj: return {LoraSite::kO, 0, d, qd};
    case ParamId::kGateProj: return {LoraSite::kGateUp, 0, f, d};
    case ParamId::kUpProj: return {LoraSite::kGateUp, f, f, d};
    default: return {LoraSite::kDown, 0, d, f};  // kDownProj, the last target
  }
}

size_t Size(GemmType t) { return t == GemmType::kBF16 ? 2 : 4; }
const void* At(const void* p, int64_t elems, GemmType t) { return static_cast<const char*>(p) + elems * Size(t); }
void* At(void* p, int64_t elems, GemmType t) { return static_cast<char*>(p) + elems * Size(t); }

}  // namespace

LoraSiteShape LoraSiteOf(LoraSite site, const BlockConfig& c, const LoraConfig& lora) {
  LoraSiteShape s;
  int64_t before = 0;  // targets ahead of this site's first, in U's column order
  for (const LoraTarget& t : kLoraTargets) {
    if (lora.rank <= 0 || !Targeted(lora, t)) continue;
    const Place p = PlaceOf(t.base, c);
    if (p.site != site) {
      if (s.targets.empty()) ++before;
      continue;
    }
    s.targets.push_back({t.a, t.b, p.col, p.out});
    s.in = p.in;
  }
  s.u_col = before * lora.rank;
  return s;
}

int64_t LoraUColumns(const LoraConfig& lora) {
  return lora.rank <= 0 ? 0 : lora.rank * static_cast<int64_t>(lora.target_modules.size());
}

bool LoraSiteGemms::Covers(int64_t width) const {
  int64_t covered = 0;  // the targets' column ranges are disjoint
  for (const LoraSiteTarget& t : shape.targets) covered += t.out;
  return covered == width;
}

std::vector<GemmArgs> LoraSiteGemms::Forward(const void* x, void* u, void* y, int64_t ldy, GemmType y_type,
                                             bool add) const {
  std::vector<GemmArgs> g;
  if (empty()) return g;
  const int64_t k = static_cast<int64_t>(shape.targets.size()) * rank;
  void* u_site = At(u, shape.u_col, t);
  g.push_back(GemmArgs::Product(mode, false, true, rows, k, shape.in, x, shape.in, a, shape.in, u_site, u_ld, t));
  for (size_t j = 0; j < shape.targets.size(); ++j) {
    const LoraSiteTarget& tg = shape.targets[j];
    GemmArgs p = GemmArgs::Product(mode, false, true, rows, tg.out, rank, At(u_site, j * rank, t), u_ld, b[j], rank,
                                   At(y, tg.col, y_type), ldy, y_type)
                     .AddedToD(add);
    p.alpha = scale;
    g.push_back(p);
  }
  return g;
}

std::vector<GemmArgs> LoraSiteGemms::Backward(const void* x, const void* u, const void* dy, int64_t ld_dy, void* du,
                                              void* dx, GemmType dx_type, bool accumulate) const {
  std::vector<GemmArgs> g;
  if (empty()) return g;
  const int64_t k = static_cast<int64_t>(shape.targets.size()) * rank;
  const void* u_site = At(u, shape.u_col, t);
  void* du_site = At(du, shape.u_col, t);
  for (size_t j = 0; j < shape.targets.size(); ++j) {
    const LoraSiteTarget& tg = shape.targets[j];
    const void* dy_j = At(dy, tg.col, t);
    GemmArgs du_j = GemmArgs::Product(mode, false, false, rows, rank, tg.out, dy_j, ld_dy, b[j], rank,
                                      At(du_site, j * rank, t), u_ld, t);  // dU_j = s dY_j B_j
    du_j.alpha = scale;
    g.push_back(du_j);
    GemmArgs db_j = GemmArgs::Product(mode, true, false, tg.out, rank, rows, dy_j, ld_dy, At(u_site, j * rank, t),
                                      u_ld, db[j], rank, GemmType::kF32)
                        .AddedToD(accumulate);  // dB_j (+)= s dY_j^T U_j
    db_j.alpha = scale;
    g.push_back(db_j);
  }
  // dA (+)= dU^T x, for the site's stacked A at once; dx = dU A.
  g.push_back(GemmArgs::Product(mode, true, false, k, shape.in, rows, du_site, u_ld, x, shape.in, da, shape.in,
                                GemmType::kF32)
                  .AddedToD(accumulate));
  g.push_back(
      GemmArgs::Product(mode, false, false, rows, shape.in, k, du_site, u_ld, a, shape.in, dx, shape.in, dx_type));
  return g;
}

}  // namespace blockd::cuda
