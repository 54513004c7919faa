// CPU tests of the persistent recurrent kernels' plan and step loops (csrc/cuda/persistent_plan.h,
// persistent_steps.h), for machines without a GPU. tests/test_persistent.py compiles and runs it.
//
// 1. The plan's index math: every W_hh element held by exactly one CTA, shared memory regions in
//    bounds and apart, every (row, batch, k) product computed by exactly one FMA or MMA task, the
//    MMA fragment maps as the PTX ISA gives them, schedules that reproduce the rows of packed and
//    time-reversed sequences.
// 2. The step loops, run by an emulator of the GPU's execution model: each CTA on its own host
//    thread, one at a time, switching at grid barriers; a phase's threads one after another. Every
//    shared- and global-memory access is checked: in bounds of a known buffer, and no race (two
//    threads of a CTA in one phase, or two CTAs between two grid barriers, touching an address that
//    one of them writes). Outputs are compared with a float64 step-by-step reference using the same
//    cells.h gate math, for LSTM, GRU and RNN (tanh, relu), float32 (FMA) and bfloat16 (MMA,
//    emulated from its fragment maps), packed and reversed sequences, several CTAs, batch tiles.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/persistent_steps.h"

using namespace fused_rnn;
using namespace fused_rnn::persistent;

namespace {

int failures = 0;
int checks = 0;
std::atomic<int64_t> vector_copies{0};  // 16-byte staging copies: the cases must use both paths

void fail(const std::string& what) {
  if (failures < 30) std::printf("FAIL: %s\n", what.c_str());
  ++failures;
}

// Counts a check; builds the message only when it fails.
#define EXPECT(ok, what) \
  do {                   \
    ++checks;            \
    if (!(ok)) fail(what); \
  } while (0)

std::string str(int64_t v) { return std::to_string(v); }

// ---- bfloat16 on the host ------------------------------------------------------------------------

struct Bf16 {
  uint16_t bits;
};

float to_float(Bf16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

Bf16 to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}

template <typename S>
float as_float(S v) {
  if constexpr (std::is_same_v<S, Bf16>) return to_float(v);
  else return v;
}

template <typename S>
S from_float(float v) {
  if constexpr (std::is_same_v<S, Bf16>) return to_bf16(v);
  else return v;
}

// ---- the emulator -----------------------------------------------------------------------------------

struct Access {
  int64_t cta, phase;
  int tid;
  bool write;
};

class Emulator {
 public:
  // Buffers the kernels may touch: every access must lie inside one.
  void add_region(const void* p, size_t bytes, const std::string& name) {
    regions_.push_back({static_cast<const unsigned char*>(p), static_cast<const unsigned char*>(p) + bytes, name});
  }

  void access(const void* p, size_t bytes, bool write, int64_t cta, int64_t phase, int tid) {
    std::lock_guard<std::mutex> lock(log_mutex_);
    const auto* begin = static_cast<const unsigned char*>(p);
    bool inside = false;
    for (const auto& r : regions_) inside |= begin >= r.begin && begin + bytes <= r.end;
    if (!inside) {  // stop before the access corrupts the test's own memory
      std::printf("FAIL: access outside every buffer by CTA %lld thread %d\n", static_cast<long long>(cta), tid);
      std::fflush(stdout);
      std::abort();
    }
    auto& seen = log_[reinterpret_cast<uintptr_t>(p)];
    for (const Access& a : seen) {
      if (!(write || a.write)) continue;
      if (a.cta != cta) {
        EXPECT(false, "race between CTAs " + str(a.cta) + " and " + str(cta) + " between grid barriers (" +
                          region_name(p) + ")");
        return;
      }
      if (a.phase == phase && a.tid != tid) {
        EXPECT(false, "race between threads " + str(a.tid) + " and " + str(tid) + " of CTA " + str(cta) +
                          " in one phase (" + region_name(p) + ")");
        return;
      }
    }
    for (const Access& a : seen)
      if (a.cta == cta && a.phase == phase && a.tid == tid && a.write == write) return;
    if (seen.size() < 64) seen.push_back({cta, phase, tid, write});
  }

  // Runs body(cta) for every CTA, one at a time, switching at grid barriers (sync(cta)).
  void run(int64_t ctas, const std::function<void(int64_t)>& body) {
    ctas_ = ctas;
    turn_ = 0;
    arrived_ = 0;
    finished_ = 0;
    log_.clear();
    std::vector<std::thread> threads;
    for (int64_t c = 0; c < ctas; ++c)
      threads.emplace_back([&, c] {
        wait_turn(c);
        body(c);
        std::unique_lock<std::mutex> lock(turn_mutex_);
        ++finished_;
        turn_ = (c + 1) % ctas_;
        turn_changed_.notify_all();
      });
    for (auto& t : threads) t.join();
  }

  void sync(int64_t cta) {
    std::unique_lock<std::mutex> lock(turn_mutex_);
    if (++arrived_ == ctas_) {  // everyone is here: what came before is ordered before what follows
      arrived_ = 0;
      std::lock_guard<std::mutex> log_lock(log_mutex_);
      log_.clear();
    }
    turn_ = (cta + 1) % ctas_;
    turn_changed_.notify_all();
    turn_changed_.wait(lock, [&] { return turn_ == cta; });
  }

 private:
  struct Region {
    const unsigned char *begin, *end;
    std::string name;
  };

  std::string region_name(const void* p) const {
    for (const auto& r : regions_)
      if (static_cast<const unsigned char*>(p) >= r.begin && static_cast<const unsigned char*>(p) < r.end) return r.name;
    return "?";
  }

  void wait_turn(int64_t cta) {
    std::unique_lock<std::mutex> lock(turn_mutex_);
    turn_changed_.wait(lock, [&] { return turn_ == cta; });
  }

  std::vector<Region> regions_;
  std::unordered_map<uintptr_t, std::vector<Access>> log_;
  std::mutex log_mutex_, turn_mutex_;
  std::condition_variable turn_changed_;
  int64_t ctas_ = 0, turn_ = 0, arrived_ = 0, finished_ = 0;
};

// What the thread running now is (for the cells' IO, which has no context of its own).
struct Current {
  Emulator* emulator;
  int64_t cta, phase;
  int tid;
};
thread_local Current current{};

void note(const void* p, size_t bytes, bool write) {
  current.emulator->access(p, bytes, write, current.cta, current.phase, current.tid);
}

template <typename S>
struct EmuIO {
  static float load(const S* p) {
    note(p, sizeof(S), false);
    return as_float(*p);
  }
  static void store(S* p, float v) {
    note(p, sizeof(S), true);
    *p = from_float<S>(v);
  }
};

struct EmuExec {
  Emulator* emulator;
  int64_t cta_index;
  std::vector<unsigned char>* smem;
  int64_t phase = 0;

  template <typename S>
  using Math = float;
  template <typename S>
  using IO = EmuIO<S>;

  int64_t cta() const { return cta_index; }

  template <class F>
  void threads(const F& f) {
    ++phase;
    for (int tid = 0; tid < kThreads; ++tid) {
      current = {emulator, cta_index, phase, tid};
      f(tid);
    }
  }

  void grid_sync() {
    emulator->sync(cta_index);
    current = {emulator, cta_index, ++phase, 0};
  }

  template <typename T>
  T* shared(int64_t offset) const {
    return reinterpret_cast<T*>(smem->data() + offset);
  }
  template <typename T>
  T get(const T* p) const {
    note(p, sizeof(T), false);
    return *p;
  }
  template <typename T>
  void put(T* p, T v) const {
    note(p, sizeof(T), true);
    *p = v;
  }
  template <typename T>
  T exchanged(const T* p) const {
    return get(p);
  }
  template <typename T>
  void copy16_exchanged(T* dst, const T* src) const {
    ++vector_copies;
    EXPECT(reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
           "a 16-byte copy that is not 16-byte aligned");
    for (size_t i = 0; i < 16 / sizeof(T); ++i) put(dst + i, get(src + i));
  }
  template <typename T>
  void zero16(T* dst) const {
    EXPECT(reinterpret_cast<uintptr_t>(dst) % 16 == 0, "16 zero bytes not 16-byte aligned");
    for (size_t i = 0; i < 16 / sizeof(T); ++i) put(dst + i, from_float<T>(0.0f));
  }

  // float32: the FMA tasks, each a 4x4 tile over its slice of k.
  void products(const Layout& l, const float* m, const float* v, float* partials, int tid) const {
    for (int32_t t = tid; t < fma_task_count(l); t += kThreads) {
      const FmaTask task = fma_task(l, t);
      float acc[4][4] = {};
      for (int32_t g = task.granules.begin; g < task.granules.end; ++g)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            for (int q = 0; q < 4; ++q)
              acc[i][j] += get(m + int64_t(task.row + i) * l.ld_m + 4 * g + q) *
                           get(v + int64_t(task.batch + j) * l.ld_v + 4 * g + q);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) put(partials + partial_index(l, task.slice, task.row + i, task.batch + j), acc[i][j]);
    }
  }

  // bfloat16: the MMA tasks, a warp at a time (at its lane 0's turn): every lane loads its
  // fragments from the offsets the kernel uses, the m16n8k16 product is formed from the fragment
  // maps, and every lane stores its accumulators.
  void products(const Layout& l, const Bf16* m, const Bf16* v, float* partials, int tid) {
    if (tid % 32) return;
    const int32_t warp = tid / 32, n_tiles = l.batch_tile / 8;
    const auto as_lane = [&](int lane) { current.tid = warp * 32 + lane; };
    for (int32_t t = warp; t < mma_task_count(l); t += kWarps) {
      const MmaTask task = mma_task(l, t);
      float acc[kMaxNTiles][32][4] = {};
      for (int32_t ks = task.granules.begin; ks < task.granules.end; ++ks) {
        float a[16][16] = {};
        for (int lane = 0; lane < 32; ++lane) {
          as_lane(lane);
          for (int r = 0; r < 4; ++r) {
            const Coord c = mma_a_coord(lane, r);
            const int64_t at = mma_a_offset(l, task.m_tile, ks, lane, r);
            a[c.row][c.col] = to_float(get(m + at));
            a[c.row][c.col + 1] = to_float(get(m + at + 1));
          }
        }
        for (int32_t nt = 0; nt < n_tiles; ++nt) {
          float b[16][8] = {};
          for (int lane = 0; lane < 32; ++lane) {
            as_lane(lane);
            for (int r = 0; r < 2; ++r) {
              const Coord c = mma_b_coord(lane, r);  // {k, n}
              const int64_t at = mma_b_offset(l, nt, ks, lane, r);
              b[c.row][c.col] = to_float(get(v + at));
              b[c.row + 1][c.col] = to_float(get(v + at + 1));
            }
          }
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              const Coord c = mma_c_coord(lane, e);
              for (int k = 0; k < 16; ++k) acc[nt][lane][e] += a[c.row][k] * b[k][c.col];
            }
        }
      }
      for (int32_t nt = 0; nt < n_tiles; ++nt)
        for (int lane = 0; lane < 32; ++lane) {
          as_lane(lane);
          for (int e = 0; e < 4; ++e) {
            const Coord c = mma_c_coord(lane, e);
            put(partials + partial_index(l, task.slice, task.m_tile * 16 + c.row, nt * 8 + c.col), acc[nt][lane][e]);
          }
        }
    }
    current.tid = tid;
  }
};

template <class Body>
void emulate(Emulator& emulator, const Layout& l, const Body& body) {
  std::vector<std::vector<unsigned char>> smem(l.ctas, std::vector<unsigned char>(l.smem_bytes, 0xff));
  for (int64_t c = 0; c < l.ctas; ++c) emulator.add_region(smem[c].data(), smem[c].size(), "shared memory");
  emulator.run(l.ctas, [&](int64_t c) {
    EmuExec x{&emulator, c, &smem[c]};
    current = {&emulator, c, 0, 0};
    body(x);
  });
}

// ---- 1. the plan's index math ----------------------------------------------------------------------

void check_layout(const Pass& pass, int64_t batch, int64_t max_ctas, int64_t smem_limit) {
  const Layout l = plan_layout(pass, batch, max_ctas, smem_limit);
  const std::string where = std::string(pass.backward ? "backward" : "forward") + (pass.math == Math::kMma ? " mma" : " fma") +
                            " units " + str(pass.units) + " x" + str(pass.rows_per_unit) + " k " + str(pass.k) +
                            " batch " + str(batch) + " ctas<=" + str(max_ctas) + " smem " + str(smem_limit);
  if (l.verdict != Verdict::kFits) {
    // Only a lack of shared memory may refuse a valid pass.
    EXPECT(l.verdict == Verdict::kNoSharedMemory, where + ": refused for another reason");
    return;
  }
  const int32_t es = pass.element_bytes;
  EXPECT(l.ctas >= 1 && l.ctas <= max_ctas, where + ": CTA count");
  EXPECT(int64_t(l.ctas - 1) * l.units_per_cta < pass.units && int64_t(l.ctas) * l.units_per_cta >= pass.units,
         where + ": units do not cover the CTAs exactly");
  EXPECT(l.rows_pad % row_granule(l.math) == 0 && l.k_pad % 16 == 0 && l.k_pad >= l.k, where + ": padding");
  EXPECT(l.batch_tile % batch_granule(l.math) == 0 && l.batch_tile <= kMaxBatchTile && l.batch_tile >= 1,
         where + ": batch tile");
  EXPECT((int64_t(l.ld_m) * es / 4) % 32 == 4 && l.ld_m >= l.k_pad, where + ": M stride");
  EXPECT(l.m_offset == 0 && l.v_offset >= int64_t(l.rows_pad) * l.ld_m * es && l.v_offset % 16 == 0,
         where + ": M region");
  EXPECT(l.red_offset >= l.v_offset + int64_t(l.batch_tile) * l.ld_v * es && l.red_offset % 16 == 0,
         where + ": vector region");
  EXPECT(l.smem_bytes == l.red_offset + int64_t(l.k_slices) * l.rows_pad * l.batch_tile * 4 &&
             l.smem_bytes <= smem_limit,
         where + ": partials region and total");
  // Every W_hh element once, in the right place.
  const int64_t elements = pass.units * pass.rows_per_unit * pass.k;
  std::vector<int> held(elements, 0);
  for (int64_t c = 0; c < l.ctas; ++c)
    for (int64_t r = 0; r < l.rows_pad; ++r)
      for (int64_t kk = 0; kk < l.k_pad; ++kk) {
        const int64_t e = matrix_element(l, c, r, kk);
        if (e < 0) continue;
        EXPECT(e < elements, where + ": element out of W_hh");
        if (e >= elements) continue;
        ++held[e];
        const RowTarget t = row_target(l, c, r);
        // Forward: M[r][kk] = W_hh[part*H + unit][kk]; backward: M[r][q] = W_hh[q][unit].
        const int64_t expected = pass.backward ? kk * pass.units + t.unit : (t.part * pass.units + t.unit) * pass.units + kk;
        EXPECT(e == expected && t.unit < pass.units && t.unit >= first_unit(l, c), where + ": element placement");
      }
  EXPECT(std::all_of(held.begin(), held.end(), [](int n) { return n == 1; }), where + ": W_hh not held exactly once");
  // k slices partition the granules.
  int32_t next = 0;
  for (int32_t s = 0; s < l.k_slices; ++s) {
    const Range r = k_slice(l, s);
    EXPECT(r.begin == next && r.end > r.begin, where + ": k slices");
    next = r.end;
  }
  EXPECT(next == l.k_pad / k_granule(l.math), where + ": k slices end");
  // Every (row, batch, k) product once; every partial written once and inside its region.
  std::vector<int> product(int64_t(l.rows_pad) * l.batch_tile * l.k_pad, 0);
  std::vector<int> partial(int64_t(l.k_slices) * l.rows_pad * l.batch_tile, 0);
  const auto count = [&](int64_t r, int64_t b, int64_t kk) { ++product[(r * l.batch_tile + b) * l.k_pad + kk]; };
  if (l.math == Math::kFma) {
    for (int32_t t = 0; t < fma_task_count(l); ++t) {
      const FmaTask task = fma_task(l, t);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          for (int64_t kk = 4 * task.granules.begin; kk < 4 * task.granules.end; ++kk) count(task.row + i, task.batch + j, kk);
          ++partial[partial_index(l, task.slice, task.row + i, task.batch + j)];
        }
    }
  } else {
    for (int32_t t = 0; t < mma_task_count(l); ++t) {
      const MmaTask task = mma_task(l, t);
      for (int32_t nt = 0; nt < l.batch_tile / 8; ++nt) {
        for (int32_t ks = task.granules.begin; ks < task.granules.end; ++ks) {
          for (int lane = 0; lane < 32; ++lane) {
            for (int r = 0; r < 4; ++r) {
              const int64_t at = mma_a_offset(l, task.m_tile, ks, lane, r);
              EXPECT(at >= 0 && (at + 1) * es <= l.v_offset && at % 2 == 0, where + ": A fragment outside M");
            }
            for (int r = 0; r < 2; ++r) {
              const int64_t at = mma_b_offset(l, nt, ks, lane, r);
              EXPECT(at >= 0 && l.v_offset + (at + 1) * es <= l.red_offset && at % 2 == 0,
                     where + ": B fragment outside the vector tile");
            }
          }
          for (int row = 0; row < 16; ++row)
            for (int col = 0; col < 8; ++col)
              for (int k = 0; k < 16; ++k) count(task.m_tile * 16 + row, nt * 8 + col, ks * 16 + k);
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 4; ++e) {
            const Coord c = mma_c_coord(lane, e);
            ++partial[partial_index(l, task.slice, task.m_tile * 16 + c.row, nt * 8 + c.col)];
          }
      }
    }
  }
  EXPECT(std::all_of(product.begin(), product.end(), [](int n) { return n == 1; }),
         where + ": a product is computed other than once");
  // Each slice writes every (row, batch) once: the sums read all of them.
  EXPECT(std::all_of(partial.begin(), partial.end(), [](int n) { return n == 1; }),
         where + ": a partial is written other than once");
}

void check_fragment_maps() {
  // Each register pair of A covers a 16x16 tile once, of B a 16x8 tile once; C covers 16x8 once.
  int a[16][16] = {}, b[16][8] = {}, c[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      const Coord x = mma_a_coord(lane, r);
      ++a[x.row][x.col];
      ++a[x.row][x.col + 1];
    }
    for (int r = 0; r < 2; ++r) {
      const Coord x = mma_b_coord(lane, r);
      ++b[x.row][x.col];
      ++b[x.row + 1][x.col];
    }
    for (int e = 0; e < 4; ++e) {
      const Coord x = mma_c_coord(lane, e);
      ++c[x.row][x.col];
    }
  }
  bool once = true;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) once &= a[i][j] == 1 && (j >= 8 || (b[i][j] == 1 && c[i][j] == 1));
  EXPECT(once, "MMA fragment maps do not cover their tiles exactly once");
  // The PTX ISA's tables for m16n8k16 (.bf16/.f16, .f32 accumulators): lane 5 is group 1, thread 1.
  EXPECT(mma_a_coord(5, 0).row == 1 && mma_a_coord(5, 0).col == 2, "A a0,a1 of lane 5");
  EXPECT(mma_a_coord(5, 1).row == 9 && mma_a_coord(5, 1).col == 2, "A a2,a3 of lane 5");
  EXPECT(mma_a_coord(5, 2).row == 1 && mma_a_coord(5, 2).col == 10, "A a4,a5 of lane 5");
  EXPECT(mma_a_coord(5, 3).row == 9 && mma_a_coord(5, 3).col == 10, "A a6,a7 of lane 5");
  EXPECT(mma_b_coord(5, 0).row == 2 && mma_b_coord(5, 0).col == 1, "B b0,b1 of lane 5");
  EXPECT(mma_b_coord(5, 1).row == 10 && mma_b_coord(5, 1).col == 1, "B b2,b3 of lane 5");
  EXPECT(mma_c_coord(5, 0).row == 1 && mma_c_coord(5, 0).col == 2, "C c0 of lane 5");
  EXPECT(mma_c_coord(5, 3).row == 9 && mma_c_coord(5, 3).col == 3, "C c3 of lane 5");
}

void check_layouts() {
  const int64_t h200 = 232448;  // 227 KiB, an H100/H200 block's shared-memory limit
  for (bool backward : {false, true})
    for (Math math : {Math::kFma, Math::kMma})
      for (int64_t gates : {1, 3, 4})
        for (int64_t hidden : {1, 5, 17, 64, 100, 256})
          for (int64_t batch : {1, 13, 64, 100})
            for (int64_t ctas : {1, 3, 8, 132})
              for (int64_t smem : {int64_t(24) << 10, h200}) {
                const int32_t es = math == Math::kMma ? 2 : 4;
                check_layout(backward ? backward_pass(gates, hidden, es, math) : forward_pass(gates, hidden, es, math),
                             batch, ctas, smem);
              }
  // The shapes the targets are about (fewer combinations: each check walks every W_hh element).
  for (int64_t hidden : {512, 768, 1024})
    for (Math math : {Math::kFma, Math::kMma})
      for (bool backward : {false, true}) {
        const int32_t es = math == Math::kMma ? 2 : 4;
        check_layout(backward ? backward_pass(4, hidden, es, math) : forward_pass(4, hidden, es, math), 16, 132, h200);
      }
  // An H200 holds W_hh of an LSTM with H = 1024 in float32 and in bfloat16, forward and backward.
  for (Math math : {Math::kFma, Math::kMma})
    for (bool backward : {false, true}) {
      const int32_t es = math == Math::kMma ? 2 : 4;
      const Layout l = plan_layout(backward ? backward_pass(4, 1024, es, math) : forward_pass(4, 1024, es, math), 64, 132, h200);
      EXPECT(l.verdict == Verdict::kFits && l.ctas <= 132, "LSTM H=1024 fits an H200");
    }
  // ... and refuses H = 2048 in float32 (64 MiB of W_hh).
  EXPECT(plan_layout(forward_pass(4, 2048, 4, Math::kFma), 16, 132, h200).verdict == Verdict::kNoSharedMemory,
         "LSTM H=2048 float32 refused");
  EXPECT(plan_layout(forward_pass(4, 10, 4, Math::kFma), 0, 132, h200).verdict == Verdict::kNoUnits, "batch 0 refused");
}

// Rows of the steps of a sequence laid out as layer.h lays it out: step t's rows follow step t-1's.
struct Sequence {
  std::vector<int64_t> batch, offset;
  int64_t rows = 0;
};

Sequence make_sequence(const std::vector<int64_t>& batch) {
  Sequence s;
  s.batch = batch;
  for (int64_t b : batch) {
    s.offset.push_back(s.rows);
    s.rows += b;
  }
  return s;
}

// Processing order of a chunk [k0, k1) of steps, time forwards or backwards: the batch and the row
// (relative to the chunk's lowest row) of each step.
struct Chunk {
  std::vector<int64_t> batch, row;
  int64_t row_lo = 0, rows = 0;
};

Chunk make_chunk(const Sequence& s, int64_t k0, int64_t k1, bool time_backwards) {
  const int64_t T = s.batch.size();
  const int64_t t_lo = time_backwards ? T - k1 : k0, t_hi = time_backwards ? T - k0 : k1;
  Chunk c;
  c.row_lo = s.offset[t_lo];
  c.rows = (t_hi < T ? s.offset[t_hi] : s.rows) - c.row_lo;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t t = time_backwards ? T - 1 - k : k;
    c.batch.push_back(s.batch[t]);
    c.row.push_back(s.offset[t] - c.row_lo);
  }
  return c;
}

void check_schedules() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    // Non-increasing batch sizes, as PackedSequence has them; long ones cross kMaxSegments.
    const int64_t T = 1 + rng() % (trial % 10 == 0 ? 600 : 40), B = 1 + rng() % 300;
    std::vector<int64_t> batch(T);
    int64_t b = B;
    for (auto& x : batch) {
      if (rng() % 3 == 0) b = std::max<int64_t>(1, b - int64_t(rng() % 4));
      x = b;
    }
    const Sequence s = make_sequence(batch);
    for (bool backwards : {false, true}) {
      const int64_t k0 = rng() % T, k1 = k0 + 1 + rng() % (T - k0);
      const Chunk c = make_chunk(s, k0, k1, backwards);
      int64_t seen = 0;
      for_each_schedule(c.batch.data(), int64_t(c.batch.size()), backwards,
                        [&](const Schedule& schedule, int64_t first, int64_t steps) {
                          EXPECT(first == seen && steps >= 1 && schedule.segments <= kMaxSegments &&
                                     schedule_steps(schedule) == steps,
                                 "schedule split");
                          const int64_t lo = c.row[backwards ? first + steps - 1 : first];
                          Cursor cur = first_step(schedule);
                          for (int64_t k = first; k < first + steps; ++k, cur = next_step(schedule, cur))
                            EXPECT(cur.batch == c.batch[k] && lo + cur.row == c.row[k], "schedule rows of step " + str(k));
                          seen += steps;
                        });
      EXPECT(seen == int64_t(c.batch.size()), "schedules cover the chunk");
    }
  }
}

// ---- 2. the step loops against a float64 reference ---------------------------------------------------

template <typename S>
std::vector<S> random_values(std::mt19937& rng, int64_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<S> v(n);
  for (auto& x : v) x = from_float<S>(d(rng));
  return v;
}

template <typename S>
std::vector<double> widen(const std::vector<S>& v) {
  std::vector<double> w(v.size());
  for (size_t i = 0; i < v.size(); ++i) w[i] = as_float(v[i]);
  return w;
}

template <typename S>
std::vector<S> poisoned(int64_t n) {
  return std::vector<S>(n, from_float<S>(std::nanf("")));
}

// What the step-loop cases exercised, so that a change of the planner cannot quietly leave a
// feature untested.
struct Coverage {
  bool several_ctas = false, short_last_cta = false, several_slices = false, several_batch_tiles = false,
       several_m_tiles = false, several_launches = false;

  void add(const Layout& l, int64_t batch) {
    several_ctas |= l.ctas > 1;
    short_last_cta |= unit_count(l, l.ctas - 1) < l.units_per_cta;
    several_slices |= l.k_slices > 1;
    several_batch_tiles |= batch > l.batch_tile;
    several_m_tiles |= l.math == Math::kMma && l.rows_pad > 16;
  }
};
Coverage fma_coverage, mma_coverage;

Coverage& coverage(Math math) { return math == Math::kMma ? mma_coverage : fma_coverage; }

struct DoubleIO {
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};

template <typename S>
void compare(const std::vector<S>& actual, const std::vector<double>& expected, double tol, const std::string& what) {
  double worst = 0.0, scale = 1.0;
  for (double e : expected) scale = std::max(scale, std::fabs(e));
  bool finite = true;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double a = as_float(actual[i]);
    finite &= std::isfinite(a) == std::isfinite(expected[i]);
    if (std::isfinite(a) && std::isfinite(expected[i])) worst = std::max(worst, std::fabs(a - expected[i]) / scale);
  }
  EXPECT(finite && worst <= tol, what + ": max error " + std::to_string(worst) + (finite ? "" : " (NaN: unwritten)"));
}

struct Case {
  int64_t hidden, state_rows;
  std::vector<int64_t> batch;  // per time step
  bool reverse;                // the layer's direction
  int64_t max_ctas, smem_limit;
  int64_t chunk_steps;         // steps per chunk (layer.h's chunks)
};

std::string describe(const char* cell, const char* type, const Case& c) {
  return std::string(cell) + " " + type + " H" + str(c.hidden) + " B" + str(c.state_rows) + " T" + str(c.batch.size()) +
         (c.reverse ? " reverse" : "") + " ctas<=" + str(c.max_ctas) + " smem " + str(c.smem_limit) + " chunk " +
         str(c.chunk_steps);
}

template <class Cell, typename S>
void check_forward(const Case& c, bool relu, bool save, const std::string& name) {
  std::mt19937 rng(11);
  const int64_t H = c.hidden, B = c.state_rows, G = Cell::kGates;
  const Sequence s = make_sequence(c.batch);
  const int64_t T = s.batch.size(), width = std::max<int64_t>(Cell::reserve_width(H, false), G * H);
  const Math math = std::is_same_v<S, Bf16> ? Math::kMma : Math::kFma;
  const Layout l = plan_layout(forward_pass(G, H, sizeof(S), math), B, c.max_ctas, c.smem_limit);
  if (l.verdict != Verdict::kFits) {
    EXPECT(false, name + ": does not fit");
    return;
  }
  coverage(math).add(l, B);
  const float w_scale = 1.5f / std::sqrt(float(H));
  std::vector<S> w = random_values<S>(rng, G * H * H, -w_scale, w_scale), gates = random_values<S>(rng, s.rows * width);
  std::vector<S> h = random_values<S>(rng, B * H), cs = random_values<S>(rng, B * H), bias_hn = random_values<S>(rng, H);
  std::vector<S> h_other = poisoned<S>(B * H), hidden_gates = poisoned<S>(B * G * H), output = poisoned<S>(s.rows * H);
  // The reference: layer.h's loop, stepwise, in float64.
  std::vector<double> rw = widen(w), rg = widen(gates), rh = widen(h), rc = widen(cs), rb = widen(bias_hn);
  std::vector<double> rhg(B * G * H), rout(s.rows * H, std::nan(""));
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = c.reverse ? T - 1 - k : k, row = s.offset[t];
    for (int64_t b = 0; b < s.batch[t]; ++b)
      for (int64_t q = 0; q < G * H; ++q) {
        double sum = 0.0;
        for (int64_t kk = 0; kk < H; ++kk) sum += rw[q * H + kk] * rh[b * H + kk];
        if (Cell::kSeparateHiddenGates) rhg[b * G * H + q] = sum;
        else rg[(row + b) * width + q] += sum;
      }
    StepForward<double> a{rg.data() + row * width, width, rhg.data(), rb.data(), rh.data(), rc.data(),
                          rout.data() + row * H, H, nullptr, H, relu, false, save};
    for (int64_t b = 0; b < s.batch[t]; ++b)
      for (int64_t j = 0; j < H; ++j) Cell::template forward<double, DoubleIO>(a, b, j);
  }
  // The persistent kernels, chunk by chunk as layer.h calls them.
  Emulator emulator;
  for (auto* buffer : {&w, &gates, &h, &cs, &bias_hn, &h_other, &hidden_gates, &output})
    emulator.add_region(buffer->data(), buffer->size() * sizeof(S), "global");
  for (int64_t k0 = 0; k0 < T; k0 += c.chunk_steps) {
    const Chunk chunk = make_chunk(s, k0, std::min(T, k0 + c.chunk_steps), c.reverse);
    ForwardArgs<S> args{};
    args.step = {gates.data() + chunk.row_lo * width, width, hidden_gates.data(), bias_hn.data(), nullptr, cs.data(),
                 output.data() + chunk.row_lo * H, H, nullptr, H, relu, false, save};
    args.hidden_gates = hidden_gates.data();
    args.w_hh = w.data();
    args.state_rows = B;
    args.layout = l;
    run_forward_chunk(
        args, chunk.batch.data(), chunk.row.data(), int64_t(chunk.batch.size()), c.reverse, h.data(), h_other.data(),
        [&](S* dst, const S* src) { std::copy(src, src + B * H, dst); },
        [&](const ForwardArgs<S>& launch) {
          coverage(math).several_launches |= schedule_steps(launch.schedule) < int64_t(chunk.batch.size());
          emulate(emulator, l, [&](EmuExec& x) { forward_steps<Cell, S>(x, launch); });
        });
  }
  const double tol = std::is_same_v<S, Bf16> ? 3e-2 : 2e-5;
  compare(output, rout, tol, name + ": output");
  compare(h, rh, tol, name + ": h_n");
  if (Cell::kHasCell) compare(cs, rc, tol, name + ": c_n");
  if (save && Cell::reserve_width(H, false) > 0) {
    // What the backward pass reads: LSTM's activations and c, GRU's gates and W_hn h + b_hn.
    std::vector<S> kept(s.rows * Cell::reserve_width(H, false));
    std::vector<double> expected(kept.size());
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t q = 0; q < Cell::reserve_width(H, false); ++q) {
        kept[r * Cell::reserve_width(H, false) + q] = gates[r * width + q];
        expected[r * Cell::reserve_width(H, false) + q] = rg[r * width + q];
      }
    compare(kept, expected, tol, name + ": reserve");
  }
}

template <class Cell, typename S>
void check_backward(const Case& c, bool relu, bool hx_grad, const std::string& name) {
  std::mt19937 rng(13);
  const int64_t H = c.hidden, B = c.state_rows, G = Cell::kGates, R = Cell::reserve_width(H, false);
  const Sequence s = make_sequence(c.batch);
  const int64_t T = s.batch.size();
  const Math math = std::is_same_v<S, Bf16> ? Math::kMma : Math::kFma;
  const Layout l = plan_layout(backward_pass(G, H, sizeof(S), math), B, c.max_ctas, c.smem_limit);
  if (l.verdict != Verdict::kFits) {
    EXPECT(false, name + ": does not fit");
    return;
  }
  coverage(math).add(l, B);
  const float w_scale = 1.5f / std::sqrt(float(H));
  // Any values will do for what forward saved: both sides read the same.
  std::vector<S> w = random_values<S>(rng, G * H * H, -w_scale, w_scale);
  std::vector<S> reserve = random_values<S>(rng, std::max<int64_t>(1, s.rows * R), 0.05f, 0.95f);
  std::vector<S> output = random_values<S>(rng, s.rows * H), h_prev = random_values<S>(rng, s.rows * H);
  std::vector<S> c_prev = random_values<S>(rng, s.rows * H), grad_out = random_values<S>(rng, s.rows * H);
  std::vector<S> grad_h = random_values<S>(rng, B * H), grad_c = random_values<S>(rng, B * H);
  std::vector<S> grad_gates = poisoned<S>(s.rows * G * H);
  std::vector<S> grad_hidden_gates = Cell::kSeparateHiddenGates ? poisoned<S>(s.rows * G * H) : std::vector<S>(1);
  const double beta = Cell::kSeparateHiddenGates ? 1.0 : 0.0;
  // The reference: layer.h's backward loop, stepwise, in float64.
  std::vector<double> rres = widen(reserve), rout = widen(output), rhp = widen(h_prev), rcp = widen(c_prev);
  std::vector<double> rgo = widen(grad_out), rgh = widen(grad_h), rgc = widen(grad_c), rw = widen(w);
  std::vector<double> rgg(s.rows * G * H, std::nan("")), rghg(Cell::kSeparateHiddenGates ? s.rows * G * H : 1);
  double* rdgh = Cell::kSeparateHiddenGates ? rghg.data() : rgg.data();
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = c.reverse ? k : T - 1 - k, row = s.offset[t];
    StepBackward<double> a{rres.data() + row * R, R, rout.data() + row * H, H, rgo.data() + row * H, H, rgh.data(),
                           rhp.data() + row * H, rcp.data() + row * H, H, rgc.data(), rgh.data(),
                           rgg.data() + row * G * H, rdgh + row * G * H, H, relu};
    for (int64_t b = 0; b < s.batch[t]; ++b)
      for (int64_t j = 0; j < H; ++j) Cell::template backward<double, DoubleIO>(a, b, j);
    if (k + 1 == T && !hx_grad) break;
    for (int64_t b = 0; b < s.batch[t]; ++b)
      for (int64_t kk = 0; kk < H; ++kk) {
        double sum = 0.0;
        for (int64_t q = 0; q < G * H; ++q) sum += rdgh[(row + b) * G * H + q] * rw[q * H + kk];
        rgh[b * H + kk] = beta * rgh[b * H + kk] + sum;
      }
  }
  Emulator emulator;
  for (auto* buffer : {&w, &reserve, &output, &h_prev, &c_prev, &grad_out, &grad_h, &grad_c, &grad_gates,
                       &grad_hidden_gates})
    emulator.add_region(buffer->data(), buffer->size() * sizeof(S), "global");
  S* dgh = Cell::kSeparateHiddenGates ? grad_hidden_gates.data() : grad_gates.data();
  for (int64_t k0 = 0; k0 < T; k0 += c.chunk_steps) {
    const int64_t k1 = std::min(T, k0 + c.chunk_steps);
    const Chunk chunk = make_chunk(s, k0, k1, !c.reverse);
    BackwardArgs<S> args{};
    const int64_t lo = chunk.row_lo;
    args.step = {R > 0 ? reserve.data() + lo * R : nullptr, R, output.data() + lo * H, H, grad_out.data() + lo * H, H,
                 grad_h.data(), h_prev.data() + lo * H, c_prev.data() + lo * H, H, grad_c.data(), grad_h.data(),
                 grad_gates.data() + lo * G * H, dgh + lo * G * H, H, relu};
    args.w_hh = w.data();
    args.grad_h_prev_beta = float(beta);
    args.last_product = hx_grad || k1 < T;
    args.layout = l;
    run_backward_chunk<Cell>(args, chunk.batch.data(), chunk.row.data(), int64_t(chunk.batch.size()), !c.reverse,
                             [&](const BackwardArgs<S>& launch) {
                               emulate(emulator, l, [&](EmuExec& x) { backward_steps<Cell, S>(x, launch); });
                             });
  }
  const double tol = std::is_same_v<S, Bf16> ? 3e-2 : 2e-5;
  compare(grad_gates, rgg, tol, name + ": gate gradients");
  if (Cell::kSeparateHiddenGates) compare(grad_hidden_gates, rghg, tol, name + ": hidden gate gradients");
  if (Cell::kHasCell) compare(grad_c, rgc, tol, name + ": dL/dc_0");
  if (hx_grad) compare(grad_h, rgh, tol, name + ": dL/dh_0");
}

std::vector<int64_t> descending(int64_t n) {
  std::vector<int64_t> batch(n);
  for (int64_t t = 0; t < n; ++t) batch[t] = n - t;
  return batch;
}

template <typename S>
void check_steps(const char* type) {
  const int64_t small = 24 << 10;  // forces batch tiles and slices on small shapes
  // Packed (batch shrinking step by step), unpacked, time reversed, chunks, one and several CTAs.
  const std::vector<Case> cases = {
      {10, 3, {3, 3, 2, 1}, false, 3, 232448, 4},
      {10, 3, {3, 3, 2, 1}, true, 3, 232448, 4},
      {17, 13, {13, 13, 13, 11, 7, 7, 2}, false, 4, small, 3},
      {17, 13, {13, 13, 13, 11, 7, 7, 2}, true, 4, small, 2},
      {33, 5, {5, 5, 5, 5, 5}, false, 2, 232448, 5},
      {5, 70, {70, 70, 64, 9}, true, 8, small, 4},
      {8, 1, {1, 1, 1}, false, 1, 232448, 1},
      // 130 batch sizes in one chunk: more runs than one launch's schedule holds.
      {3, 130, descending(130), false, 2, 232448, 130},
      {3, 130, descending(130), true, 2, 232448, 130},
  };
  for (const Case& c : cases) {
    for (bool relu : {false, true}) {
      const std::string rnn = relu ? "RNN relu" : "RNN tanh";
      check_forward<RnnCell, S>(c, relu, true, describe(rnn.c_str(), type, c) + " forward");
      check_backward<RnnCell, S>(c, relu, true, describe(rnn.c_str(), type, c) + " backward");
    }
    for (bool save : {true, false})
      check_forward<LstmCell, S>(c, false, save, describe("LSTM", type, c) + (save ? " forward" : " inference"));
    check_forward<GruCell, S>(c, false, true, describe("GRU", type, c) + " forward");
    for (bool hx_grad : {true, false}) {
      const std::string suffix = hx_grad ? " backward" : " backward without dL/dh_0";
      check_backward<LstmCell, S>(c, false, hx_grad, describe("LSTM", type, c) + suffix);
      check_backward<GruCell, S>(c, false, hx_grad, describe("GRU", type, c) + suffix);
    }
  }
}

// The plans of the targets' shapes on an H200 (132 multiprocessors, 227 KiB of shared memory a
// block): how many CTAs, units each, batch tile, k slices and shared memory, for the record.
void print_h200_plans() {
  std::printf("H200 plans (pass cell type H B: CTAs x units, batch tile, k slices, shared KiB)\n");
  const struct {
    const char* name;
    int64_t gates;
  } cells[] = {{"LSTM", 4}, {"GRU", 3}, {"RNN", 1}};
  for (bool backward : {false, true})
    for (const auto& cell : cells)
      for (Math math : {Math::kFma, Math::kMma})
        for (int64_t hidden : {256, 512, 1024})
          for (int64_t batch : {1, 16, 64}) {
            const int32_t es = math == Math::kMma ? 2 : 4;
            const Layout l = plan_layout(backward ? backward_pass(cell.gates, hidden, es, math)
                                                  : forward_pass(cell.gates, hidden, es, math),
                                         batch, 132, 232448);
            std::printf("  %s %s %s H%lld B%lld: ", backward ? "backward" : "forward", cell.name,
                        math == Math::kMma ? "half" : "float32", static_cast<long long>(hidden),
                        static_cast<long long>(batch));
            if (l.verdict != Verdict::kFits) std::printf("does not fit\n");
            else std::printf("%d x %d, %d, %d, %.0f\n", l.ctas, l.units_per_cta, l.batch_tile, l.k_slices,
                             l.smem_bytes / 1024.0);
          }
}

}  // namespace

int main() {
  print_h200_plans();
  const auto timed = [](const char* what, const std::function<void()>& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    std::printf("%s: %.1f s\n", what, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  };
  timed("fragment maps", check_fragment_maps);
  timed("layouts", check_layouts);
  timed("schedules", check_schedules);
  timed("float32 steps", [] { check_steps<float>("float32"); });
  timed("bfloat16 steps", [] { check_steps<Bf16>("bfloat16"); });
  for (const Coverage* c : {&fma_coverage, &mma_coverage}) {
    const std::string math = c == &fma_coverage ? "FMA" : "MMA";
    EXPECT(c->several_ctas && c->short_last_cta && c->several_slices && c->several_batch_tiles && c->several_launches,
           math + " step-loop cases miss a feature (CTAs, short last CTA, k slices, batch tiles, launches)");
  }
  EXPECT(mma_coverage.several_m_tiles, "MMA step-loop cases never have two m16 tiles");
  EXPECT(vector_copies > 0, "no case stages its vectors 16 bytes at a time");
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
