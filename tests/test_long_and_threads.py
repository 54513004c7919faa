"""Long sequences (10,000 steps: correct, no recursion limits, saved activations linear in T),
two Python threads sharing one module, bitwise run-to-run determinism on CPU, and clean errors
for dtypes the CPU kernels do not support."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import fused_rnn
from helpers import (assert_all_close, assert_all_equal, make_kind_pair, make_pair, output_tensors,
                     outputs_and_grads)

LONG_SEQUENCE_KINDS = ["GRU", "LSTM", "RNN_TANH"]
ALL_CLASSES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
LONG = 10_000


@pytest.fixture
def one_intra_op_thread():
    """Thousands of tiny per-step GEMMs run on one intra-op thread: on a small, shared machine
    waking a second OpenMP thread at every step can cost milliseconds, which would make a
    10,000-step test take minutes. The results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loosely_close(actual, expected):
    """float32 over 10,000 steps: agreement to ~1e-4 of each tensor's largest entry."""
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, atol=1e-4 * scale, rtol=1e-3, msg=lambda m, k=k: f"tensor {k}: {m}")


# ---- long sequences ---------------------------------------------------------------------------


@pytest.mark.usefixtures("one_intra_op_thread")
@pytest.mark.parametrize("kind", LONG_SEQUENCE_KINDS)
def test_ten_thousand_steps_match_torch_nn(kind):
    reference, fused = make_kind_pair(kind, 8, 8)
    x = torch.randn(LONG, 2, 8, requires_grad=True)
    expected = outputs_and_grads(lambda: reference(x), [x, *reference.parameters()])
    actual = outputs_and_grads(lambda: fused(x), [x, *fused.parameters()])
    for actual_tensors, expected_tensors in zip(actual, expected):
        assert all(t.isfinite().all() for t in actual_tensors)
        loosely_close(actual_tensors, expected_tensors)


@pytest.mark.usefixtures("one_intra_op_thread")
def test_ten_thousand_cell_steps_in_a_python_loop_backpropagate():
    """A 10,000-deep autograd graph of cell calls: backward and graph teardown must not recurse."""
    reference, fused = make_pair("LSTMCell", 8, 8)
    x = torch.randn(LONG, 2, 8, requires_grad=True)

    def final_state(cell):
        state = None
        for x_t in x.unbind(0):
            state = cell(x_t, state)
        return state

    expected = outputs_and_grads(lambda: final_state(reference), [x, *reference.parameters()])
    actual = outputs_and_grads(lambda: final_state(fused), [x, *fused.parameters()])
    for actual_tensors, expected_tensors in zip(actual, expected):
        loosely_close(actual_tensors, expected_tensors)


def saved_bytes(module, steps, batch=2):
    """Bytes of the distinct storages autograd saves for backward during one forward pass
    (the input included) over a [steps, batch, input_size] float32 input."""
    storages = {}

    def record(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(steps, batch, module.input_size, requires_grad=True)
    with saved_tensors_hooks(record, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


@pytest.mark.usefixtures("one_intra_op_thread")
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind, options", [("LSTM", {}), ("LSTM", {"proj_size": 4}), ("GRU", {}),
                                           ("RNN_TANH", {})], ids=["LSTM", "LSTM_proj", "GRU", "RNN"])
def test_saved_activations_grow_linearly_with_sequence_length(kind, options, record_property):
    reference, fused = make_kind_pair(kind, 8, 8, **options)
    sizes = [saved_bytes(fused, steps) for steps in (1000, 2000, 3000)]
    per_thousand_steps = sizes[1] - sizes[0]
    assert sizes[2] - sizes[1] == per_thousand_steps, f"saved bytes at T=1000, 2000, 3000: {sizes}"
    assert sizes[0] - per_thousand_steps < per_thousand_steps / 10, "a large T-independent part"
    fused_per_step = per_thousand_steps / 1000
    torch_per_step = (saved_bytes(reference, 2000) - saved_bytes(reference, 1000)) / 1000
    record_property("saved_bytes_per_step", fused_per_step)
    print(f"\n{kind}{options or ''} B=2 I=H=8 float32: fused_rnn saves {fused_per_step:g} bytes/step, "
          f"torch.nn {torch_per_step:g} bytes/step")


# ---- threads and determinism -------------------------------------------------------------------


def forward_and_backward(module, x):
    """Outputs and the gradients with respect to x and every parameter."""
    return outputs_and_grads(lambda: module(x), [x, *module.parameters()])


@pytest.mark.parametrize("class_name", ["LSTM", "GRU", "RNN", "LSTMCell"])
def test_two_threads_sharing_one_module_get_single_thread_results(class_name):
    torch.manual_seed(0)
    if class_name == "LSTM":
        module = fused_rnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3).double()
    else:
        module = getattr(fused_rnn, class_name)(4, 6).double()
    leading = (2,) if class_name.endswith("Cell") else (5, 2)
    inputs = [torch.randn(*leading, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    expected = [forward_and_backward(module, x) for x in inputs]

    iterations, start, failures = 25, threading.Barrier(2), []

    def worker(k):
        try:
            start.wait()
            for _ in range(iterations):
                outputs, grads = forward_and_backward(module, inputs[k])
                assert_all_close(outputs, expected[k][0], atol=1e-12, rtol=1e-12)
                assert_all_close(grads, expected[k][1], atol=1e-12, rtol=1e-12)
        except BaseException as error:  # reported from the main thread below
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]


@pytest.mark.parametrize("class_name", ["LSTM", "GRU", "RNN"])
def test_runs_are_bitwise_identical(class_name):
    torch.manual_seed(0)
    options = {"proj_size": 3} if class_name == "LSTM" else {}
    module = getattr(fused_rnn, class_name)(4, 6, num_layers=2, bidirectional=True, batch_first=True, **options)
    x = torch.randn(5, 7, 4, requires_grad=True)
    packed = lambda: torch.nn.utils.rnn.pack_padded_sequence(x, [3, 7, 1, 5, 7], batch_first=True,  # noqa: E731
                                                             enforce_sorted=False)
    for call in (lambda: module(x), lambda: module(packed())):
        first = outputs_and_grads(call, [x, *module.parameters()])
        second = outputs_and_grads(call, [x, *module.parameters()])
        assert_all_equal(first[0], second[0])
        assert_all_equal(first[1], second[1])



# A step's panel blocks are shared out between the threads, each helping with what is left of the
# others' once its own are done (for_each_panel_block): which thread runs a block varies from call
# to call, the results must not, nor differ from one thread's. B=64, I=H=256: 11 blocks of rows in
# each of 16-64 panels a step, in float32 and on bfloat16 panels.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("class_name", ["LSTM", "GRU"])
def test_steps_shared_between_threads_are_bitwise_identical(class_name, dtype):
    torch.manual_seed(0)
    module = getattr(fused_rnn, class_name)(256, 256).to(dtype)
    x = torch.randn(20, 64, 256, dtype=dtype, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            alone = output_tensors(module(x))
        torch.set_num_threads(2)
        trained = outputs_and_grads(lambda: module(x), [x, *module.parameters()])
        for _ in range(4):
            with torch.no_grad():
                assert_all_equal(output_tensors(module(x)), alone)
            again = outputs_and_grads(lambda: module(x), [x, *module.parameters()])
            assert_all_equal(again[0], trained[0])
            assert_all_equal(again[1], trained[1])
    finally:
        torch.set_num_threads(threads)

FORK_WHILE_CHURNING = """
import os, signal, sys, threading, time, warnings
import torch, fused_rnn
torch.manual_seed(0)
module = fused_rnn.GRU(256, 256)
x = torch.randn(80, 16, 256)  # an output of 1.25 MiB
with torch.no_grad():
    expected = module(x)[0]
stop = threading.Event()
def churn():
    with torch.no_grad():
        while not stop.is_set():
            module(x)
thread = threading.Thread(target=churn)
thread.start()
status = 0
for _ in range(20):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                code = 0 if torch.allclose(module(x)[0], expected, atol=1e-6, rtol=0) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("a forked child hung")
        status = 1
        break
    if os.waitstatus_to_exitcode(done[1]) != 0:
        print("a forked child failed, exit code", os.waitstatus_to_exitcode(done[1]))
        status = 1
        break
stop.set()
thread.join()
sys.exit(status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_run_while_another_thread_uses_the_block_cache():
    """fork() (as DataLoader workers do) while another thread keeps taking and freeing cached
    blocks (outputs of at least 1 MiB): each child must find the cache's lock free and its blocks
    consistent, and run the layer itself (on one intra-op thread: OpenMP's pool does not survive
    fork). In a fresh interpreter: forking marks all of a process's pages copy-on-write, which
    would show up in the page-fault counts of later tests."""
    result = subprocess.run([sys.executable, "-c", FORK_WHILE_CHURNING], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- unsupported dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_complex_dtype_raises_a_clean_error(class_name):
    """torch.nn's ATen path also runs complex layers; fused_rnn names the dtypes it supports."""
    module = getattr(fused_rnn, class_name)(3, 4).to(torch.complex64)
    x = torch.randn(2, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="float32, float64, float16 and bfloat16.*ComplexFloat"):
        module(x)


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_input_dtype_different_from_the_weights_is_named_in_the_error(class_name):
    module = getattr(fused_rnn, class_name)(3, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"(?=.*float64)(?=.*float32)"):
        module(torch.randn(2, 3, dtype=torch.float64))
