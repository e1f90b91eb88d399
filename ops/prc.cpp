// Router-consistency losses; the CUDA twins are in cuda/prc.cu. Both are small next to the model
// (PRC costs B*T*E*E flops per MoE layer), so on the CPU they are plain loops split over the batch. Sums that decide the value (the E x E
// correlation, per-token min/max sums) run in double, and per-image or per-token partials sum in
// a fixed order, so the result does not depend on the thread count.
#include "ops/prc.h"

#include <vector>

#include "autograd/autograd.h"
#include "engine/parallel.h"
#include "ops/dispatch.h"

namespace mv::cpu {

namespace {

// ---- PRC ----------------------------------------------------------------------------------------
//
// Reference-form diagonal, the normaliser. methods.md section 4 writes
//   D[x, e] = (E / M) sum_b p_{b,x,e} q_{b,x,e},  L_diag = mean_{x,e} (D[x,e] - 1)^2,
// with M "over all valid pairs in the batch", and the reference code (m82kada/PRC, its
// "matrix_top1_diagonal" term) does exactly that: the per-position sums over the batch are
// divided by the same count as C (its pc_cnt: the number of valid pairs in the whole batch), not
// by the count of pairs at position x and not by B; an unpaired (b, x) adds zero to the sum; the
// mean runs over all T x E cells, including positions with no valid pair at all (D = 0, a term of
// 1). We keep that: M is the batch's total pair count, the mean is over T * E. (A consequence
// worth knowing: D is about 1/T of a per-position normalisation, so this L_diag stays near 1 and
// mainly rewards larger p.q; the paper form is the default.) M = 0 gives 0, as the reference does.

struct PrcIn {
  Tensor p, q, pairs;  // contiguous
  int64_t B, T, E, M;
};

// The inputs made contiguous, the pairs checked against [-1, T) and counted.
PrcIn prc_in(const char* op, const Tensor& p, const Tensor& q, const Tensor& pairs) {
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2);
  PrcIn in{p.contiguous(), q.contiguous(), pairs.contiguous(), B, T, E, 0};
  const int64_t* pp = in.pairs.data<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) {
    MV_CHECK(pp[i] >= -1 && pp[i] < T, op, ": pairs[", i / T, ", ", i % T, "] = ", pp[i],
             " is outside [-1, ", T, ") (a view-2 token index, or -1 for none)");
    in.M += pp[i] >= 0;
  }
  return in;
}

// From C (E x E): L_off, and the paper form's L_diag.
struct PaperTerms {
  double l_diag = 0, l_off = 0;
};
PaperTerms paper_terms(const std::vector<double>& C, int64_t E) {
  double off = 0, diag = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) {
      const double c = C[size_t(i * E + j)];
      if (i != j) off += c * c;
      else diag += (c - 1) * (c - 1);
    }
  return {diag / double(E), E > 1 ? off / double(E * (E - 1)) : 0.0};
}

// G = (E / M) dL/dC (the diagonal's part only in the paper form) into g (E x E); see below.
void fill_g(const std::vector<double>& C, int64_t E, int64_t M, const ops::PrcOptions& opt,
            float* g) {
  const double scale = double(E) / double(M), wd = opt.diag_weight, wo = opt.off_weight;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j) {
      const double c = C[size_t(i * E + j)];
      if (i != j) g[i * E + j] = float(scale * (E > 1 ? wo * 2 * c / double(E * (E - 1)) : 0.0));
      else g[i * E + j] = opt.reference_diagonal ? 0.f : float(scale * wd * 2 * (c - 1) / double(E));
    }
}

struct PrcStats {
  std::vector<double> C;  // (E, E), already scaled by E / M
  std::vector<double> D;  // (T, E), reference form only, scaled by E / M
  double l_diag = 0, l_off = 0;
};

PrcStats stats_of(const PrcIn& in, bool reference) {
  const int64_t B = in.B, T = in.T, E = in.E;
  PrcStats st;
  st.C.assign(size_t(E * E), 0.0);
  if (reference) st.D.assign(size_t(T * E), 0.0);
  if (in.M == 0) return st;
  const float *pp = in.p.data<float>(), *pq = in.q.data<float>();
  const int64_t* pr = in.pairs.data<int64_t>();
  const double scale = double(E) / double(in.M);

  // C: one E x E partial per image, summed in image order.
  std::vector<double> part(size_t(B * E * E), 0.0);
  parallel_for(B, T * E * E * 2, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* c = part.data() + b * E * E;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = pr[b * T + t];
        if (s < 0) continue;
        const float *pv = pp + (b * T + t) * E, *qv = pq + (b * T + s) * E;
        for (int64_t i = 0; i < E; ++i)
          for (int64_t j = 0; j < E; ++j) c[i * E + j] += double(pv[i]) * qv[j];
      }
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < E * E; ++k) st.C[size_t(k)] += part[size_t(b * E * E + k)];
  for (double& c : st.C) c *= scale;

  const PaperTerms pt = paper_terms(st.C, E);
  st.l_off = pt.l_off;
  if (!reference) {
    st.l_diag = pt.l_diag;
    return st;
  }
  // D[t, e]: each position sums over the batch (no race: threads own positions).
  parallel_for(T, B * E * 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* d = st.D.data() + t * E;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t s = pr[b * T + t];
        if (s < 0) continue;
        const float *pv = pp + (b * T + t) * E, *qv = pq + (b * T + s) * E;
        for (int64_t e = 0; e < E; ++e) d[e] += double(pv[e]) * qv[e];
      }
      for (int64_t e = 0; e < E; ++e) d[e] *= scale;
    }
  });
  double sd = 0;
  for (double d : st.D) sd += (d - 1) * (d - 1);
  st.l_diag = sd / double(T * E);
  return st;
}

}  // namespace

// L = wd L_diag + wo L_off. With G = dL/dC (E x E) and, reference form, H = dL/dD (T x E):
//   G_ij = wo 2 C_ij / (E (E - 1))  (i != j),  G_ii = wd 2 (C_ii - 1) / E  (paper form, else 0),
//   H[t,e] = wd 2 (D[t,e] - 1) / (T E);
// for a valid pair n = (b, t) -> (b, s), C and D are bilinear in p_n, q_n with factor E / M:
//   dL/dp[b,t] = (E/M) (G q[b,s] + H[t] * q[b,s]),  dL/dq[b,s] += (E/M) (G^T p[b,t] + H[t] * p[b,t]).
// p, q: (B, T, E), pairs: (B, T) I64 -> the loss, its two terms, C, and G and H (ops::PrcOut);
// throws naming op and a pair outside [-1, T)
ops::PrcOut prc_forward(const char* op, const Tensor& p, const Tensor& q, const Tensor& pairs,
                        const ops::PrcOptions& opt) {
  const PrcIn in = prc_in(op, p, q, pairs);
  const bool ref = opt.reference_diagonal;
  const PrcStats st = stats_of(in, ref);
  const double wd = opt.diag_weight, wo = opt.off_weight;
  const int64_t T = in.T, E = in.E;
  ops::PrcOut o{Tensor::scalar(float(wd * st.l_diag + wo * st.l_off)),
                Tensor::from({float(st.l_diag), float(st.l_off)}, {2}), Tensor::empty({E, E}),
                Tensor::zeros({E, E}), ref ? Tensor::zeros({T, E}) : Tensor()};
  float *pc = o.C.data<float>(), *pg = o.G.data<float>();
  for (int64_t k = 0; k < E * E; ++k) pc[k] = float(st.C[size_t(k)]);
  if (in.M == 0) return o;  // no pairs: the loss is constant 0, and so are G and H
  fill_g(st.C, E, in.M, opt, pg);
  const double scale = double(E) / double(in.M);
  if (ref) {
    float* ph = o.H.data<float>();
    for (int64_t k = 0; k < T * E; ++k) ph[k] = float(scale * wd * 2 * (st.D[size_t(k)] - 1) / double(T * E));
  }
  return o;
}

// dloss: () -> dL/dp, dL/dq, each when asked for, from G and H of the forward
ops::PairGrads prc_backward(const Tensor& dloss, const Tensor& p, const Tensor& q, const Tensor& pairs_,
                            const Tensor& G_, const Tensor& H_, bool need_p, bool need_q) {
  const int64_t B = p.size(0), T = p.size(1), E = p.size(2);
  ops::PairGrads o{need_p ? Tensor::zeros({B, T, E}) : Tensor(), need_q ? Tensor::zeros({B, T, E}) : Tensor()};
  const double k = double(dloss.item());
  const Tensor pc = p.contiguous(), qc = q.contiguous(), pairs = pairs_.contiguous(), G = G_.contiguous();
  const float *pp = pc.data<float>(), *pq = qc.data<float>(), *pG = G.data<float>();
  const float* pH = H_.defined() ? H_.data<float>() : nullptr;
  const int64_t* pr = pairs.data<int64_t>();
  float* odp = need_p ? o.da.data<float>() : nullptr;
  float* odq = need_q ? o.db.data<float>() : nullptr;
  // Threads own images: dq rows of image b are only written from pairs of image b.
  parallel_for(B, T * E * E * 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = pr[b * T + t];
        if (s < 0) continue;
        const float *pv = pp + (b * T + t) * E, *qv = pq + (b * T + s) * E;
        const float* h = pH ? pH + t * E : nullptr;
        if (odp) {
          float* out = odp + (b * T + t) * E;
          for (int64_t i = 0; i < E; ++i) {
            double a = h ? double(h[i]) * qv[i] : 0.0;
            for (int64_t j = 0; j < E; ++j) a += double(pG[i * E + j]) * qv[j];
            out[i] = float(k * a);
          }
        }
        if (odq) {
          float* out = odq + (b * T + s) * E;
          for (int64_t j = 0; j < E; ++j) {
            double a = h ? double(h[j]) * pv[j] : 0.0;
            for (int64_t i = 0; i < E; ++i) a += double(pG[i * E + j]) * pv[i];
            out[j] += float(k * a);  // several view-1 tokens may share one view-2 token
          }
        }
      }
  });
  return o;
}

// ---- Soft Jaccard -------------------------------------------------------------------------------
// Per token J = A / U with A = sum_i min(s_i, s2_i), U = sum_i max(s_i, s2_i); loss = mean (1 - J).
// dJ/ds_i = 1/U where s_i < s2_i (s_i is in A), -A/U^2 where s_i > s2_i (s_i is in U); likewise for
// s2. Tie s_i == s2_i: min and max are not differentiable there; we give each input half of each
// one-sided derivative, (1/U - A/U^2) / 2. It is the symmetric choice (swapping s and s2 swaps
// the gradients) and it makes the gradient exactly 0 at s == s2, the loss's minimum.
// s, s2: (..., E) -> the loss and each token's A and U (ops::JaccardOut)
ops::JaccardOut soft_jaccard_forward(const Tensor& s_, const Tensor& s2_) {
  const Tensor s = s_.contiguous(), s2 = s2_.contiguous();
  const int64_t E = s.shape().back(), N = s.numel() / E;
  const float *pa = s.data<float>(), *pb = s2.data<float>();
  ops::JaccardOut o{Tensor(), Tensor::empty({N}), Tensor::empty({N})};
  float *pA = o.A.data<float>(), *pU = o.U.data<float>();
  std::vector<double> loss(static_cast<size_t>(N));
  parallel_for(N, E * 4, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double a = 0, u = 0;
      for (int64_t i = n * E; i < (n + 1) * E; ++i) {
        a += pa[i] < pb[i] ? pa[i] : pb[i];
        u += pa[i] < pb[i] ? pb[i] : pa[i];
      }
      pA[n] = float(a), pU[n] = float(u);
      loss[size_t(n)] = u != 0 ? 1 - a / u : 0.0;
    }
  });
  double total = 0;
  for (double l : loss) total += l;
  o.loss = Tensor::scalar(float(total / double(N)));
  return o;
}

// dloss: () -> the gradients to s and s2, each when asked for, from A and U of the forward
ops::PairGrads soft_jaccard_backward(const Tensor& dloss, const Tensor& s_, const Tensor& s2_, const Tensor& A,
                                     const Tensor& U, bool need_a, bool need_b) {
  const Tensor s = s_.contiguous(), s2 = s2_.contiguous();
  const int64_t E = s.shape().back(), N = s.numel() / E;
  const double k = -double(dloss.item()) / double(N);  // d(1 - J)/d. = -dJ/d., mean over N
  ops::PairGrads o{need_a ? Tensor::empty(s.shape()) : Tensor(), need_b ? Tensor::empty(s.shape()) : Tensor()};
  const float *pa = s.data<float>(), *pb = s2.data<float>(), *pA = A.data<float>(), *pU = U.data<float>();
  float* oa = need_a ? o.da.data<float>() : nullptr;
  float* ob = need_b ? o.db.data<float>() : nullptr;
  parallel_for(N, E * 4, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const double u = pU[n];
      const double in_min = u != 0 ? k / u : 0.0;                   // k * 1/U
      const double in_max = u != 0 ? -k * double(pA[n]) / (u * u) : 0.0;  // k * -A/U^2
      const double tie = 0.5 * (in_min + in_max);
      for (int64_t i = n * E; i < (n + 1) * E; ++i) {
        const double ga_i = pa[i] < pb[i] ? in_min : pa[i] > pb[i] ? in_max : tie;
        const double gb_i = pa[i] < pb[i] ? in_max : pa[i] > pb[i] ? in_min : tie;
        if (oa) oa[i] = float(ga_i);
        if (ob) ob[i] = float(gb_i);
      }
    }
  });
  return o;
}

}  // namespace mv::cpu

namespace mv::ops {

namespace {

// Shapes, dtypes and the device of PRC's inputs.
OpDevice check_prc(const char* op, const Tensor& p, const Tensor& q, const Tensor& pairs) {
  MV_CHECK(pairs.defined() && pairs.dtype() == DType::I64, op, ": pairs must be an I64 CPU tensor, got ",
           pairs.defined() ? pairs.str() : "undefined");
  const OpDevice dev = device_of(op, {&p, &q, &pairs});
  expect_f32(op, {&p, &q});
  MV_CHECK(p.ndim() == 3 && p.size(2) > 0, op, ": p ", p.str(), " must be (B, T, E) with E > 0");
  MV_CHECK(q.shape() == p.shape(), op, ": q ", q.str(), " must have p's shape ", shape_str(p.shape()), " (B, T, E)");
  const int64_t B = p.size(0), T = p.size(1);
  MV_CHECK(pairs.shape() == (Shape{B, T}), op, ": pairs ", pairs.str(), " must be (B, T) = (", B, ", ", T,
           ") for p ", p.str());
  return dev;
}

}  // namespace

std::pair<double, double> prc_terms(const Tensor& p, const Tensor& q, const Tensor& pairs, const PrcOptions& opt) {
  const PrcOut f = MV_KERNEL(prc_forward)(check_prc("prc_terms", p, q, pairs), "prc_terms", p, q, pairs, opt);
  const std::vector<float> t = f.terms.to_vector<float>();
  return {t[0], t[1]};
}

Tensor prc_matrix(const Tensor& p, const Tensor& q, const Tensor& pairs) {
  return MV_KERNEL(prc_forward)(check_prc("prc_matrix", p, q, pairs), "prc_matrix", p, q, pairs, PrcOptions{}).C;
}

Tensor prc_loss(const Tensor& p, const Tensor& q, const Tensor& pairs, const PrcOptions& opt) {
  const OpDevice dev = check_prc("prc_loss", p, q, pairs);
  const PrcOut f = MV_KERNEL(prc_forward)(dev, "prc_loss", p, q, pairs, opt);
  const bool gp = p.requires_grad(), gq = q.requires_grad();
  return autograd::record("prc_loss", f.loss, {p, q},
                          [dev, pd = p.detach(), qd = q.detach(), pairs, G = f.G, H = f.H, gp, gq](const Tensor& g) {
                            PairGrads d = MV_KERNEL(prc_backward)(dev, g, pd, qd, pairs, G, H, gp, gq);
                            return std::vector<Tensor>{d.da, d.db};
                          });
}

int64_t prc_pair_count(const Tensor& pairs) {
  const std::vector<int64_t> v = pairs.to(Device::CPU).contiguous().to_vector<int64_t>();
  int64_t m = 0;
  for (int64_t x : v) m += x >= 0;
  return m;
}

Tensor prc_loss_of_total(const Tensor& p, const Tensor& q, const Tensor& pairs, const Tensor& C_total,
                         int64_t M_total, const PrcOptions& opt, float grad_scale) {
  const char* op = "prc_loss_of_total";
  const OpDevice dev = check_prc(op, p, q, pairs);
  const int64_t E = p.size(2);
  MV_CHECK(!opt.reference_diagonal, op, ": the reference form's diagonal is per position and is "
           "not summed over batches; use the paper form");
  MV_CHECK(C_total.shape() == (Shape{E, E}) && C_total.dtype() == DType::F32 && M_total >= 0, op,
           ": C_total ", C_total.str(), " must be (", E, ", ", E, ") F32, M_total ", M_total, " >= 0");
  const std::vector<float> cf = C_total.to(Device::CPU).contiguous().to_vector<float>();
  const std::vector<double> C(cf.begin(), cf.end());
  const cpu::PaperTerms t = cpu::paper_terms(C, E);
  Tensor G = Tensor::zeros({E, E});
  if (M_total > 0) {
    cpu::fill_g(C, E, M_total, opt, G.data<float>());
    float* g = G.data<float>();
    for (int64_t k = 0; k < E * E; ++k) g[k] *= grad_scale;
  }
  const float loss = M_total > 0 ? float(opt.diag_weight * t.l_diag + opt.off_weight * t.l_off) : 0.f;
  G = G.to(p.device());
  const bool gp = p.requires_grad(), gq = q.requires_grad();
  return autograd::record("prc_loss", Tensor::scalar(loss).to(p.device()), {p, q},
                          [dev, pd = p.detach(), qd = q.detach(), pairs, G, gp, gq](const Tensor& g) {
                            PairGrads d = MV_KERNEL(prc_backward)(dev, g, pd, qd, pairs, G, Tensor(), gp, gq);
                            return std::vector<Tensor>{d.da, d.db};
                          });
}

Tensor soft_jaccard_loss(const Tensor& s, const Tensor& s2) {
  const char* op = "soft_jaccard_loss";
  const OpDevice dev = device_of(op, {&s, &s2});
  expect_f32(op, {&s, &s2});
  MV_CHECK(s.ndim() >= 1 && s.numel() > 0, op, ": s ", s.str(), " must be (..., E) and non-empty");
  MV_CHECK(s2.shape() == s.shape(), op, ": s2 ", s2.str(), " must have s's shape ", shape_str(s.shape()));
  const JaccardOut f = MV_KERNEL(soft_jaccard_forward)(dev, s, s2);
  const bool ga = s.requires_grad(), gb = s2.requires_grad();
  return autograd::record(op, f.loss, {s, s2}, [dev, sd = s.detach(), s2d = s2.detach(), A = f.A, U = f.U, ga, gb](const Tensor& g) {
    PairGrads d = MV_KERNEL(soft_jaccard_backward)(dev, g, sd, s2d, A, U, ga, gb);
    return std::vector<Tensor>{d.da, d.db};
  });
}

}  // namespace mv::ops
