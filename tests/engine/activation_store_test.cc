// engine/activation_store.h and engine/memory_budget.h: handle ids, exclusive use, per-client
// limits, erasure by block and by expiry (deferred while a handle is in use), and budgets whose
// reservations give their bytes back exactly once.
#include "engine/activation_store.h"

#include <map>
#include <set>
#include <string>

#include "absl/time/clock.h"
#include "engine/memory_budget.h"
#include "gtest/gtest.h"

namespace blockd {
namespace {

std::unique_ptr<ActivationHandle> Handle(const std::string& client, std::vector<uint64_t> serials,
                                         absl::Time expires = absl::InfiniteFuture()) {
  auto h = std::make_unique<ActivationHandle>();
  h->client = client;
  h->block_serials = std::move(serials);
  for (size_t i = 0; i < h->block_serials.size(); ++i) h->block_ids.push_back("b" + std::to_string(i));
  h->expires = expires;
  return h;
}

::testing::AssertionResult Code(const absl::Status& s, absl::StatusCode code, absl::string_view needle) {
  if (s.code() == code && absl::string_view(s.message()).find(needle) != absl::string_view::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got " << s << ", expected " << absl::StatusCodeToString(code)
                                       << " containing \"" << needle << "\"";
}

TEST(ActivationStoreTest, IdsAreUniqueAndUnguessableLooking) {
  ActivationStore store;
  std::set<std::string> ids;
  for (int i = 0; i < 100; ++i) {
    auto id = store.Add(Handle("c", {1}), 1000);
    ASSERT_TRUE(id.ok()) << id.status();
    ASSERT_EQ(id->size(), 4u + 32u) << *id;
    EXPECT_EQ(id->substr(0, 4), "act-");
    EXPECT_EQ(id->find_first_not_of("0123456789abcdef", 4), std::string::npos) << *id;
    ids.insert(*id);
  }
  EXPECT_EQ(ids.size(), 100u);
  EXPECT_EQ(store.size(), 100);
}

TEST(ActivationStoreTest, AcquireIsExclusiveUntilReturnOrErase) {
  ActivationStore store;
  const std::string id = *store.Add(Handle("c", {1}), 10);
  auto h = store.Acquire(id);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)->client, "c");
  EXPECT_TRUE(Code(store.Acquire(id).status(), absl::StatusCode::kFailedPrecondition, "in use"));
  store.Return(id);
  auto again = store.Acquire(id);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *h) << "Return gives the same handle back";
  store.Erase(id);
  EXPECT_TRUE(Code(store.Acquire(id).status(), absl::StatusCode::kNotFound, id));
  EXPECT_EQ(store.size(), 0);
  store.Return(id);  // harmless on an unknown id
  store.Erase(id);
}

TEST(ActivationStoreTest, PerClientLimit) {
  ActivationStore store;
  ASSERT_TRUE(store.Add(Handle("alice", {1}), 2).ok());
  ASSERT_TRUE(store.Add(Handle("alice", {1}), 2).ok());
  EXPECT_TRUE(Code(store.Add(Handle("alice", {1}), 2).status(), absl::StatusCode::kResourceExhausted, "alice"));
  EXPECT_TRUE(store.Add(Handle("bob", {1}), 2).ok());
  EXPECT_EQ(store.CountForClient("alice"), 2);
  EXPECT_EQ(store.CountForClient("bob"), 1);
  EXPECT_EQ(store.CountForClient("carol"), 0);
}

TEST(ActivationStoreTest, EraseReferencingDefersHandlesInUse) {
  ActivationStore store;
  const std::string a = *store.Add(Handle("c", {7, 8}), 10);
  const std::string b = *store.Add(Handle("c", {8}), 10);
  const std::string c = *store.Add(Handle("c", {9}), 10);
  ASSERT_TRUE(store.Acquire(b).ok());
  EXPECT_EQ(store.EraseReferencing(8), 2);
  EXPECT_TRUE(Code(store.Acquire(a).status(), absl::StatusCode::kNotFound, a));
  EXPECT_EQ(store.size(), 1) << "the doomed handle in use no longer counts";
  EXPECT_EQ(store.CountForClient("c"), 1);
  EXPECT_EQ(store.EraseReferencing(8), 0) << "a doomed handle is not counted twice";
  store.Return(b);  // the in-use handle goes when returned
  EXPECT_TRUE(Code(store.Acquire(b).status(), absl::StatusCode::kNotFound, b));
  EXPECT_TRUE(store.Acquire(c).ok());
}

TEST(ActivationStoreTest, ExpireDropsHandlesPastTheirTime) {
  ActivationStore store;
  const absl::Time now = absl::Now();
  const std::string old1 = *store.Add(Handle("c", {1}, now - absl::Seconds(1)), 10);
  const std::string old2 = *store.Add(Handle("c", {1}, now - absl::Seconds(2)), 10);
  const std::string fresh = *store.Add(Handle("c", {1}, now + absl::Hours(1)), 10);
  ASSERT_TRUE(store.Acquire(old2).ok());
  EXPECT_EQ(store.Expire(now), 2);
  EXPECT_EQ(store.Expire(now), 0) << "a doomed handle is not counted twice";
  EXPECT_EQ(store.size(), 1);
  EXPECT_TRUE(Code(store.Acquire(old1).status(), absl::StatusCode::kNotFound, "expired"));
  store.Return(old2);
  EXPECT_TRUE(Code(store.Acquire(old2).status(), absl::StatusCode::kNotFound, old2));
  EXPECT_TRUE(store.Acquire(fresh).ok());
  EXPECT_EQ(store.Expire(now), 0);
}

TEST(ActivationStoreTest, ErasingAHandleReleasesItsReservations) {
  MemoryBudget budget(std::map<int, int64_t>{{0, 1000}});
  ActivationStore store;
  auto h = Handle("c", {1});
  auto r = budget.Reserve(0, 600, "the activations");
  ASSERT_TRUE(r.ok());
  h->reservations.push_back(std::move(*r));
  const std::string id = *store.Add(std::move(h), 10);
  EXPECT_EQ(budget.used(0), 600);
  store.Erase(id);
  EXPECT_EQ(budget.used(0), 0);
}

TEST(MemoryBudgetTest, ReservationsFitTheLimitAndGiveBytesBackOnce) {
  MemoryBudget budget(std::map<int, int64_t>{{0, 1 << 20}, {1, 100}});
  EXPECT_EQ(budget.limit(0), 1 << 20);
  EXPECT_EQ(budget.limit(5), 0);
  auto a = budget.Reserve(0, 700 << 10, "block a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->bytes(), 700 << 10);
  EXPECT_EQ(budget.used(0), 700 << 10);
  EXPECT_TRUE(Code(budget.Reserve(0, 400 << 10, "block b").status(), absl::StatusCode::kResourceExhausted,
                   "block b needs 400.00 KiB on device 0, but only 324.00 KiB of its 1.00 MiB memory budget is free"));
  EXPECT_TRUE(Code(budget.Reserve(7, 1, "x").status(), absl::StatusCode::kInvalidArgument, "device 7"));
  EXPECT_TRUE(Code(budget.Reserve(1, -5, "x").status(), absl::StatusCode::kResourceExhausted, "x"));
  EXPECT_EQ(budget.used(1), 0);
  {
    auto b = budget.Reserve(1, 100, "all of device 1");
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(budget.used(1), 100);
    MemoryReservation moved(std::move(*b));
    EXPECT_EQ(b->bytes(), 0);
    EXPECT_EQ(moved.bytes(), 100);
    EXPECT_EQ(budget.used(1), 100);
  }
  EXPECT_EQ(budget.used(1), 0) << "destroying the moved-to reservation releases once";

  MemoryReservation held = std::move(*a);
  EXPECT_EQ(budget.used(0), 700 << 10);
  auto c = budget.Reserve(0, 100 << 10, "block c");
  ASSERT_TRUE(c.ok());
  held = std::move(*c);  // releases the 700 KiB it held
  EXPECT_EQ(budget.used(0), 100 << 10);
  held.Release();
  held.Release();
  EXPECT_EQ(budget.used(0), 0);
}

TEST(MemoryBudgetTest, HumanBytes) {
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1536), "1.50 KiB");
  EXPECT_EQ(HumanBytes(int64_t{3} << 20), "3.00 MiB");
  EXPECT_EQ(HumanBytes(int64_t{80} << 30), "80.00 GiB");
}

}  // namespace
}  // namespace blockd
