// engine/activation_store.h and engine/memory_budget.h: handle ids (unpredictable, 128 random
// bits), ownership (another identity's handle is indistinguishable from an unknown one), exclusive
// use, per-client limits, erasure by block and by expiry (deferred while a handle is in use), and
// budgets whose reservations give their bytes back exactly once.
#include "engine/activation_store.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "engine/memory_budget.h"
#include "engine/owned.h"
#include "gtest/gtest.h"

namespace blockd {
namespace {

std::unique_ptr<ActivationHandle> Handle(const std::string& client, std::vector<uint64_t> serials,
                                         absl::Time expires = absl::InfiniteFuture()) {
  auto h = std::make_unique<ActivationHandle>();
  h->owner = client;
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

// The attack from the hardening issue: ids drawn from a per-thread mt19937_64 give its whole state
// away after 156 ids (312 outputs), and every later id follows. This runs that attack (untemper
// the outputs, run the generator's recurrence forward) on the store's own ids; with ids from the
// kernel's CSPRNG it must predict nothing.
uint64_t Untemper(uint64_t y) {
  // Inverts mt19937_64's tempering, step by step from the last; iterating a step's xor-shift 7
  // times recovers all 64 bits for any shift >= 10.
  auto undo_right = [](uint64_t v, int shift, uint64_t mask) {
    uint64_t x = v;
    for (int i = 0; i < 7; ++i) x = v ^ ((x >> shift) & mask);
    return x;
  };
  auto undo_left = [](uint64_t v, int shift, uint64_t mask) {
    uint64_t x = v;
    for (int i = 0; i < 7; ++i) x = v ^ ((x << shift) & mask);
    return x;
  };
  y = undo_right(y, 43, ~uint64_t{0});
  y = undo_left(y, 37, 0xFFF7EEE000000000ULL);
  y = undo_left(y, 17, 0x71D67FFFEDA60000ULL);
  y = undo_right(y, 29, 0x5555555555555555ULL);
  return y;
}

uint64_t Temper(uint64_t y) {
  y ^= (y >> 29) & 0x5555555555555555ULL;
  y ^= (y << 17) & 0x71D67FFFEDA60000ULL;
  y ^= (y << 37) & 0xFFF7EEE000000000ULL;
  return y ^ (y >> 43);
}

// Given mt19937_64's untempered outputs x[0..n), the next `count` outputs (tempered).
std::vector<uint64_t> PredictMt64(std::vector<uint64_t> x, int count) {
  constexpr size_t kN = 312, kM = 156;
  constexpr uint64_t kUpper = ~uint64_t{0} << 31, kLower = (uint64_t{1} << 31) - 1;
  std::vector<uint64_t> out;
  for (int i = 0; i < count; ++i) {
    const size_t j = x.size() - kN;
    const uint64_t y = (x[j] & kUpper) | (x[j + 1] & kLower);
    const uint64_t next = x[j + kM] ^ (y >> 1) ^ ((y & 1) ? 0xB5026F5AA96619E9ULL : 0);
    x.push_back(next);
    out.push_back(Temper(next));
  }
  return out;
}

TEST(ActivationStoreTest, NextIdsCannotBePredictedFromEarlierOnes) {
  {  // The attack itself works: it predicts a real mt19937_64 exactly.
    std::mt19937_64 rng(12345);
    std::vector<uint64_t> seen;
    for (int i = 0; i < 312; ++i) seen.push_back(Untemper(rng()));
    const std::vector<uint64_t> predicted = PredictMt64(seen, 4);
    for (uint64_t p : predicted) ASSERT_EQ(p, rng()) << "the reference attack is broken";
  }
  ActivationStore store;
  std::vector<std::pair<uint64_t, uint64_t>> words;  // each id's two 64-bit halves
  auto halves = [](const std::string& id) {
    return std::pair{std::stoull(id.substr(4, 16), nullptr, 16), std::stoull(id.substr(20, 16), nullptr, 16)};
  };
  for (int i = 0; i < 156 + 4; ++i) {
    auto id = store.Add(Handle("attacker", {1}), 1000);
    ASSERT_TRUE(id.ok()) << id.status();
    words.push_back(halves(*id));
  }
  // Which half the generator drew first depends on the compiler's argument order: try both.
  for (const bool high_first : {true, false}) {
    std::vector<uint64_t> seen;
    for (int i = 0; i < 156; ++i) {
      seen.push_back(Untemper(high_first ? words[i].first : words[i].second));
      seen.push_back(Untemper(high_first ? words[i].second : words[i].first));
    }
    const std::vector<uint64_t> predicted = PredictMt64(seen, 8);
    for (int k = 0; k < 4; ++k) {
      const auto [hi, lo] = words[156 + k];
      const std::pair<uint64_t, uint64_t> guess = high_first ? std::pair{predicted[2 * k], predicted[2 * k + 1]}
                                                             : std::pair{predicted[2 * k + 1], predicted[2 * k]};
      EXPECT_FALSE(guess.first == hi && guess.second == lo)
          << "id " << 156 + k << " was predicted from the 156 before it (halves drawn "
          << (high_first ? "high" : "low") << " first)";
    }
  }
}

TEST(ActivationStoreTest, IdsCarry128RandomBits) {
  ActivationStore store;
  constexpr int kIds = 2000;
  std::vector<int> ones(128, 0);
  std::set<std::string> ids;
  for (int i = 0; i < kIds; ++i) {
    auto id = store.Add(Handle("c", {1}), kIds);
    ASSERT_TRUE(id.ok()) << id.status();
    ASSERT_EQ(id->size(), 4u + 32u) << *id;
    ASSERT_EQ(id->find_first_not_of("0123456789abcdef", 4), std::string::npos) << *id;
    ids.insert(*id);
    for (int d = 0; d < 32; ++d) {
      const int nibble = std::stoi(id->substr(4 + d, 1), nullptr, 16);
      for (int b = 0; b < 4; ++b) ones[4 * d + b] += (nibble >> b) & 1;
    }
  }
  EXPECT_EQ(ids.size(), static_cast<size_t>(kIds));
  // Every one of the 128 bits varies as a fair coin would: 2000 draws put each count within
  // 1000 +- 200 (more than 8 standard deviations), so a constant, counter or short field fails.
  for (int b = 0; b < 128; ++b) {
    EXPECT_GT(ones[b], 800) << "bit " << b << " of the id is set in only " << ones[b] << " of " << kIds << " ids";
    EXPECT_LT(ones[b], 1200) << "bit " << b << " of the id is set in " << ones[b] << " of " << kIds << " ids";
  }
}

// NewResourceId's read loop (internal::FillRandom) over scripted sources with getrandom's contract.
struct ScriptedSource {
  static inline std::vector<ssize_t> answers;  // per call: bytes to give (> 0), 0, or -errno
  static inline size_t calls = 0;
  static ssize_t Read(void* buf, size_t n, unsigned int) {
    // Past the script: an error, so that a loop which never gives up still ends and the test fails.
    const ssize_t a = calls < answers.size() ? answers[calls] : -EIO;
    ++calls;
    if (a < 0) {
      errno = static_cast<int>(-a);
      return -1;
    }
    const size_t give = std::min(n, static_cast<size_t>(a));
    std::memset(buf, 0xA5, give);
    return static_cast<ssize_t>(give);
  }
  static void Script(std::vector<ssize_t> a) {
    answers = std::move(a);
    calls = 0;
  }
};

TEST(ResourceIdTest, ReadLoopTakesShortReadsAndEintrAndGivesUpOnZeroBytesOrAnError) {
  unsigned char buf[16];
  ScriptedSource::Script({-EINTR, 5, 5, -EINTR, 6});
  std::memset(buf, 0, sizeof(buf));
  EXPECT_TRUE(internal::FillRandom(buf, sizeof(buf), ScriptedSource::Read));
  EXPECT_EQ(ScriptedSource::calls, 5u);
  for (size_t i = 0; i < sizeof(buf); ++i) ASSERT_EQ(buf[i], 0xA5) << "byte " << i << " not filled";

  // getrandom should never give 0 bytes for a non-empty buffer; if it does, asking again would
  // ask for ever. The loop must give up at once (NewResourceId then tries /dev/urandom).
  ScriptedSource::Script(std::vector<ssize_t>(1000, 0));
  EXPECT_FALSE(internal::FillRandom(buf, sizeof(buf), ScriptedSource::Read));
  EXPECT_EQ(ScriptedSource::calls, 1u) << "the loop asked again after a read of 0 bytes";

  ScriptedSource::Script({4, -ENOSYS, 16});
  EXPECT_FALSE(internal::FillRandom(buf, sizeof(buf), ScriptedSource::Read));
  EXPECT_EQ(ScriptedSource::calls, 2u) << "the loop went on after an error other than EINTR";
}

// An id is drawn before the store's lock is taken: getrandom may wait, and Backward, expiry and
// every handle count need that lock. A repeated id is drawn again, and the handle is not lost.
TEST(ActivationStoreTest, IdsAreDrawnOutsideTheStoreLockAndARepeatIsDrawnAgain) {
  std::vector<std::future<int64_t>> lookers;  // outlive the store's Add, which may hold the lock
  std::vector<std::string> script = {"act-1", "act-1", "act-2"};
  size_t draws = 0;
  ActivationStore* store_ptr = nullptr;
  ActivationStore store([&]() -> absl::StatusOr<std::string> {
    lookers.push_back(std::async(std::launch::async, [store_ptr] { return store_ptr->size(); }));
    EXPECT_EQ(lookers.back().wait_for(std::chrono::seconds(5)), std::future_status::ready)
        << "draw " << draws << " ran under the store's lock: another thread could not count handles";
    return script.at(draws++);
  });
  store_ptr = &store;
  auto a = store.Add(Handle("c", {1}), 10);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, "act-1");
  auto b = store.Add(Handle("c", {1}), 10);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, "act-2") << "a repeated id was not drawn again";
  EXPECT_EQ(draws, 3u);
  EXPECT_EQ(store.size(), 2);
  EXPECT_TRUE(store.Acquire("act-2", "c").ok()) << "the handle added after the repeat was lost";
  for (auto& f : lookers) f.wait();
}

TEST(ActivationStoreTest, AnotherIdentitySeesAHandleAsUnknownAndCannotTouchIt) {
  ActivationStore store;
  const std::string id = *store.Add(Handle("alice", {1}), 10);
  const std::string unknown = "act-" + std::string(32, '0');
  auto message_for = [&](const absl::Status& s, const std::string& shown) {
    std::string m(s.message());
    const size_t at = m.find(shown);
    if (at != std::string::npos) m.replace(at, shown.size(), "<id>");
    return m;
  };
  const absl::Status foreign = store.Acquire(id, "bob").status();
  const absl::Status missing = store.Acquire(unknown, "bob").status();
  EXPECT_TRUE(Code(foreign, absl::StatusCode::kNotFound, "not found"));
  EXPECT_EQ(message_for(foreign, id), message_for(missing, unknown)) << "the answer tells the two apart";
  // Even while the owner is using it, the other identity hears NOT_FOUND, not "in use".
  ASSERT_TRUE(store.Acquire(id, "alice").ok());
  EXPECT_TRUE(Code(store.Acquire(id, "bob").status(), absl::StatusCode::kNotFound, "not found"));
  store.Return(id);
  EXPECT_EQ(store.CountForClient("alice"), 1);
  EXPECT_EQ(store.CountForClient("bob"), 0);
  auto h = store.Acquire(id, "alice");
  ASSERT_TRUE(h.ok()) << "the other identity's attempts touched the handle: " << h.status();
  EXPECT_EQ((*h)->owner, "alice");
}

TEST(ActivationStoreTest, LongIdsAreEchoedShort) {
  ActivationStore store;
  const std::string huge = "act-" + std::string(200000, 'f');
  const absl::Status s = store.Acquire(huge, "c").status();
  EXPECT_TRUE(Code(s, absl::StatusCode::kNotFound, "(200004 bytes)"));
  EXPECT_LT(s.message().size(), 400u) << s.message().substr(0, 400);
}

TEST(ActivationStoreTest, AcquireIsExclusiveUntilReturnOrErase) {
  ActivationStore store;
  const std::string id = *store.Add(Handle("c", {1}), 10);
  auto h = store.Acquire(id, "c");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)->owner, "c");
  EXPECT_TRUE(Code(store.Acquire(id, "c").status(), absl::StatusCode::kFailedPrecondition, "in use"));
  store.Return(id);
  auto again = store.Acquire(id, "c");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *h) << "Return gives the same handle back";
  store.Erase(id);
  EXPECT_TRUE(Code(store.Acquire(id, "c").status(), absl::StatusCode::kNotFound, id));
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
  ASSERT_TRUE(store.Acquire(b, "c").ok());
  EXPECT_EQ(store.EraseReferencing(8), 2);
  EXPECT_TRUE(Code(store.Acquire(a, "c").status(), absl::StatusCode::kNotFound, a));
  EXPECT_EQ(store.size(), 1) << "the doomed handle in use no longer counts";
  EXPECT_EQ(store.CountForClient("c"), 1);
  EXPECT_EQ(store.EraseReferencing(8), 0) << "a doomed handle is not counted twice";
  store.Return(b);  // the in-use handle goes when returned
  EXPECT_TRUE(Code(store.Acquire(b, "c").status(), absl::StatusCode::kNotFound, b));
  EXPECT_TRUE(store.Acquire(c, "c").ok());
}

TEST(ActivationStoreTest, ExpireDropsHandlesPastTheirTime) {
  ActivationStore store;
  const absl::Time now = absl::Now();
  const std::string old1 = *store.Add(Handle("c", {1}, now - absl::Seconds(1)), 10);
  const std::string old2 = *store.Add(Handle("c", {1}, now - absl::Seconds(2)), 10);
  const std::string fresh = *store.Add(Handle("c", {1}, now + absl::Hours(1)), 10);
  ASSERT_TRUE(store.Acquire(old2, "c").ok());
  EXPECT_EQ(store.Expire(now), 2);
  EXPECT_EQ(store.Expire(now), 0) << "a doomed handle is not counted twice";
  EXPECT_EQ(store.size(), 1);
  EXPECT_TRUE(Code(store.Acquire(old1, "c").status(), absl::StatusCode::kNotFound, "expired"));
  store.Return(old2);
  EXPECT_TRUE(Code(store.Acquire(old2, "c").status(), absl::StatusCode::kNotFound, old2));
  EXPECT_TRUE(store.Acquire(fresh, "c").ok());
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
