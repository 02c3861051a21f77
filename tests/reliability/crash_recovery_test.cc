// Crashes and damaged checkpoints, against the real `blockd` executable.
//
// Training: SIGKILL at random instants of a training loop (Forward/Backward micro-batches, Step,
// automatic checkpoints every 3 steps) and once inside a checkpoint write; each time blockd is
// restarted with --restore_on_start, the client reads the restored step counter and replays the
// steps after it from a deterministic schedule. The weights and AdamW moments at the end must be
// bitwise identical to an uninterrupted run (PRECISION_FP32, CPU backend, one BLAS thread).
//
// Damage: a flipped byte, a truncated or deleted file, a deleted manifest, a LATEST naming nothing
// are each refused with DATA_LOSS naming the problem, and change nothing; blockd refuses to start
// from a damaged LATEST rather than silently starting empty.
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "tests/integration/harness.h"
#include "tests/reliability/daemon_process.h"

namespace blockd::testing {
namespace {

namespace fs = std::filesystem;
using absl::StatusCode;

constexpr int64_t kSteps = 45;
const std::vector<std::string> kIds = {"c0", "c1"};

// Big enough that a checkpoint (weights + two moments of two blocks, ~6 MB) takes a while to
// write, small enough that a step takes milliseconds.
v1::BlockConfig CrashConfig() {
  v1::BlockConfig c;
  c.set_hidden_size(128);
  c.set_num_attention_heads(4);
  c.set_num_kv_heads(2);
  c.set_head_dim(32);
  c.set_intermediate_size(512);
  c.set_rms_norm_eps(1e-6);
  c.set_rope_theta(10000);
  c.set_qk_norm(true);
  return c;
}

std::vector<std::string> DaemonArgs(const std::string& checkpoint_dir) {
  return {"--checkpoint_dir=" + checkpoint_dir, "--checkpoint_every_steps=3", "--restore_on_start",
          "--worker_threads=2"};
}

std::unique_ptr<Client> Connect(const DaemonProcess& d) {
  ClientOptions o;
  o.target = d.target();
  o.timeout = absl::Seconds(30);
  auto c = Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// Brings the blocks to a known state: what blockd restored, else freshly created from their seeds
// (step 0). Returns the step counter both blocks agree on.
absl::StatusOr<int64_t> Resume(Client& c) {
  ASSIGN_OR_RETURN(std::vector<v1::BlockInfo> blocks, c.ListBlocks());
  std::map<std::string, int64_t> steps;
  for (const v1::BlockInfo& b : blocks) steps[b.block_id()] = b.step();
  for (size_t i = 0; i < kIds.size(); ++i) {
    if (steps.count(kIds[i]) != 0) continue;
    v1::CreateBlockRequest r = CreateRequest(kIds[i], CrashConfig(), 100 + i, /*max_batch_size=*/2, /*max_seq_len=*/16);
    r.set_precision(v1::PRECISION_FP32);
    RETURN_IF_ERROR(c.CreateBlock(r).status());
    steps[kIds[i]] = 0;
  }
  if (steps.size() != kIds.size() || steps[kIds[0]] != steps[kIds[1]]) {
    std::vector<std::string> got;
    for (const auto& [id, step] : steps) got.push_back(absl::StrCat(id, "@", step));
    return absl::InternalError(absl::StrCat("blocks came back at different steps: ", absl::StrJoin(got, ", ")));
  }
  return steps[kIds[0]];
}

// Step k of the schedule: two micro-batches (gradients accumulate), then AdamW with clipping.
// Everything it sends depends on k only.
absl::Status TrainStep(Client& c, int64_t k) {
  for (int m = 0; m < 2; ++m) {
    ASSIGN_OR_RETURN(v1::ForwardResponse y, c.Forward(kIds, RandomTensor({2, 16, 128}, 1000 * k + m), true));
    RETURN_IF_ERROR(c.Backward(y.activation_id(), RandomTensor({2, 16, 128}, 500000 + 1000 * k + m)).status());
  }
  v1::StepRequest r;
  for (const std::string& id : kIds) r.add_block_ids(id);
  r.mutable_adamw()->set_lr(2e-3);
  r.mutable_adamw()->set_weight_decay(0.1);
  r.set_max_grad_norm(1.0);
  ASSIGN_OR_RETURN(v1::StepResponse s, c.Step(r));
  if (s.skipped()) return absl::InternalError(absl::StrCat("step ", k, " was skipped"));
  for (const v1::BlockStep& b : s.steps()) {
    if (b.step() != k) return absl::InternalError(absl::StrCat("block ", b.block_id(), " is at step ", b.step(), ", expected ", k));
  }
  return absl::OkStatus();
}

struct FinalState {
  std::map<std::string, Snapshot> weights, adam_m, adam_v;
  std::map<std::string, int64_t> steps;
};

FinalState Final(Client& c) {
  FinalState f;
  for (const std::string& id : kIds) {
    f.weights[id] = Download(c, id, v1::TENSOR_KIND_WEIGHTS);
    f.adam_m[id] = Download(c, id, v1::TENSOR_KIND_ADAM_M);
    f.adam_v[id] = Download(c, id, v1::TENSOR_KIND_ADAM_V);
    auto info = c.GetBlock(id);
    f.steps[id] = info.ok() ? info->step() : -1;
  }
  return f;
}

std::vector<std::string> TmpEntries(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string base = e.path().filename().string();
    if (base.rfind(".tmp-", 0) == 0) out.push_back(base);
  }
  return out;
}

bool HasTmpEntry(const char* dir) {
  DIR* d = opendir(dir);
  if (d == nullptr) return false;
  bool found = false;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, ".tmp-", 5) == 0) {
      found = true;
      break;
    }
  }
  closedir(d);
  return found;
}

TEST(CrashRecovery, SigkillDuringTrainingAndCheckpointWritesThenResumeIsBitwiseIdentical) {
  const std::string root = MakeTempDir("crash");
  ASSERT_FALSE(root.empty());

  // The uninterrupted run.
  FinalState reference;
  absl::Duration step_time;
  {
    auto d = DaemonProcess::Start(BLOCKD_PATH, DaemonArgs(root + "/reference"), root + "/reference.log");
    ASSERT_TRUE(d.ok()) << d.status();
    auto c = Connect(**d);
    ASSERT_NE(c, nullptr);
    auto start = Resume(*c);
    ASSERT_TRUE(start.ok()) << start.status();
    ASSERT_EQ(*start, 0);
    const absl::Time t0 = absl::Now();
    for (int64_t k = 1; k <= kSteps; ++k) ASSERT_OK(TrainStep(*c, k)) << "reference step " << k;
    step_time = (absl::Now() - t0) / kSteps;
    reference = Final(*c);
  }

  // The same schedule with SIGKILLs: three at random instants within two steps after steps 4, 13
  // and 20 (Forward, Backward, Step, or an automatic checkpoint), then one inside a checkpoint
  // write (re-armed after every kill that did not land inside one).
  const uint64_t seed = std::random_device()();
  std::mt19937_64 rng(seed);
  std::cout << "[ crash ] random seed " << seed << ", a step takes " << absl::FormatDuration(step_time) << "\n";
  const std::string dir = root + "/crashing";
  const std::vector<int64_t> random_kills = {4, 13, 20};
  size_t next_random = 0;
  int64_t write_kill_armed_at = 27;
  int crashes = 0, in_write = 0, mid_loop = 0, restarts_after_write_kill = 0;
  std::vector<int64_t> resumed_at;
  bool finished = false;
  bool pending_write_check = false;
  std::unique_ptr<DaemonProcess> daemon;
  std::unique_ptr<Client> client;
  for (int run = 0; run < 40 && !finished; ++run) {
    client.reset();
    auto started = DaemonProcess::Start(BLOCKD_PATH, DaemonArgs(dir), root + "/crashing.log");
    ASSERT_TRUE(started.ok()) << started.status();
    daemon = *std::move(started);
    DaemonProcess* d = daemon.get();
    if (pending_write_check) {
      EXPECT_NE(d->Log().find("removing an interrupted checkpoint write"), std::string::npos)
          << "the restart did not clear the interrupted write:\n" << d->Log();
      EXPECT_TRUE(TmpEntries(dir).empty()) << "a .tmp- directory survived the restart";
      ++restarts_after_write_kill;
      pending_write_check = false;
    }
    client = Connect(*d);
    ASSERT_NE(client, nullptr);
    Client* c = client.get();
    auto start = Resume(*c);
    ASSERT_TRUE(start.ok()) << start.status() << "\n" << d->Log();
    resumed_at.push_back(*start);
    if (*start > 0) {
      EXPECT_NE(d->Log().find(absl::StrCat("restored ", kIds.size(), " blocks from")), std::string::npos)
          << d->Log();
    }

    // One kill per run, from another thread, while this thread trains.
    std::atomic<int64_t> progress{*start};
    std::atomic<bool> done{false}, fired{false};
    const bool write_kill = next_random >= random_kills.size();
    const int64_t target = write_kill ? std::max<int64_t>(write_kill_armed_at, *start) : random_kills[next_random];
    const int64_t delay_us = std::uniform_int_distribution<int64_t>(0, 2 * absl::ToInt64Microseconds(step_time))(rng);
    const pid_t pid = d->pid();
    std::thread killer([&] {
      while (!done && progress < target) absl::SleepFor(absl::Microseconds(200));
      if (done) return;
      if (write_kill) {
        // Kill the moment a checkpoint's temporary directory appears.
        while (!done && !HasTmpEntry(dir.c_str())) {
        }
        if (done) return;
      } else {
        absl::SleepFor(absl::Microseconds(delay_us));
      }
      fired = true;
      kill(pid, SIGKILL);
    });
    absl::Status failed;
    int64_t k = *start + 1;
    for (; k <= kSteps; ++k) {
      failed = TrainStep(*c, k);
      if (!failed.ok()) break;
      progress = k;
    }
    done = true;
    killer.join();
    if (failed.ok()) {
      ASSERT_FALSE(fired) << "the SIGKILL landed after the last step";
      finished = true;
      break;
    }
    ASSERT_TRUE(fired) << "step " << k << " failed without a SIGKILL: " << failed << "\n" << d->Log();
    EXPECT_TRUE(failed.code() == StatusCode::kUnavailable || failed.code() == StatusCode::kInternal ||
                failed.code() == StatusCode::kCancelled)
        << failed;
    d->Kill();
    ++crashes;
    if (write_kill) {
      if (!TmpEntries(dir).empty()) {
        ++in_write;
        pending_write_check = true;
        write_kill_armed_at = kSteps + 1;  // landed: no more write kills
        next_random = random_kills.size() + 1;
      } else {
        write_kill_armed_at = k;  // the write finished before the signal: try at the next one
      }
    } else {
      ++mid_loop;
      ++next_random;
    }
    std::cout << "[ crash ] SIGKILL " << crashes
              << (write_kill ? " (aimed at a checkpoint write)" : absl::StrCat(" (", delay_us, " us after step ", target, ")"))
              << " during step " << k << " (resumed at " << *start << "): " << failed.message() << "\n";
  }
  ASSERT_TRUE(finished) << "the crashing run never reached step " << kSteps;
  EXPECT_EQ(mid_loop, 3);
  EXPECT_EQ(in_write, 1) << "no SIGKILL landed inside a checkpoint write";
  EXPECT_EQ(restarts_after_write_kill, in_write);

  // The end state, from the daemon that finished, and once more after a last SIGKILL and restart
  // (automatic checkpoints fall on multiples of 3 since every restore is at one, and 45 is one).
  auto expect_reference = [&](const FinalState& got, absl::string_view when) {
    for (const std::string& id : kIds) {
      EXPECT_EQ(got.steps.at(id), kSteps) << id << " " << when;
      EXPECT_EQ(DiffSnapshots(reference.weights.at(id), got.weights.at(id)), "") << id << " weights " << when;
      EXPECT_EQ(DiffSnapshots(reference.adam_m.at(id), got.adam_m.at(id)), "") << id << " adam_m " << when;
      EXPECT_EQ(DiffSnapshots(reference.adam_v.at(id), got.adam_v.at(id)), "") << id << " adam_v " << when;
      EXPECT_EQ(got.weights.at(id).size(), ExpectedParams(CrashConfig()).size());
    }
  };
  expect_reference(Final(*client), "at the end of the crashing run");
  client.reset();
  daemon->Kill();
  auto last = DaemonProcess::Start(BLOCKD_PATH, DaemonArgs(dir), root + "/crashing.log");
  ASSERT_TRUE(last.ok()) << last.status();
  client = Connect(**last);
  ASSERT_NE(client, nullptr);
  expect_reference(Final(*client), "after a final SIGKILL and restore");
  std::cout << "[ crash ] survived " << crashes << " SIGKILLs (" << mid_loop << " at random instants of the loop, "
            << in_write << " inside a checkpoint write, " << (crashes - mid_loop - in_write)
            << " aimed at a write that finished first); resumed at steps [" << absl::StrJoin(resumed_at, ", ")
            << "]; final weights and moments bitwise equal to the uninterrupted run\n";
  ::testing::Test::RecordProperty("crashes_survived", crashes);
}

// ---- damaged checkpoints ----

void FlipByte(const std::string& path, size_t pos) {
  std::string bytes = ReadFileOrEmpty(path);
  ASSERT_LT(pos, bytes.size()) << path;
  bytes[pos] = static_cast<char>(bytes[pos] ^ 0x01);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

void Truncate(const std::string& path, size_t size) { fs::resize_file(path, size); }

class DamagedCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = MakeTempDir("damaged");
    ASSERT_FALSE(root_.empty());
    dir_ = root_ + "/ckpt";
    StartDaemon();
    auto start = Resume(*client_);
    ASSERT_TRUE(start.ok()) << start.status();
    ASSERT_OK(TrainStep(*client_, 1));
    ASSERT_OK(TrainStep(*client_, 2));
    v1::SaveCheckpointRequest save;
    save.set_name("good");
    auto saved = client_->SaveCheckpoint(save);
    ASSERT_OK(saved.status());
    good_ = saved->path();
    // Move on, so a restore that went through would show.
    ASSERT_OK(TrainStep(*client_, 3));
    for (const std::string& id : kIds) before_[id] = StateOf(*client_, id);
  }
  void StartDaemon(const std::vector<std::string>& more = {}) {
    std::vector<std::string> args = {"--checkpoint_dir=" + dir_, "--worker_threads=2"};
    args.insert(args.end(), more.begin(), more.end());
    auto d = DaemonProcess::Start(BLOCKD_PATH, args, root_ + "/log");
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = *std::move(d);
    client_ = Connect(*daemon_);
    ASSERT_NE(client_, nullptr);
  }
  // A copy of the good checkpoint named `name`, damaged by `damage(path)`.
  std::string Variant(const std::string& name, const std::function<void(const std::string&)>& damage) {
    const std::string path = dir_ + "/" + name;
    fs::remove_all(path);
    fs::copy(good_, path, fs::copy_options::recursive);
    damage(path);
    return path;
  }
  // Restoring `name` fails with `code` and every part of `parts`; nothing changes; blockd serves.
  void ExpectRefused(const std::string& name, StatusCode code, const std::vector<std::string>& parts) {
    v1::RestoreCheckpointRequest r;
    r.set_name(name);
    auto restored = client_->RestoreCheckpoint(r);
    EXPECT_TRUE(StatusIs(restored.status(), code, parts)) << "restoring " << name;
    ++refused_;
    for (const std::string& id : kIds) {
      EXPECT_EQ(DiffStates(before_[id], StateOf(*client_, id)), "") << "a refused restore of " << name << " changed " << id;
    }
    ExpectServing();
  }
  void ExpectServing() { EXPECT_TRUE(client_->GetServerInfo().ok()) << "blockd stopped serving"; }

  std::string root_, dir_, good_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  std::map<std::string, BlockState> before_;
  int refused_ = 0;
};

TEST_F(DamagedCheckpoint, EveryKindOfDamageIsRefusedWithDataLossAndChangesNothing) {
  const std::string block0 = "block-0000.safetensors", block1 = "block-0001.safetensors";
  const size_t block_size = fs::file_size(good_ + "/" + block0);
  ASSERT_GT(block_size, 100000u);
  // A flipped bit anywhere in a block file: the header length, its JSON, the data, the last byte.
  for (size_t pos : {size_t{3}, size_t{60}, block_size / 2, block_size - 1}) {
    const std::string name = absl::StrCat("flip-", pos);
    Variant(name, [&](const std::string& p) { FlipByte(p + "/" + block0, pos); });
    ExpectRefused(name, StatusCode::kDataLoss, {block0, "(block c0) does not match its size and sha256"});
  }
  Variant("truncated", [&](const std::string& p) { Truncate(p + "/" + block1, block_size / 3); });
  ExpectRefused("truncated", StatusCode::kDataLoss, {block1, "(block c1) does not match its size and sha256"});
  Variant("empty-file", [&](const std::string& p) { Truncate(p + "/" + block1, 0); });
  ExpectRefused("empty-file", StatusCode::kDataLoss, {block1, "does not match its size and sha256"});
  Variant("missing-file", [&](const std::string& p) { fs::remove(p + "/" + block1); });
  ExpectRefused("missing-file", StatusCode::kDataLoss, {block1, "is missing"});
  Variant("no-manifest", [&](const std::string& p) { fs::remove(p + "/manifest.json"); });
  ExpectRefused("no-manifest", StatusCode::kDataLoss, {"no-manifest is incomplete: it has no manifest.json"});
  Variant("empty-dir", [&](const std::string& p) {
    for (const auto& e : fs::directory_iterator(p)) fs::remove(e.path());
  });
  ExpectRefused("empty-dir", StatusCode::kDataLoss, {"empty-dir is incomplete: it has no manifest.json"});
  const size_t manifest_size = fs::file_size(good_ + "/manifest.json");
  Variant("truncated-manifest", [&](const std::string& p) { Truncate(p + "/manifest.json", manifest_size / 2); });
  ExpectRefused("truncated-manifest", StatusCode::kDataLoss, {"manifest.json is not a blockd-checkpoint-v1 manifest"});

  // A digit of a step counter: still valid JSON, so only the manifest's own checksum can tell.
  const std::string manifest = ReadFileOrEmpty(good_ + "/manifest.json");
  const size_t step_at = manifest.find("\"step\": ");
  ASSERT_NE(step_at, std::string::npos) << manifest;
  Variant("step-digit", [&](const std::string& p) { FlipByte(p + "/manifest.json", step_at + 8); });
  ExpectRefused("step-digit", StatusCode::kDataLoss, {"manifest.json does not match its manifest_sha256"});
  // And any other byte that is not layout whitespace.
  std::mt19937_64 rng(42);
  int flips = 0;
  while (flips < 12) {
    const size_t pos = std::uniform_int_distribution<size_t>(0, manifest.size() - 1)(rng);
    if (std::isspace(static_cast<unsigned char>(manifest[pos]))) continue;
    const std::string name = absl::StrCat("manifest-flip-", pos);
    Variant(name, [&](const std::string& p) { FlipByte(p + "/manifest.json", pos); });
    ExpectRefused(name, StatusCode::kDataLoss, {"checkpoint ", name});
    ++flips;
  }
  // Asking for a checkpoint that is not there at all is NOT_FOUND, not damage.
  ExpectRefused("never-written", StatusCode::kNotFound, {"no checkpoint never-written in "});
  std::cout << "[ damaged ] " << refused_ << " damaged or missing checkpoints refused, state unchanged each time\n";

  // The good one still restores (the copies did not disturb it).
  v1::RestoreCheckpointRequest r;
  r.set_name("good");
  ASSERT_OK(client_->RestoreCheckpoint(r).status());
  auto info = client_->GetBlock("c0");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->step(), 2);
}

TEST_F(DamagedCheckpoint, RestoreOnStartRefusesADamagedLatestInsteadOfStartingEmpty) {
  ASSERT_EQ(daemon_->Terminate(), 0);
  const std::vector<std::string> args = {"--checkpoint_dir=" + dir_, "--restore_on_start"};
  auto expect_refuses_to_start = [&](const std::string& latest, const std::string& message) {
    std::ofstream(dir_ + "/LATEST", std::ios::trunc) << latest << "\n";
    const std::string log = root_ + "/refuse-" + std::to_string(++refused_) + ".log";
    auto status = DaemonProcess::RunToExit(BLOCKD_PATH, args, log);
    ASSERT_TRUE(status.ok()) << status.status();
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) != 0) << "blockd started from LATEST=" << latest;
    EXPECT_NE(ReadFileOrEmpty(log).find(message), std::string::npos) << ReadFileOrEmpty(log);
  };
  Variant("flipped", [&](const std::string& p) { FlipByte(p + "/block-0001.safetensors", 1000); });
  expect_refuses_to_start("flipped", "(block c1) does not match its size and sha256");
  Variant("headless", [&](const std::string& p) { fs::remove(p + "/manifest.json"); });
  expect_refuses_to_start("headless", "headless is incomplete: it has no manifest.json");
  expect_refuses_to_start("vanished", "LATEST names checkpoint vanished, but");
  expect_refuses_to_start("../../etc", "LATEST is corrupt");

  // With LATEST naming the good one again, blockd starts and has it.
  std::ofstream(dir_ + "/LATEST", std::ios::trunc) << "good\n";
  StartDaemon({"--restore_on_start"});
  auto info = client_->GetBlock("c1");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->step(), 2);
}

}  // namespace
}  // namespace blockd::testing
