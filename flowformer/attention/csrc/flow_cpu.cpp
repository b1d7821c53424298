// Fused CPU loops for the per-token work of Flow-Attention (flowformer/attention/cpu_fused.py builds this file with
// torch.utils.cpp_extension; under backend="fused", flow.py `_NonCausalFlow` calls the non-causal loops and
// `_fused_causal_flows` the causal one).
//
// Why: in the eager forward, each flow is its own pass over a (B, H, n, d) block (feature map, a matrix-vector
// product, a reciprocal, a weighted row sum...), and every pass reads the block again. Here one loop reads each row
// from memory once and does all of a pass's per-token work while the row is in registers or in L1 (a tile of 16
// rows at a time, or one causal chunk); the GEMMs stay in BLAS. The eager passes in flow.py are the reference:
// tests/test_flow_fused.py holds the two equal.
//
// Tensors are float32 and 4-D (B, H, n, d) with any batch, head and row strides and a contiguous last dimension;
// `real` is (B, 1, n, 1) real-token weights (1 real, 0 padding) or an empty tensor for "no padding".

#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#include <optional>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
// Rows per tile: each loop first computes the tile's flows (independent dot products the core can overlap), then
// the per-row scalars, then the accumulations that depend on them.
constexpr int64_t kTile = 16;
constexpr float ones[kTile] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

struct Rows {  // strided view of a (B, H, n, d) float tensor
  float* data;
  int64_t batch, head, row;
  int64_t n, d;
  explicit Rows(const torch::Tensor& t)
      : data(t.data_ptr<float>()), batch(t.stride(0)), head(t.stride(1)), row(t.stride(2)), n(t.size(2)),
        d(t.size(3)) {}
  float* at(int64_t b, int64_t h, int64_t i) const { return data + b * batch + h * head + i * row; }
};

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == torch::kFloat32 && t.stride(3) == 1,
              name, " must be a float32 (B, H, n, d) tensor with a contiguous last dimension");
}

float real_weight(const torch::Tensor& real, int64_t b, int64_t i) {
  return real.numel() == 0 ? 1.0f : real.data_ptr<float>()[b * real.stride(0) + i * real.stride(2)];
}

// φ(x) for one chunk of a row: sigmoid, or relu(x) + 1e-6 (as flow.feature_map), times the real-token weight.
// exp_u20 is ATen's fast exp (about 20 ulp on exp itself); after 1 / (1 + e) the sigmoid is within ~1e-7 absolute
// of torch.sigmoid, far below the tolerances of the equivalence tests.
inline Vec feature(const Vec& x, bool relu, const Vec& weight) {
  if (relu) return (at::vec::maximum(x, Vec(0.0f)) + Vec(1e-6f)) * weight;
  return (Vec(1.0f) + x.neg().exp_u20()).reciprocal() * weight;
}

inline Vec load(const float* p, int64_t j, int64_t d) {
  return j + kWidth <= d ? Vec::loadu(p + j) : Vec::loadu(p + j, d - j);
}

inline void store(const Vec& v, float* p, int64_t j, int64_t d) {
  if (j + kWidth <= d) v.store(p + j); else v.store(p + j, d - j);
}

inline float lane_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 0x1)));
#else  // pairwise over the lanes
  float lanes[kWidth];
  v.store(lanes);
  for (int64_t half = kWidth / 2; half > 0; half /= 2)
    for (int64_t j = 0; j < half; ++j) lanes[j] += lanes[j + half];
  return lanes[0];
#endif
}

inline float dot(const float* x, const float* y, int64_t d) {
  Vec total(0.0f);
  for (int64_t j = 0; j < d; j += kWidth) total = at::vec::fmadd(load(x, j, d), load(y, j, d), total);
  return lane_sum(total);
}

// total += Σ_r scale[r] x_r over the rows of one tile (x_r = row(r)), one vector of columns at a time, so that the
// running sums stay in registers instead of making every row wait for the previous row's store.
template <typename RowAt>
inline void add_rows(float* total, RowAt row, const float* scale, int64_t rows, int64_t d) {
  for (int64_t j = 0; j < d; j += kWidth) {
    Vec sum = load(total, j, d);
    for (int64_t r = 0; r < rows; ++r) sum = at::vec::fmadd(load(row(r), j, d), Vec(scale[r]), sum);
    store(sum, total, j, d);
  }
}

}  // namespace

// Sink pass. mapped = φ(raw) * real, written to `mapped`; with `totals` (B, H, d) given (non-empty):
// scale_i = 1 / (mapped_i · totals + shift), the sink-side flow normaliser, written to `scale` (B, H, n).
// Returns the column sums (B, H, 2, d): row 0 Σ_i mapped_i, row 1 Σ_i scale_i mapped_i (zeros without `totals`).
torch::Tensor sink_pass(torch::Tensor raw, torch::Tensor mapped, torch::Tensor real, bool relu, torch::Tensor totals,
                        torch::Tensor shift, torch::Tensor scale) {
  check_rows(raw, "raw");
  check_rows(mapped, "mapped");
  const Rows in(raw), out(mapped);
  const int64_t batch = raw.size(0), heads = raw.size(1), n = in.n, d = in.d;
  const bool scaled = totals.numel() > 0;
  auto sums = torch::zeros({batch, heads, 2, d}, raw.options());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      float* plain = sums.data_ptr<float>() + bh * 2 * d;
      float* weighted = plain + d;
      const float* total = scaled ? totals.data_ptr<float>() + bh * d : nullptr;
      const float offset = scaled ? shift.data_ptr<float>()[bh] : 0.0f;
      float* scale_row = scaled ? scale.data_ptr<float>() + bh * n : nullptr;
      for (int64_t first = 0; first < n; first += kTile) {
        const int64_t rows = std::min(kTile, n - first);
        float flows[kTile];
        for (int64_t r = 0; r < rows; ++r) {  // φ of each row and its flow
          const float* x = in.at(b, h, first + r);
          float* y = out.at(b, h, first + r);
          const Vec weight(real_weight(real, b, first + r));
          Vec flow(0.0f);
          for (int64_t j = 0; j < d; j += kWidth) {
            const Vec value = feature(load(x, j, d), relu, weight);
            store(value, y, j, d);
            if (scaled) flow = at::vec::fmadd(value, load(total, j, d), flow);
          }
          flows[r] = scaled ? lane_sum(flow) : 0.0f;
        }
        const auto row = [&](int64_t r) { return out.at(b, h, first + r); };
        add_rows(plain, row, ones, rows, d);
        if (!scaled) continue;
        for (int64_t r = 0; r < rows; ++r) scale_row[first + r] = 1.0f / (flows[r] + offset);
        add_rows(weighted, row, scale_row + first, rows, d);
      }
    }
  });
  return sums;
}

// Source pass over rows [start, stop) of the mapped keys k (B, H, S, d), given the sink sums (B, H, 2, d) =
// [Σ q + ε, Σ s q + ε] and their ε shifts (B, H, 2). With allocation: o_j = 1 / (k_j · row0 + shift0) into
// `source_scale` (B, H, S), and ok_sum (B, H, d) += Σ_j o_j k_j. With competition: logit_j = k_j · row1 + shift1
// into `logits` (B, H, S); the unnormalised weight c_j = exp(clamp(logit_j, ±clamp) - clamp), 0 where `key_is_pad`
// (B, S) bool is set (empty: no padding), into `weights` (B, H, S); and c_j k_j into row j - start of
// `weighted_keys` (B, H, stop - start, d), the left operand of this block's share of kv = Σ_j c_j k_j v_jᵀ.
void source_pass(torch::Tensor keys, int64_t start, int64_t stop, torch::Tensor sink_sums, torch::Tensor shifts,
                 bool allocation, bool competition, double clamp, torch::Tensor key_is_pad, torch::Tensor source_scale,
                 torch::Tensor logits, torch::Tensor weights, torch::Tensor weighted_keys, torch::Tensor ok_sum) {
  check_rows(keys, "keys");
  const Rows in(keys);
  const int64_t heads = keys.size(1), length = in.n, d = in.d;
  TORCH_CHECK(0 <= start && start <= stop && stop <= length, "source_pass: bad row range");
  const float bound = static_cast<float>(clamp);
  std::optional<Rows> out;
  if (competition) {
    check_rows(weighted_keys, "weighted_keys");
    out.emplace(weighted_keys);
  }
  const bool* pad = key_is_pad.numel() ? key_is_pad.data_ptr<bool>() : nullptr;
  at::parallel_for(0, keys.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* sink = sink_sums.data_ptr<float>() + bh * 2 * d;
      const float* shift = shifts.data_ptr<float>() + bh * 2;
      float* total = ok_sum.data_ptr<float>() + bh * d;
      for (int64_t first = start; first < stop; first += kTile) {
        const int64_t rows = std::min(kTile, stop - first);
        float* o = allocation ? source_scale.data_ptr<float>() + bh * length + first : nullptr;
        float* logit = competition ? logits.data_ptr<float>() + bh * length + first : nullptr;
        float* c = competition ? weights.data_ptr<float>() + bh * length + first : nullptr;
        for (int64_t r = 0; r < rows; ++r) {  // the two flows of each key
          const float* k = in.at(b, h, first + r);
          if (allocation) o[r] = 1.0f / (dot(k, sink, d) + shift[0]);
          if (competition) logit[r] = dot(k, sink + d, d) + shift[1];
        }
        if (allocation) add_rows(total, [&](int64_t r) { return in.at(b, h, first + r); }, o, rows, d);
        if (!competition) continue;
        for (int64_t r = 0; r < rows; ++r) {
          const bool padded = pad && pad[b * key_is_pad.stride(0) + (first + r) * key_is_pad.stride(1)];
          c[r] = padded ? 0.0f : std::exp(std::min(std::max(logit[r], -bound), bound) - bound);
          const Vec weight(c[r]);
          const float* k = in.at(b, h, first + r);
          float* y = out->at(b, h, first + r - start);
          for (int64_t j = 0; j < d; j += kWidth) store(load(k, j, d) * weight, y, j, d);
        }
      }
    }
  });
}

// Output pass over rows [start, stop) of the mapped queries q (B, H, L, d), after `out` (B, H, L, dv) holds their
// products q_i kv: each output row is scaled by s_i (`sink_scale`, (B, H, L)) and, with allocation, by the gate
// α_i = sigmoid(ratio_b · (q_i · k_weighted + shift)), written to `gate` (B, H, L). `k_weighted` (B, H, d) and
// `shift` (B, H) hold Σ_j o_j k_j + ε and its ε shift; `ratio` (B) is n_sinks / n_sources; empty `k_weighted`:
// no allocation.
void output_pass(torch::Tensor queries, int64_t start, int64_t stop, torch::Tensor out, torch::Tensor sink_scale,
                 torch::Tensor k_weighted, torch::Tensor shift, torch::Tensor ratio, torch::Tensor gate) {
  check_rows(queries, "queries");
  check_rows(out, "out");
  const Rows in(queries), result(out);
  const int64_t heads = queries.size(1), length = in.n, d = in.d, dv = result.d;
  TORCH_CHECK(0 <= start && start <= stop && stop <= length && result.n == length, "output_pass: bad row range");
  const bool allocation = k_weighted.numel() > 0;
  at::parallel_for(0, queries.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* scale = sink_scale.data_ptr<float>() + bh * length;
      const float* weighted = allocation ? k_weighted.data_ptr<float>() + bh * d : nullptr;
      float* gates = allocation ? gate.data_ptr<float>() + bh * length : nullptr;
      for (int64_t first = start; first < stop; first += kTile) {
        const int64_t rows = std::min(kTile, stop - first);
        float factor[kTile];
        for (int64_t r = 0; r < rows; ++r) factor[r] = scale[first + r];
        if (allocation) {
          const float offset = shift.data_ptr<float>()[bh], times = ratio.data_ptr<float>()[b];
          for (int64_t r = 0; r < rows; ++r) {
            const float alpha = 1.0f / (1.0f + std::exp(-(dot(in.at(b, h, first + r), weighted, d) + offset) * times));
            gates[first + r] = alpha;
            factor[r] *= alpha;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* y = result.at(b, h, first + r);
          const Vec f(factor[r]);
          for (int64_t j = 0; j < dv; j += kWidth) store(load(y, j, dv) * f, y, j, dv);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Causal
// ---------------------------------------------------------------------------------------------------------------

namespace {

struct Scalars {  // strided (B, H, n) float view; a broadcast dimension has stride 0
  const float* data;
  int64_t batch, head, row;
  explicit Scalars(const torch::Tensor& t)
      : data(t.data_ptr<float>()), batch(t.stride(0)), head(t.stride(1)), row(t.stride(2)) {}
  float operator()(int64_t b, int64_t h, int64_t i) const { return data[b * batch + h * head + i * row]; }
};

constexpr float kMaskedLogit = -1e30f;  // flow.py _MASKED_LOGIT

inline double sum_of(const float* x, int64_t d) {
  double total = 0.0;
  for (int64_t j = 0; j < d; ++j) total += x[j];
  return total;
}

struct RowFlows {
  float sum, with_u, with_w;
};

// Σ_d x, x·u and x·w (0 where w is null) for one row x: the per-row numbers that a causal chunk reads against the
// running sums of the earlier chunks.
inline RowFlows row_flows(const float* x, const float* u, const float* w, int64_t d) {
  Vec total(0.0f), with_u(0.0f), with_w(0.0f);
  for (int64_t i = 0; i < d; i += kWidth) {
    const Vec value = load(x, i, d);
    total = total + value;
    with_u = at::vec::fmadd(value, load(u, i, d), with_u);
    if (w != nullptr) with_w = at::vec::fmadd(value, load(w, i, d), with_w);
  }
  return {lane_sum(total), lane_sum(with_u), w != nullptr ? lane_sum(with_w) : 0.0f};
}

}  // namespace

// The per-token flows of one causal pass (flow.py `_fused_causal_flows`; the eager block of `_causal_flow` is the
// reference), chunk by chunk for each (batch, head), while a chunk's rows and its (C, C) score block are in L1:
//   incoming I_i, its sink normaliser s_i, outgoing O_j, its source normaliser o_j, the conserved source and its
//   prefix softmax (competition), the conserved sink and the gate (allocation).
// q, k: (B, H, P, d) mapped features, P = N·C with rows >= `length` the zero tail. scores: contiguous
// (B, H, N, C, C) chunk score blocks q_a·k_b, left lower-triangular (with the diagonal) for the aggregation.
// v (B, H, P, dv): with competition, c_j v_j is written to `weighted_v` (same shape). sinks_so_far, sources_so_far:
// (B, H, P) real-token counts up to each row (broadcast strides allowed). key_is_pad: (B, P) bool, or empty.
// sums (B, H, 4, d), in and out: the running Σ k, Σ q, Σ s q, Σ o k of all earlier rows. lse (B, H), in and out:
// the log-sum-exp of the competition logits so far (-1e30: none). gate (B, H, P), out: gate_i / I_i (1 / I_i
// without allocation). Without competition `sums` row 2, `lse` and `weighted_v` are left alone; without allocation
// row 3.
void causal_flows(torch::Tensor q, torch::Tensor k, torch::Tensor scores, torch::Tensor v, torch::Tensor weighted_v,
                  torch::Tensor sinks_so_far, torch::Tensor sources_so_far, torch::Tensor key_is_pad,
                  torch::Tensor sums, torch::Tensor lse, torch::Tensor gate, int64_t length, double eps,
                  double clamp, bool competition, bool allocation) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  const Rows qs(q), ks(k), vs(v);
  const int64_t batch = q.size(0), heads = q.size(1), padded = qs.n, d = qs.d, dv = vs.d;
  TORCH_CHECK(scores.dim() == 5 && scores.is_contiguous() && scores.scalar_type() == torch::kFloat32,
              "scores must be a contiguous float32 (B, H, N, C, C) tensor");
  const int64_t n_chunks = scores.size(2), chunk = scores.size(4);
  TORCH_CHECK(scores.size(3) == chunk && n_chunks * chunk == padded && ks.n == padded && vs.n == padded,
              "causal_flows: q, k, v and scores must cover the same N·C rows");
  TORCH_CHECK(0 < length && length <= padded, "causal_flows: bad length");
  TORCH_CHECK(sums.is_contiguous() && lse.is_contiguous() && gate.is_contiguous(),
              "sums, lse and gate must be contiguous");
  std::optional<Rows> weighted;
  if (competition) {
    check_rows(weighted_v, "weighted_v");
    weighted.emplace(weighted_v);
  }
  const Scalars sinks(sinks_so_far), sources(sources_so_far);
  const bool* pad = key_is_pad.numel() ? key_is_pad.data_ptr<bool>() : nullptr;
  const float e = static_cast<float>(eps), shift = static_cast<float>(d * eps * eps);
  const float bound = static_cast<float>(clamp);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    // per chunk row: Σ_d k_b, k_b·Σq, k_b·Σsq, Σ_d q_a, q_a·Σok, I_a, s_a, upper column sums (plain, s-weighted),
    // o_b, c_b
    std::vector<float> buffer(11 * chunk);
    float* k_rows = buffer.data();
    float* k_q = k_rows + chunk;
    float* k_sq = k_q + chunk;
    float* q_rows = k_sq + chunk;
    float* q_ok = q_rows + chunk;
    float* incoming = q_ok + chunk;
    float* s = incoming + chunk;
    float* upper = s + chunk;
    float* upper_s = upper + chunk;
    float* o = upper_s + chunk;
    float* c = o + chunk;
    std::vector<float> ones_row(chunk, 1.0f);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      float* sum_k = sums.data_ptr<float>() + bh * 4 * d;
      float* sum_q = sum_k + d;
      float* sum_sq = sum_q + d;
      float* sum_ok = sum_sq + d;
      // Σ_d of the running sums: the ε terms' scalar prefixes
      double k_prefix = sum_of(sum_k, d), q_prefix = sum_of(sum_q, d);
      double sq_prefix = sum_of(sum_sq, d), ok_prefix = sum_of(sum_ok, d);
      float* lse_out = lse.data_ptr<float>() + bh;
      double denominator = competition ? std::exp(static_cast<double>(*lse_out) - clamp) : 0.0;
      float* gates = gate.data_ptr<float>() + bh * padded;
      for (int64_t n = 0; n < n_chunks; ++n) {
        const int64_t first = n * chunk;
        float* block = scores.data_ptr<float>() + (bh * n_chunks + n) * chunk * chunk;
        const auto q_row = [&](int64_t a) { return qs.at(b, h, first + a); };
        const auto k_row = [&](int64_t a) { return ks.at(b, h, first + a); };
        // keys against the sums of the earlier chunks
        for (int64_t j = 0; j < chunk; ++j) {
          const RowFlows key = row_flows(k_row(j), sum_q, competition ? sum_sq : nullptr, d);
          k_rows[j] = key.sum;
          k_q[j] = key.with_u;
          k_sq[j] = key.with_w;
        }
        // sinks: I_a = Σ_{b<=a} q_a·k_b + q_a·Σk + ε (Σ_d q_a + Σ_{j<=i} Σ_d k_j) + dε², then the upper triangle's
        // column sums for the sources, and the strict upper triangle zeroed
        std::fill(upper, upper + chunk, 0.0f);
        std::fill(upper_s, upper_s + chunk, 0.0f);
        for (int64_t a = 0; a < chunk; ++a) {
          const RowFlows query = row_flows(q_row(a), sum_k, allocation ? sum_ok : nullptr, d);
          q_rows[a] = query.sum;
          q_ok[a] = query.with_w;
          k_prefix += k_rows[a];
          float* row = block + a * chunk;
          Vec lower(0.0f);
          for (int64_t i = 0; i <= a; i += kWidth) lower = lower + load(row, i, a + 1);
          incoming[a] = lane_sum(lower) + query.with_u + e * (q_rows[a] + static_cast<float>(k_prefix)) + shift;
          s[a] = first + a < length ? sources(b, h, first + a) / incoming[a] : 0.0f;
          const Vec weight(s[a]), diagonal(static_cast<float>(a));
          for (int64_t i = (a / kWidth) * kWidth; i < chunk; i += kWidth) {
            const Vec value = load(row, i, chunk);
            const Vec column = Vec::arange(static_cast<float>(i), 1.0f);
            const Vec on_or_above = Vec::blendv(Vec(0.0f), value, column >= diagonal);
            store(load(upper, i, chunk) + on_or_above, upper, i, chunk);
            if (competition) store(at::vec::fmadd(on_or_above, weight, load(upper_s, i, chunk)), upper_s, i, chunk);
            store(Vec::blendv(value, Vec(0.0f), column > diagonal), row, i, chunk);
          }
        }
        for (int64_t tile = 0; tile < chunk; tile += kTile) {  // Σk was read above; Σq, Σsq are not read again here
          const int64_t rows = std::min(kTile, chunk - tile);
          const auto row = [&](int64_t r) { return q_row(tile + r); };
          add_rows(sum_q, row, ones_row.data(), rows, d);
          if (competition) add_rows(sum_sq, row, s + tile, rows, d);
        }
        // sources: O_j = Σ_{a<=j} q_a·k_j + k_j·Σq + ε (Σ_d k_j + Σ_{i<=j} Σ_d q_i) + dε²; the conserved source
        // with the s-weighted sums; its clamped prefix softmax, the denominator carried in float64
        for (int64_t j = 0; j < chunk; ++j) {
          const int64_t t = first + j;
          q_prefix += q_rows[j];
          const float outgoing = upper[j] + k_q[j] + e * (k_rows[j] + static_cast<float>(q_prefix)) + shift;
          o[j] = t < length ? sinks(b, h, t) / outgoing : 0.0f;
          if (!competition) continue;
          sq_prefix += static_cast<double>(s[j]) * q_rows[j];
          const float conserved =
              (upper_s[j] + k_sq[j] + e * (k_rows[j] + static_cast<float>(sq_prefix)) + shift) / sinks(b, h, t);
          const bool padded_key = pad && t < length && pad[b * key_is_pad.stride(0) + t * key_is_pad.stride(1)];
          const float logit = padded_key ? kMaskedLogit : std::min(std::max(conserved, -bound), bound);
          const float scaled = std::exp(logit - bound);
          denominator += scaled;
          const double kept = std::max(denominator, 1e-300);
          c[j] = scaled / std::max(static_cast<float>(kept), std::numeric_limits<float>::min()) * sources(b, h, t);
          if (t == length - 1) *lse_out = std::max(static_cast<float>(std::log(kept) + clamp), kMaskedLogit);
        }
        // the gates: conserved sink Î_a = (Σ_{b<=a} o_b q_a·k_b + q_a·Σok + ε (Σ_d q_a + Σ_{j<=a} o_j Σ_d k_j) + dε²)
        // / n_a, from the now lower-triangular block
        for (int64_t a = 0; a < chunk; ++a) {
          if (!allocation) {
            gates[first + a] = 1.0f / incoming[a];
            continue;
          }
          ok_prefix += static_cast<double>(o[a]) * k_rows[a];
          const float flow = dot(block + a * chunk, o, chunk) + q_ok[a];
          const float conserved =
              (flow + e * (q_rows[a] + static_cast<float>(ok_prefix)) + shift) / sources(b, h, first + a);
          gates[first + a] = 1.0f / (1.0f + std::exp(-conserved)) / incoming[a];
        }
        for (int64_t tile = 0; tile < chunk; tile += kTile) {
          const int64_t rows = std::min(kTile, chunk - tile);
          const auto row = [&](int64_t r) { return k_row(tile + r); };
          add_rows(sum_k, row, ones_row.data(), rows, d);
          if (allocation) add_rows(sum_ok, row, o + tile, rows, d);
        }
        if (!competition) continue;
        for (int64_t j = 0; j < chunk; ++j) {
          const float* x = vs.at(b, h, first + j);
          float* y = weighted->at(b, h, first + j);
          const Vec weight(c[j]);
          for (int64_t i = 0; i < dv; i += kWidth) store(load(x, i, dv) * weight, y, i, dv);
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sink_pass", &sink_pass, "feature map, sink flow normalisers and the sink sums, in one pass");
  m.def("source_pass", &source_pass, "source flows, competition weights and weighted keys, in one pass");
  m.def("output_pass", &output_pass, "allocation gates and the output rows' scaling, in one pass");
  m.def("causal_flows", &causal_flows, "the per-token flows of one causal pass, chunk by chunk");
}
