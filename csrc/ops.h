// The fused_rnn ops, written once over the backend. ops.cpp declares their schemas;
// each backend registers these instantiations for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>

#include "layer.h"

namespace fused_rnn {

// Every op runs under this: the views and copies it makes of its inputs and buffers are its own
// business, so they skip the ADInplaceOrView bookkeeping (view metadata, version counters) that
// the dispatcher would otherwise do for each, as ATen's kernels do below autograd.
using OpGuard = at::AutoDispatchBelowADInplaceOrView;

inline LayerWeights weights(const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                            const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr) {
  return {w_ih.contiguous(), w_hh.contiguous(), b_ih.has_value() ? b_ih->contiguous() : Tensor(),
          b_hh.has_value() ? b_hh->contiguous() : Tensor(), w_hr.has_value() ? w_hr->contiguous() : Tensor()};
}

// Shape and dtype agreement between the layer's tensors (torch.nn-style checks with
// user-facing messages live in the Python modules; these guard direct op calls, whose kernels
// would read a tensor of another dtype with the wrong element size).
inline void check_dtypes(const Tensor& input, std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    TORCH_CHECK(!t->defined() || t->scalar_type() == input.scalar_type(), "fused_rnn: expected all tensors to be ",
                input.scalar_type(), ", got ", t->scalar_type());
}

inline void check_layer(int64_t gates, const Tensor& input, const Tensor& hx, const LayerWeights& w) {
  TORCH_CHECK(w.w_ih.dim() == 2 && w.w_hh.dim() == 2 && w.w_ih.size(0) % gates == 0 &&
                  w.w_hh.size(0) == w.w_ih.size(0),
              "fused_rnn: expected w_ih [", gates, "*hidden, input] and w_hh [", gates,
              "*hidden, hidden], got ", w.w_ih.sizes(), " and ", w.w_hh.sizes());
  const int64_t H = w.w_ih.size(0) / gates;
  TORCH_CHECK(input.size(-1) == w.w_ih.size(1), "fused_rnn: input has ", input.size(-1),
              " features, w_ih expects ", w.w_ih.size(1));
  const int64_t H_out = w.w_hr.defined() ? w.w_hr.size(0) : H;
  TORCH_CHECK(w.w_hh.size(1) == H_out, "fused_rnn: w_hh must have ", H_out, " columns, got ", w.w_hh.size(1));
  TORCH_CHECK(!w.w_hr.defined() || (w.w_hr.dim() == 2 && w.w_hr.size(1) == H),
              "fused_rnn: w_hr must be [proj_size, ", H, "], got ", w.w_hr.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(1) == H_out, "fused_rnn: hx must be [batch, ", H_out, "], got ", hx.sizes());
  check_dtypes(input, {&hx, &w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh, &w.w_hr});
  for (const Tensor* t : {&hx, &w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh, &w.w_hr})
    TORCH_CHECK(!t->defined() || t->device() == input.device(), "fused_rnn: expected all tensors on ",
                input.device(), ", got one on ", t->device());
  for (const Tensor* b : {&w.b_ih, &w.b_hh})
    TORCH_CHECK(!b->defined() || (b->dim() == 1 && b->size(0) == gates * H), "fused_rnn: bias must be [",
                gates * H, "], got ", b->sizes());
}

inline void check_batch(const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& state) {
  if (batch_sizes.has_value()) {
    const int64_t first = batch_sizes->numel() ? batch_sizes->select(0, 0).item<int64_t>() : 0;
    TORCH_CHECK(state.size(0) == first, "fused_rnn: state batch ", state.size(0),
                " does not match the packed batch size ", first);
  } else {
    TORCH_CHECK(input.dim() == 3 && state.size(0) == input.size(1), "fused_rnn: state batch ", state.size(0),
                " does not match the input batch ", input.dim() == 3 ? input.size(1) : -1);
  }
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer(const Tensor& input, const c10::optional<Tensor>& batch_sizes,
                                                      const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                                                      const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                      const c10::optional<Tensor>& b_hh,
                                                      const c10::optional<Tensor>& w_hr, bool reverse,
                                                      bool save_reserve) {
  const OpGuard guard;
  const LayerWeights w = weights(w_ih, w_hh, b_ih, b_hh, w_hr);
  check_layer(LstmCell::kGates, input, hx, w);
  check_batch(input, batch_sizes, hx);
  TORCH_CHECK(cx.dim() == 2 && cx.size(0) == hx.size(0) && cx.size(1) == w_ih.size(0) / 4,
              "fused_rnn: cx must be [", hx.size(0), ", ", w_ih.size(0) / 4, "], got ", cx.sizes());
  auto r = layer_forward<LstmCell, Backend>(input, batch_sizes, hx, cx, w, reverse, false, save_reserve);
  return {r[0], r[1], r[2], r[3]};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> gru_layer(const Tensor& input, const c10::optional<Tensor>& batch_sizes,
                                             const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                             const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                                             bool reverse, bool save_reserve) {
  const OpGuard guard;
  const LayerWeights w = weights(w_ih, w_hh, b_ih, b_hh, c10::nullopt);
  check_layer(GruCell::kGates, input, hx, w);
  check_batch(input, batch_sizes, hx);
  auto r = layer_forward<GruCell, Backend>(input, batch_sizes, hx, Tensor(), w, reverse, false, save_reserve);
  return {r[0], r[1], r[3]};
}

template <class Backend>
std::tuple<Tensor, Tensor, Tensor> rnn_layer(const Tensor& input, const c10::optional<Tensor>& batch_sizes,
                                             const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                             const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                                             bool relu, bool reverse, bool save_reserve) {
  const OpGuard guard;
  const LayerWeights w = weights(w_ih, w_hh, b_ih, b_hh, c10::nullopt);
  check_layer(RnnCell::kGates, input, hx, w);
  check_batch(input, batch_sizes, hx);
  auto r = layer_forward<RnnCell, Backend>(input, batch_sizes, hx, Tensor(), w, reverse, relu, save_reserve);
  return {r[0], r[1], r[3]};
}

using LstmGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <class Backend>
LstmGrads lstm_layer_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                              const Tensor& input, const c10::optional<Tensor>& batch_sizes, const Tensor& hx,
                              const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                              const c10::optional<Tensor>& w_hr, const Tensor& output, const Tensor& reserve,
                              bool has_bias, bool reverse, bool input_grad, bool weight_grads, bool hx_grad) {
  const OpGuard guard;
  const LayerWeights w = weights(w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr);
  check_dtypes(input, {&grad_output, &grad_hy, &grad_cy, &hx, &cx, &w.w_ih, &w.w_hh, &w.w_hr, &output, &reserve});
  auto g = layer_backward<LstmCell, Backend>(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, w, output,
                                             reserve, has_bias, reverse, false, input_grad, weight_grads, hx_grad);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

template <class Cell, class Backend>
Grads simple_layer_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input,
                            const c10::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& w_ih,
                            const Tensor& w_hh, const Tensor& output, const Tensor& reserve, bool has_bias,
                            bool relu, bool reverse, bool input_grad, bool weight_grads, bool hx_grad) {
  const OpGuard guard;
  const LayerWeights w = weights(w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt);
  check_dtypes(input, {&grad_output, &grad_hy, &hx, &w.w_ih, &w.w_hh, &output, &reserve});
  auto g = layer_backward<Cell, Backend>(grad_output, grad_hy, Tensor(), input, batch_sizes, hx, Tensor(), w,
                                         output, reserve, has_bias, reverse, relu, input_grad, weight_grads, hx_grad);
  return {g[0], g[1], g[3], g[4], g[5], g[6]};
}

template <class Backend>
Grads gru_layer_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input,
                         const c10::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& w_ih,
                         const Tensor& w_hh, const Tensor& output, const Tensor& reserve, bool has_bias,
                         bool reverse, bool input_grad, bool weight_grads, bool hx_grad) {
  return simple_layer_backward<GruCell, Backend>(grad_output, grad_hy, input, batch_sizes, hx, w_ih, w_hh, output,
                                                 reserve, has_bias, false, reverse, input_grad, weight_grads, hx_grad);
}

template <class Backend>
Grads rnn_layer_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input,
                         const c10::optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& w_ih,
                         const Tensor& w_hh, const Tensor& output, const Tensor& reserve, bool has_bias, bool relu,
                         bool reverse, bool input_grad, bool weight_grads, bool hx_grad) {
  return simple_layer_backward<RnnCell, Backend>(grad_output, grad_hy, input, batch_sizes, hx, w_ih, w_hh, output,
                                                 reserve, has_bias, relu, reverse, input_grad, weight_grads, hx_grad);
}

// Registers every op for one dispatch key (CPU, CUDA).
#define FUSED_RNN_REGISTER_BACKEND(m, Backend)                                   \
  m.impl("lstm_layer", &fused_rnn::lstm_layer<Backend>);                         \
  m.impl("gru_layer", &fused_rnn::gru_layer<Backend>);                           \
  m.impl("rnn_layer", &fused_rnn::rnn_layer<Backend>);                           \
  m.impl("lstm_layer_backward", &fused_rnn::lstm_layer_backward<Backend>);       \
  m.impl("gru_layer_backward", &fused_rnn::gru_layer_backward<Backend>);         \
  m.impl("rnn_layer_backward", &fused_rnn::rnn_layer_backward<Backend>)

}  // namespace fused_rnn
