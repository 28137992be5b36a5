// CPU implementation of the Ulysses pack/unpack ops: one pass, each output byte written once.
//
// Work is split with at::parallel_for; inside a task every run that is contiguous in both tensors
// (a rank's query heads, consecutive KV heads, a stretch of sequence rows of one shard) is one
// copy, and zero padding one fill. Big outputs are written with non-temporal stores (see "stores"
// below). Where each head row comes from is decided by the index math in pack_index.h,
// which the CUDA kernels execute too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "pack/pack.h"
#include "pack/pack_index.h"

namespace sp_kernels {

namespace {

// About 128 KiB of output per task: amortises scheduling, yet splits one batch of one shard
// across threads (B = 1 is the common case).
int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{128} << 10) / std::max<int64_t>(1, row_bytes));
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(!t.defined() || t.device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
}

// ---- stores ----------------------------------------------------------------------------------
//
// An output of these ops is written once and next read by the all-to-all (or the attention), long
// after a buffer of many MiB has left the cache. Ordinary stores first read every destination line
// (read for ownership): 3 memory transfers per copied byte. Non-temporal ("streaming") stores
// write whole lines without reading them: 2 transfers. Measured on this CPU (bf16, 1 thread, the
// benchmark's sweep): streamed, the scattered runs of pack_qkv and unpack_out went from 0.7-1.0x to
// 1.3-1.8x of the eager chain and the long runs of pack_out/unpack_qkv gained 1.2-1.5x from 25 MB
// on; at 10 MB (a buffer that may still be in cache) streaming was 1.3-1.5x faster for unpack_out
// and within the noise for pack_out (0.85-1.5x of eager either way across re-runs). Outputs below kStreamMinBytes keep
// ordinary stores, so a small buffer stays in cache for its consumer.
// SP_KERNELS_PACK_STREAM_MIN_BYTES overrides the threshold (read once per process; a huge value
// turns streaming off).
constexpr int64_t kStreamMinBytes = int64_t{2} << 20;

int64_t stream_min_bytes() {
  static const int64_t value = [] {
    const char* env = std::getenv("SP_KERNELS_PACK_STREAM_MIN_BYTES");
    return env != nullptr && *env != '\0' ? std::max<int64_t>(0, std::atoll(env)) : kStreamMinBytes;
  }();
  return value;
}

bool use_streaming(const at::Tensor& out) {
#if defined(__SSE2__)
  return static_cast<int64_t>(out.nbytes()) >= stream_min_bytes();
#else
  (void)out;
  return false;
#endif
}

#if defined(__SSE2__)
// Whole 64-byte lines, dst 64-byte aligned, n a multiple of 64: loads as usual, non-temporal stores.
// AVX2 when the CPU has it (about 5-15% faster than 16-byte stores for a 300 MB copy on this CPU),
// else SSE2, which every x86-64 CPU has.
#if defined(__GNUC__) || defined(__clang__)
#define SP_PACK_HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) void stream_lines_avx2(uint8_t* dst, const uint8_t* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
  }
}

__attribute__((target("avx2"))) void stream_zero_avx2(uint8_t* dst, int64_t n) {
  const __m256i z = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 64) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), z);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), z);
  }
}

const bool kHaveAvx2 = [] {
  __builtin_cpu_init();  // this initializer may run before the one that sets up the CPU model
  return __builtin_cpu_supports("avx2") != 0;
}();
#endif

void stream_lines(uint8_t* dst, const uint8_t* src, int64_t n) {
#if defined(SP_PACK_HAVE_AVX2_PATH)
  if (kHaveAvx2) {
    stream_lines_avx2(dst, src, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
}

void stream_zero(uint8_t* dst, int64_t n) {
#if defined(SP_PACK_HAVE_AVX2_PATH)
  if (kHaveAvx2) {
    stream_zero_avx2(dst, n);
    return;
  }
#endif
  const __m128i z = _mm_setzero_si128();
  for (int64_t i = 0; i < n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), z);
  }
}

// Bytes from dst to the next 64-byte boundary (at most n).
inline int64_t to_line(const uint8_t* dst, int64_t n) {
  return std::min<int64_t>(n, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63));
}
#endif

// Copies n bytes; with `stream`, the 64-byte lines wholly inside the destination are written with
// non-temporal stores (the partial lines at either end with memcpy). Sources are read as usual.
inline void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && n >= 64) {
    const int64_t head = to_line(dst, n);
    std::memcpy(dst, src, static_cast<size_t>(head));
    const int64_t body = (n - head) & ~int64_t{63};
    stream_lines(dst + head, src + head, body);
    std::memcpy(dst + head + body, src + head + body, static_cast<size_t>(n - head - body));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(n));
}

inline void zero_bytes(uint8_t* dst, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && n >= 64) {
    const int64_t head = to_line(dst, n);
    std::memset(dst, 0, static_cast<size_t>(head));
    const int64_t body = (n - head) & ~int64_t{63};
    stream_zero(dst + head, body);
    std::memset(dst + head + body, 0, static_cast<size_t>(n - head - body));
    return;
  }
#endif
  (void)stream;
  std::memset(dst, 0, static_cast<size_t>(n));
}

// Non-temporal stores are weakly ordered: each task fences its own before it returns, so they are
// visible to whoever joins the parallel region (and to the caller) like ordinary stores.
inline void end_streaming(bool stream) {
#if defined(__SSE2__)
  if (stream) {
    _mm_sfence();
  }
#endif
  (void)stream;
}

}  // namespace

// Copy order: every kernel reads its source front to back (one sequential stream per task, which the
// hardware prefetchers follow). pack_qkv scatters each source row to the P ranks' chunks; unpack_out
// gathers chunk by chunk into a block of output rows; pack_out and unpack_qkv copy runs that are
// contiguous on both sides in output order. Against the destination-major order (P short reads per
// output row) this measured 1.2-2x faster for unpack_out and pack_qkv once the stores stream.

at::Tensor pack_qkv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t world_size,
                        c10::IntArrayRef kv_index) {
  check_cpu("pack_qkv", "q", q);
  check_cpu("pack_qkv", "k", k);
  check_cpu("pack_qkv", "v", v);
  PackQkvArgs args = prepare_pack_qkv(q, k, v, world_size, kv_index);
  const auto& g = args.g;
  if (args.out.numel() == 0) {
    return args.out;
  }
  const bool stream = use_streaming(args.out);
  const int64_t es = args.elem_size;
  const int64_t head_bytes = g.Du * es;
  const int64_t row_bytes = g.W * head_bytes;         // one (p, b, s) row of the send buffer
  const int64_t chunk_bytes = g.B * g.S * row_bytes;  // one rank's chunk
  const uint8_t* srcs[3] = {static_cast<const uint8_t*>(args.q.const_data_ptr()),
                            static_cast<const uint8_t*>(args.k.const_data_ptr()),
                            static_cast<const uint8_t*>(args.v.const_data_ptr())};
  auto* dst = static_cast<uint8_t*>(args.out.mutable_data_ptr());
  const KvIndexTable& kv = args.kv;
  // Every head slot of rank p's chunk maps to a source head that does not depend on the row. The
  // slots form runs of heads consecutive in their source (a rank's query heads; consecutive KV
  // heads), found once here with the shared index math at row (0, 0); a row then costs one copy per
  // run (zero fill for padding query heads) with no index arithmetic beyond a multiply-add.
  struct Run {
    int64_t dst_off;  // bytes from send row (0, b, s): rank p's chunk offset + the slot's offset
    int64_t src_off;  // unit offset of the first head in its source row
    int64_t bytes;
    bool zero;
  };
  std::vector<Run> runs[3];
  for (int64_t p = 0; p < g.P; ++p) {
    int64_t h = 0;
    while (h < g.W) {
      const auto ref = pack_qkv_source(g, kv, p, int64_t{0}, int64_t{0}, h);
      int64_t n = 1;
      while (h + n < g.W && (h < g.hq) == (h + n < g.hq)) {
        const auto next = pack_qkv_source(g, kv, p, int64_t{0}, int64_t{0}, h + n);
        const bool same = next.which == ref.which &&
                          (ref.which == kSrcZero || next.offset == ref.offset + n * g.Du);
        if (!same) {
          break;
        }
        ++n;
      }
      const int part = ref.which == kSrcZero ? kSrcQ : ref.which;
      runs[part].push_back(Run{p * chunk_bytes + h * head_bytes, ref.offset, n * head_bytes, ref.which == kSrcZero});
      h += n;
    }
  }
  const int64_t sb[3] = {g.q_sb, g.k_sb, g.v_sb};
  const int64_t ss[3] = {g.q_ss, g.k_ss, g.v_ss};
  // One sweep per source (q, then k, then v) over its rows (b, s) in memory order; each source row
  // is scattered to the P ranks' chunks right away, while it is in L1.
  for (int part = kSrcQ; part <= kSrcV; ++part) {
    const std::vector<Run>& rr = runs[part];
    if (rr.empty()) {
      continue;
    }
    int64_t written = 0;
    for (const Run& run : rr) {
      written += run.bytes;
    }
    at::parallel_for(0, g.B * g.S, grain_rows(written), [&](int64_t begin, int64_t end) {
      int64_t b = begin / g.S;
      int64_t s = begin % g.S;
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* src_row = srcs[part] + (b * sb[part] + s * ss[part]) * es;
        uint8_t* dst_row = dst + r * row_bytes;  // (p = 0, b, s); run offsets add p's chunk
        for (const Run& run : rr) {
          if (run.zero) {
            zero_bytes(dst_row + run.dst_off, run.bytes, stream);
          } else {
            copy_bytes(dst_row + run.dst_off, src_row + run.src_off * es, run.bytes, stream);
          }
        }
        if (++s == g.S) {
          s = 0;
          ++b;
        }
      }
      end_streaming(stream);
    });
  }
  return args.out;
}

at::Tensor unpack_qkv_cpu(const at::Tensor& recv, int64_t seq_len, const c10::optional<at::Tensor>& joint_q,
                          const c10::optional<at::Tensor>& joint_k, const c10::optional<at::Tensor>& joint_v,
                          bool joint_front) {
  check_cpu("unpack_qkv", "recv", recv);
  for (const auto* j : {&joint_q, &joint_k, &joint_v}) {
    if (j->has_value()) {
      check_cpu("unpack_qkv", "joint tensors", **j);
    }
  }
  UnpackQkvArgs args = prepare_unpack_qkv(recv, seq_len, joint_q, joint_k, joint_v, joint_front);
  const auto& g = args.g;
  if (args.out.numel() == 0) {
    return args.out;
  }
  const bool stream = use_streaming(args.out);
  const int64_t es = args.elem_size;
  const int64_t head_bytes = g.Du * es;
  const int64_t row_bytes = g.W * head_bytes;
  const int64_t rows = unpack_qkv_rows(g);
  const int64_t seq0 = unpack_qkv_seq0(g);
  const auto* src = static_cast<const uint8_t*>(args.recv.const_data_ptr());
  const uint8_t* joints[3] = {nullptr, nullptr, nullptr};
  if (g.J > 0) {
    joints[0] = static_cast<const uint8_t*>(args.jq.const_data_ptr());
    joints[1] = static_cast<const uint8_t*>(args.jk.const_data_ptr());
    joints[2] = static_cast<const uint8_t*>(args.jv.const_data_ptr());
  }
  auto* dst = static_cast<uint8_t*>(args.out.mutable_data_ptr());
  const int64_t slots[3] = {0, g.hq, g.hq + g.nkv};
  const int64_t widths[3] = {g.hq, g.nkv, g.nkv};
  at::parallel_for(0, g.B * rows, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    while (r < end) {
      const int64_t b = r / rows;
      const int64_t t = r % rows;
      uint8_t* out_row = dst + r * row_bytes;
      const auto ref = unpack_qkv_source(g, b, t, int64_t{0});
      if (ref.which == kSrcSeq) {
        // Rows of one shard are consecutive in recv: copy up to the shard's (or the task's) end at once.
        const int64_t i = t - seq0;
        const int64_t n = std::min({unpack_qkv_seq_run(g, i), g.S - i, end - r});
        copy_bytes(out_row, src + ref.offset * es, n * row_bytes, stream);
        r += n;
        continue;
      }
      for (int part = 0; part < 3; ++part) {
        if (widths[part] == 0) {
          continue;
        }
        const auto jr = unpack_qkv_source(g, b, t, slots[part]);
        copy_bytes(out_row + slots[part] * head_bytes, joints[jr.which] + jr.offset * es, widths[part] * head_bytes,
                   stream);
      }
      ++r;
    }
    end_streaming(stream);
  });
  return args.out;
}

at::Tensor pack_out_cpu(const at::Tensor& out_seq, const c10::optional<at::Tensor>& out_joint, int64_t world_size,
                        int64_t local_len, bool joint_front) {
  check_cpu("pack_out", "out_seq", out_seq);
  if (out_joint.has_value()) {
    check_cpu("pack_out", "out_joint", *out_joint);
  }
  PackOutArgs args = prepare_pack_out(out_seq, out_joint, world_size, local_len, joint_front);
  const auto& g = args.g;
  if (args.out.numel() == 0) {
    return args.out;
  }
  const bool stream = use_streaming(args.out);
  const int64_t es = args.elem_size;
  const int64_t row_units = g.hq * g.Du;
  const int64_t row_bytes = row_units * es;
  const int64_t rows = pack_out_rows(g);
  const int64_t seq0 = g.front ? g.J : 0;
  const int64_t j0 = g.front ? 0 : g.L;
  const auto* seq = static_cast<const uint8_t*>(args.seq.const_data_ptr());
  const auto* joint = g.J > 0 ? static_cast<const uint8_t*>(args.joint.const_data_ptr()) : nullptr;
  auto* dst = static_cast<uint8_t*>(args.out.mutable_data_ptr());
  // Output rows in order: the sources of a run of rows (a shard's sequence rows, the joint rows) are
  // consecutive too, so the source is read sequentially as well.
  at::parallel_for(0, g.P * g.B * rows, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    while (r < end) {
      const int64_t pb = r / rows;
      const int64_t t = r % rows;
      const auto ref = pack_out_row_source(g, pb / g.B, pb % g.B, t);
      uint8_t* out_row = dst + r * row_bytes;
      // Rows up to the end of this part (joint block, or the shard's sequence block) have sources
      // spaced by one stride; they form one run when that stride is the row size.
      const int64_t part_end = ref.which == kSrcJoint ? j0 + g.J : seq0 + g.L;
      int64_t n = std::min(part_end - t, end - r);
      if (ref.which == kSrcZero) {
        zero_bytes(out_row, n * row_bytes, stream);
        r += n;
        continue;
      }
      const uint8_t* base = ref.which == kSrcJoint ? joint : seq;
      const int64_t stride = ref.which == kSrcJoint ? g.j_ss : g.o_ss;
      if (ref.which == kSrcSeq) {
        n = std::min(n, g.S - (pb / g.B * g.L + t - seq0));  // the valid rows of the shard only
      }
      if (stride == row_units) {
        copy_bytes(out_row, base + ref.offset * es, n * row_bytes, stream);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          copy_bytes(out_row + i * row_bytes, base + (ref.offset + i * stride) * es, row_bytes, stream);
        }
      }
      r += n;
    }
    end_streaming(stream);
  });
  return args.out;
}

at::Tensor unpack_out_cpu(const at::Tensor& recv, int64_t heads) {
  check_cpu("unpack_out", "recv", recv);
  UnpackOutArgs args = prepare_unpack_out(recv, heads);
  const auto& g = args.g;
  if (args.out.numel() == 0) {
    return args.out;
  }
  const bool stream = use_streaming(args.out);
  const int64_t es = args.elem_size;
  const int64_t head_bytes = g.Du * es;
  const int64_t out_row_bytes = g.Hq * head_bytes;
  const int64_t rows = g.B * g.R;  // output rows; also the rows of one source chunk
  const auto* src = static_cast<const uint8_t*>(args.recv.const_data_ptr());
  auto* dst = static_cast<uint8_t*>(args.out.mutable_data_ptr());
  // Each task owns a block of output rows (b, t) and fills it chunk by chunk: chunk p's received
  // rows for the block are consecutive in recv (one sequential read stream), each one run of its
  // real heads (padding heads skipped) into the output rows at head p * hq. With one thread the
  // whole output is one block, i.e. recv is read once front to back. A destination-major loop (P
  // short reads per output row) ran at 0.7-0.8x of the eager permute-copy.
  const int64_t s_step = g.hq * head_bytes;
  at::parallel_for(0, rows, grain_rows(out_row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t p = 0; p < g.P; ++p) {
      const int64_t h0 = p * g.hq;
      const int64_t n_bytes = std::min(g.hq, g.Hq - h0) * head_bytes;
      if (n_bytes <= 0) {
        break;  // only padding heads from here on
      }
      // The index math gives the block's first source row; the next ones follow at hq heads each.
      const uint8_t* s = src + unpack_out_source(g, begin / g.R, begin % g.R, h0) * es;
      uint8_t* d = dst + begin * out_row_bytes + h0 * head_bytes;
      for (int64_t o = begin; o < end; ++o) {
        copy_bytes(d, s, n_bytes, stream);
        d += out_row_bytes;
        s += s_step;
      }
    }
    end_streaming(stream);
  });
  return args.out;
}

TORCH_LIBRARY_IMPL(sp_kernels, CPU, m) {
  m.impl("pack_qkv", &pack_qkv_cpu);
  m.impl("unpack_qkv", &unpack_qkv_cpu);
  m.impl("pack_out", &pack_out_cpu);
  m.impl("unpack_out", &unpack_out_cpu);
}

}  // namespace sp_kernels
