// The CPU caches that the backend's rules weigh its buffers against: one core's L2 and the
// last-level cache that the cores share. Read from sysfs, whose entries are the kernel's account
// of the caches the cores actually have, else from sysconf (which glibc fills from CPUID: in a VM
// that can report the whole host's L3, as on an AMD EPYC guest where sysconf says 256 MiB and sysfs
// the 32 MiB the guest's cores share); 1 MiB of L2 and no L3 where neither says. set_cache_sizes
// (fused_rnn._cpu) overrides them, so that tests take the paths of a larger layer with a small one.
// Of an L3, the rules count on at most kL3SharePerThread a thread of the intra-op pool: an L3 that
// far more cores share than the process runs on is mostly theirs (a guest of 2 cores on a large
// Xeon sees the socket's 300 MiB, which some 60 cores share, and its sysfs lists it as its own).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include <unistd.h>

namespace fused_rnn {

struct CacheSizes {
  int64_t l2, l3;
  // The cache the cores share: L3, or L2 where there is none.
  int64_t last_level() const { return l3 > 0 ? l3 : l2; }
};

// The unified cache of `level` that core 0 sees, in bytes (0 where sysfs does not list one).
inline int64_t sysfs_cache_bytes(int level) {
  for (int index = 0;; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level");
    if (!level_file) return 0;
    int cache_level = 0;
    std::string type, size;
    level_file >> cache_level;
    std::ifstream(dir + "type") >> type;
    std::ifstream(dir + "size") >> size;  // e.g. "512K", "32768K"
    if (cache_level != level || type != "Unified" || size.empty()) continue;
    const int64_t unit = size.back() == 'K' ? 1 << 10 : size.back() == 'M' ? 1 << 20 : 1;
    return std::atoll(size.c_str()) * unit;
  }
}

inline CacheSizes detected_cache_sizes() {
  static const CacheSizes sizes = [] {
    const auto read = [](int level, int sysconf_name, int64_t otherwise) {
      const int64_t from_sysfs = sysfs_cache_bytes(level);
      const long from_sysconf = sysconf(sysconf_name);
      return from_sysfs > 0 ? from_sysfs : from_sysconf > 0 ? static_cast<int64_t>(from_sysconf) : otherwise;
    };
    return CacheSizes{read(2, _SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20), read(3, _SC_LEVEL3_CACHE_SIZE, 0)};
  }();
  return sizes;
}

inline std::atomic<int64_t> l2_override{0}, l3_override{-1};  // set_cache_sizes; 0 / -1: detected

// 16 MiB a thread: all of the 32 MiB that a Zen 3 or Zen 4 core complex's 8 cores share, for 2
// threads; 32 MiB of that Xeon guest's 300, where the rules then hoist an LSTM's input projection
// from I=H=1024 and read GRU and RNN weights of 12 MiB and more in place (broadcasts), as on the
// Zen guests. (Xeon guest, 2 threads, float32, T=30-50, in-process, fastest of 3 calls, 32 MiB
// over 300: LSTM inference B=16 I=H=2048 1.50x, I=H=1024 1.09x, B=64 1.09x / 0.91x; training B=16
// 1.31x / 1.45x, B=64 1.01x / 1.12x; GRU and RNN 0.89-1.11x; and peak memory back under torch.nn's
// where the weights' layout had taken it over: GRU inference B=16 I=H=2048 101.5 MiB against
// torch.nn's 68.4.)
constexpr int64_t kL3SharePerThread = int64_t(16) << 20;

inline CacheSizes cache_sizes() {
  const CacheSizes detected = detected_cache_sizes();
  const int64_t l2 = l2_override.load(std::memory_order_relaxed), l3 = l3_override.load(std::memory_order_relaxed);
  const int64_t share = kL3SharePerThread * std::max(1, at::get_num_threads());
  return {l2 > 0 ? l2 : detected.l2, l3 >= 0 ? l3 : std::min(detected.l3, share)};
}

}  // namespace fused_rnn
