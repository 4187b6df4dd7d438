"""The kernel dispatcher: backend choice (set_backend > $MMM4REC_KERNELS > auto), the
reference on CPU, Triton under the interpreter, and the one-time-warning fallbacks.

Like every tests/test_kernels_*.py it belongs in the TRITON_INTERPRET=1 pytest process
(scripts/run_tests.sh); it also sets the variable before anything imports triton, since
Triton picks interpreter or compiler at import. Tests that need "no interpreter" set
TRITON_INTERPRET=0 for themselves (the dispatcher reads it at call time).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see above)
try:  # import it now, under the interpreter, not later inside a TRITON_INTERPRET=0 test
    import triton  # noqa: F401
except ImportError:
    pass

import inspect
import warnings

import pytest
import torch

from mmm4rec import kernels
from mmm4rec.kernels import dispatch
from mmm4rec.kernels.fourier_ref import fourier_filter_ref
from mmm4rec.kernels.ssd_ref import ssd_chunked_ref


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv("MMM4REC_KERNELS", raising=False)
    dispatch.set_backend(None)
    dispatch._warned.clear()
    yield
    dispatch.set_backend(None)
    dispatch._warned.clear()


def _ssd_args(L=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b, H, P, G, S = 2, 2, 16, 1, 16
    x = torch.randn(b, L, H, P, generator=g, dtype=dtype)
    dt = torch.randn(b, L, H, generator=g, dtype=dtype) - 1
    A = -torch.rand(H, generator=g, dtype=dtype) - 0.5
    B = torch.randn(b, L, G, S, generator=g, dtype=dtype) * 0.25
    C = torch.randn(b, L, G, S, generator=g, dtype=dtype) * 0.25
    D = torch.randn(H, generator=g, dtype=dtype)
    bias = torch.rand(H, generator=g, dtype=dtype) - 1
    return x, dt, A, B, C, D, bias


def _fourier_args(L=12, b=2, H=3):
    g = torch.Generator().manual_seed(1)
    F = L // 2 + 1

    def cl():
        return (torch.randn(F, F, generator=g) / F, torch.randn(F, generator=g) * 0.1,
                torch.randn(F, F, generator=g) / F, torch.randn(F, generator=g) * 0.1)
    return torch.randn(b, H, L, generator=g), torch.randn(b, H, L, generator=g), cl(), cl(), cl()


def _needs_interpreted_kernels():
    from mmm4rec.kernels._common import interpreter_active

    if not interpreter_active():
        pytest.skip("triton or the kernel modules were imported without TRITON_INTERPRET=1 in "
                    "this process; run the kernel tests in their own TRITON_INTERPRET=1 process "
                    "(scripts/run_tests.sh)")


def test_model_facing_signatures():
    assert list(inspect.signature(kernels.ssd).parameters) == \
        ["x", "dt", "A", "B", "C", "D", "dt_bias", "chunk_size"]
    assert inspect.signature(kernels.ssd).parameters["chunk_size"].default == 64
    assert list(inspect.signature(kernels.fourier_filter).parameters) == \
        ["d_t", "d_v", "cl_a", "cl_b", "cl_c"]
    assert kernels.set_backend is dispatch.set_backend


def test_backend_precedence(monkeypatch):
    cpu = torch.zeros(1)
    assert dispatch.get_backend() == "auto"
    assert dispatch.resolve_backend(cpu) == "reference"           # auto on CPU
    monkeypatch.setenv("MMM4REC_KERNELS", "triton")
    assert dispatch.get_backend() == "triton"
    assert dispatch.resolve_backend(cpu) == "triton"
    dispatch.set_backend("reference")                             # beats the env var
    assert dispatch.get_backend() == "reference"
    dispatch.set_backend("AUTO")
    assert dispatch.get_backend() == "auto"
    dispatch.set_backend(None)                                    # back to the env var
    assert dispatch.get_backend() == "triton"
    monkeypatch.setenv("MMM4REC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MMM4REC_KERNELS"):
        dispatch.get_backend()
    with pytest.raises(ValueError, match="set_backend"):
        dispatch.set_backend("fast")


def test_describe(monkeypatch):
    assert dispatch.describe().startswith("auto (default): ")
    monkeypatch.setenv("MMM4REC_KERNELS", "reference")
    assert dispatch.describe().startswith("reference (MMM4REC_KERNELS): PyTorch reference")
    dispatch.set_backend("triton")
    assert dispatch.describe().startswith("triton (set_backend): Triton on CUDA tensors")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cpu_runs_the_reference(backend):
    dispatch.set_backend(backend)
    args = _ssd_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = kernels.ssd(*args, chunk_size=4)
        assert torch.equal(y, dispatch._ssd_reference(*args, 4))     # the PyTorch path, exactly
        torch.testing.assert_close(y, ssd_chunked_ref(*args, chunk_size=4))
        fa = _fourier_args()
        assert torch.equal(kernels.fourier_filter(*fa), fourier_filter_ref(*fa))


def _half_activations(args, n_act, dtype):
    """The first ``n_act`` inputs (activations) in ``dtype``, parameters kept fp32: what
    autocast hands the kernels."""
    return tuple(a.to(dtype) if i < n_act else a for i, a in enumerate(args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_computes_16bit_inputs_in_fp32(dtype):
    """16-bit activations next to fp32 parameters: the reference runs in fp32 on the
    up-cast values (torch.fft takes no bf16) and returns the first input's dtype."""
    x, dt, A, B, C, D, bias = _half_activations(_ssd_args(L=9), 2, dtype)
    B, C = B.to(dtype), C.to(dtype)
    y = kernels.ssd(x, dt, A, B, C, D, bias, chunk_size=4)
    up = [t.float() for t in (x, dt, A, B, C, D, bias)]
    assert y.dtype == dtype
    assert torch.equal(y, dispatch._ssd_reference(*up, 4).to(dtype))
    torch.testing.assert_close(y, ssd_chunked_ref(*up, chunk_size=4).to(dtype))
    d_t, d_v, *cls = _fourier_args()
    d_t, d_v = d_t.to(dtype), d_v.to(dtype)
    out = kernels.fourier_filter(d_t, d_v, *cls)
    assert out.dtype == dtype
    assert torch.equal(out, fourier_filter_ref(d_t.float(), d_v.float(), *cls).to(dtype))


def test_autocast_is_off_inside_the_kernels():
    """Under CPU bf16 autocast (train.precision: bf16) both ops compute exactly what they
    compute without autocast: fp32 inputs give fp32 outputs, bit for bit."""
    args = _ssd_args(L=9)
    fa = _fourier_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.ssd(*args, chunk_size=4)
        out = kernels.fourier_filter(*fa)
        assert torch.is_autocast_enabled("cpu")
    assert y.dtype == out.dtype == torch.float32
    assert torch.equal(y, kernels.ssd(*args, chunk_size=4))
    assert torch.equal(out, kernels.fourier_filter(*fa))


def test_triton_on_cpu_without_interpreter_falls_back_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MMM4REC_KERNELS", "triton")
    args = _ssd_args()
    with pytest.warns(RuntimeWarning, match="CUDA tensors"):
        y = kernels.ssd(*args)
    assert torch.equal(y, dispatch._ssd_reference(*args, 64))     # the PyTorch path, exactly
    torch.testing.assert_close(y, ssd_chunked_ref(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # once only
        kernels.ssd(*args)


def test_triton_not_importable_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    dispatch.set_backend("triton")
    fa = _fourier_args()
    with pytest.warns(RuntimeWarning, match="not importable"):
        y = kernels.fourier_filter(*fa)
    assert torch.equal(y, fourier_filter_ref(*fa))
    dispatch.set_backend("auto")                                  # auto never warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.ssd(*_ssd_args())


def test_unsupported_shapes_fall_back(monkeypatch):
    """Outside the kernels' limits the call is served by the reference (warned once per reason);
    the limits are checked before anything is launched."""
    pytest.importorskip("triton")
    _needs_interpreted_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.set_backend("triton")
    args64 = _ssd_args(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        y = kernels.ssd(*args64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ssd_chunked_ref(*args64))
    fa = _fourier_args(L=600, b=1, H=1)
    with pytest.warns(RuntimeWarning, match="window length 600"):
        y = kernels.fourier_filter(*fa)
    torch.testing.assert_close(y, fourier_filter_ref(*fa))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.fourier_filter(*fa)
    # a caller's mistake is not an unsupported shape: it raises, whatever the backend
    x, dt, A, B, C, D, bias = _ssd_args()
    with pytest.raises(ValueError, match="A must be"):
        kernels.ssd(x, dt, A[:1], B, C, D, bias)


@pytest.mark.parametrize("how", ["set_backend", "env"])
def test_triton_backend_runs_the_kernels_under_the_interpreter(monkeypatch, how):
    pytest.importorskip("triton")
    _needs_interpreted_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if how == "env":
        monkeypatch.setenv("MMM4REC_KERNELS", "triton")
    else:
        dispatch.set_backend("triton")
    calls = []

    def spy(factory):
        def wrapped(*a, **k):
            calls.append(factory.__name__)
            return factory()(*a, **k)
        return wrapped

    monkeypatch.setattr(dispatch, "_ssd_triton", lambda f=dispatch._ssd_triton: spy(f))
    monkeypatch.setattr(dispatch, "_fourier_triton", lambda f=dispatch._fourier_triton: spy(f))
    args = _ssd_args(L=21)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = kernels.ssd(*args, chunk_size=16)
        fa = _fourier_args()
        d_f = kernels.fourier_filter(*fa)
    assert calls == ["_ssd_triton", "_fourier_triton"]
    torch.testing.assert_close(y, ssd_chunked_ref(*args, chunk_size=16), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_f, fourier_filter_ref(*fa), rtol=1e-4, atol=1e-5)


def test_mamba_loader_leaves_a_real_module_for_later_imports():
    """Loading mamba_ssm's Triton sources without its CUDA ``__init__`` once left a module
    stub without ``__spec__`` in sys.modules, so the next ``find_spec("mamba_ssm")`` (the
    next test collected in the same process) raised ValueError. Any order must work."""
    import importlib.util

    import benchmarks.kernel_checks as kt

    fn, version = kt.load_mamba_chunk_scan_combined()
    if fn is None:
        pytest.skip(version)
    assert importlib.util.find_spec("mamba_ssm") is not None
    again, version_again = kt.load_mamba_chunk_scan_combined()
    assert again is fn and version_again == version
