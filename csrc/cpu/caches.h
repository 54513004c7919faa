// The CPU caches that the backend's rules weigh its buffers against: one core's L2 and the
// last-level cache that the cores share. Read from sysfs, whose entries are the kernel's account
// of the caches the cores actually have, else from sysconf (which glibc fills from CPUID: in a VM
// that can report the whole host's L3, as on an AMD EPYC guest where sysconf says 256 MiB and sysfs
// the 32 MiB the guest's cores share); 1 MiB of L2 and no L3 where neither says. set_cache_sizes
// (fused_rnn._cpu) overrides them, so that tests take the paths of a larger layer with a small one.
#pragma once

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

inline CacheSizes cache_sizes() {
  const CacheSizes detected = detected_cache_sizes();
  const int64_t l2 = l2_override.load(std::memory_order_relaxed), l3 = l3_override.load(std::memory_order_relaxed);
  return {l2 > 0 ? l2 : detected.l2, l3 >= 0 ? l3 : detected.l3};
}

}  // namespace fused_rnn
