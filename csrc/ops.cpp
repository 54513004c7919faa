// Op schemas (namespace fused_rnn) and the Python module that loads them.
//
// Each *_layer op runs one direction of one layer over the whole sequence. `input` is
// [T, B, I], or packed rows [N, I] when `batch_sizes` (CPU int64, as in PackedSequence)
// is given; `reverse` runs time backwards. Outputs: output [T, B, H_out] or [N, H_out],
// the final state(s) [B, ·], and `reserve`, the saved activations the backward op reads
// (0 rows when save_reserve is false: inference, where nothing will differentiate; rnn_layer's
// has 0 columns, as its backward reads only the output). The *_layer_backward ops return the
// gradients of the layer op's inputs; with input_grad false, that of `input` is left out (an
// empty tensor), and so is its GEMM; with weight_grads false, those of the weights and biases;
// with hx_grad false, that of hx, and the GEMM of the first step's dL/dh_prev.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_rnn, m) {
  m.def("lstm_layer(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool save_reserve=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_layer(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, bool reverse, bool save_reserve=True) -> (Tensor, Tensor, Tensor)");
  m.def("rnn_layer(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, bool relu, bool reverse, bool save_reserve=True) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lstm_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, "
        "Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, "
        "Tensor reserve, bool has_bias, bool reverse, bool input_grad=True, "
        "bool weight_grads=True, bool hx_grad=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor? batch_sizes, Tensor hx, "
        "Tensor w_ih, Tensor w_hh, Tensor output, Tensor reserve, bool has_bias, bool reverse, bool input_grad=True, "
        "bool weight_grads=True, bool hx_grad=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor? batch_sizes, Tensor hx, "
        "Tensor w_ih, Tensor w_hh, Tensor output, Tensor reserve, bool has_bias, bool relu, bool reverse, "
        "bool input_grad=True, bool weight_grads=True, bool hx_grad=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifdef FUSED_RNN_WITH_CUDA
namespace fused_rnn {
std::vector<int64_t> cuda_recurrence_counts();  // cuda/backend.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn's op schemas (torch.ops.fused_rnn) and CUDA kernels; the CPU kernels are in _cpu_*";
#ifdef FUSED_RNN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_recurrence_counts", &fused_rnn::cuda_recurrence_counts,
        "[persistent launches, steps run per step] by the CUDA backend in this process");
#else
  m.attr("with_cuda") = false;
#endif
}
