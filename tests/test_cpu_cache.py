"""The CPU buffer cache of the C++ kernels (csrc/cpu/buffer_pool.cpp): W ⊙ M and dS buffers freed by one
training step are reused by the next instead of going back to the OS; the tensors behave as any other."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import maskprune
from maskprune import ops

if not ops.HAS_CPP:
    print("skipped: maskprune._C is not built (the cache belongs to the C++ kernels)")
    pytestmark = pytest.mark.skip(reason="maskprune._C is not built (the cache belongs to the C++ kernels)")

MB = 1 << 20
# The in-process tests count bytes against the default capacity; a capacity set by the caller's environment
# is exercised by the subprocess tests below instead.
default_capacity = pytest.mark.skipif("MASKPRUNE_CPU_CACHE_MB" in os.environ,
                                      reason="MASKPRUNE_CPU_CACHE_MB is set in this environment")


@pytest.fixture
def empty_cache():
    gc.collect()  # pooled tensors of earlier tests held in reference cycles
    ops.release_cpu_cache()
    yield
    ops.release_cpu_cache()


def masked_weight(rows=1024, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, s = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    return w, s, ops.threshold(s, 0.3)


@default_capacity
def test_freed_masked_weight_is_kept_and_reused_with_correct_values(empty_cache):
    w, s, t = masked_weight()
    first = ops.apply_mask(w, s, t, backend="cpp")
    address = first.data_ptr()
    assert ops.cpu_cache_bytes() == 0
    del first
    assert ops.cpu_cache_bytes() == w.numel() * 4  # 2 MB float32: kept
    w2, s2, t2 = masked_weight(seed=1)
    second = ops.apply_mask(w2, s2, t2, backend="cpp")
    assert second.data_ptr() == address and ops.cpu_cache_bytes() == 0
    torch.testing.assert_close(second, w2 * (s2.abs() >= t2), rtol=0, atol=0)


@default_capacity
def test_small_buffers_bypass_the_cache(empty_cache):
    w, s, t = masked_weight(rows=64, cols=64)  # 16 KB, below the 1 MB floor
    out = ops.apply_mask(w, s, t, backend="cpp")
    del out
    assert ops.cpu_cache_bytes() == 0


@default_capacity
def test_training_steps_reuse_the_score_gradient_and_masked_weight_buffers(empty_cache):
    torch.manual_seed(0)
    layer = maskprune.MaskedLinear(1024, 512, density=0.3, backend="cpp")
    opt = torch.optim.SGD([layer.scores], lr=0.1)
    x, y = torch.randn(64, 1024), torch.randint(0, 512, (64,))
    grad_addresses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(layer(x), y).backward()
        grad_addresses.append(layer.scores.grad.data_ptr())
        opt.step()
    # Two 2 MB buffers serve every step: W ⊙ M and dS take turns (the one dS held is freed by
    # zero_grad and becomes the next W ⊙ M); the other waits in the cache.
    assert len(set(grad_addresses)) == 2
    assert ops.cpu_cache_bytes() == 1024 * 512 * 4


@default_capacity
def test_cached_tensors_resize_save_and_load_like_any_other(tmp_path, empty_cache):
    w, s, t = masked_weight()
    out = ops.apply_mask(w, s, t, backend="cpp")
    expected = out.clone()
    torch.save(out, tmp_path / "m.pt")
    torch.testing.assert_close(torch.load(tmp_path / "m.pt"), expected, rtol=0, atol=0)
    out.resize_(2048, 512)  # the storage grows through the same allocator
    assert out.shape == (2048, 512)
    torch.testing.assert_close(out[:1024], expected, rtol=0, atol=0)
    del out
    # both buffers came from and went back to the cache: the 2 MB one when the storage grew, the 4 MB one now
    assert ops.cpu_cache_bytes() == (1024 + 2048) * 512 * 4


@default_capacity
def test_release_frees_everything(empty_cache):
    w, s, t = masked_weight()
    outs = [ops.apply_mask(w, s, t, backend="cpp") for _ in range(3)]
    del outs
    assert ops.cpu_cache_bytes() == 3 * w.numel() * 4
    ops.release_cpu_cache()
    assert ops.cpu_cache_bytes() == 0


def test_backward_with_create_graph_gives_the_same_score_gradient():
    """The weight-gradient GEMM writes into a cached buffer (an out= GEMM): it must still run when the
    incoming gradient requires grad (create_graph=True)."""
    torch.manual_seed(0)
    layer = maskprune.MaskedLinear(1024, 512, density=0.3, backend="cpp")
    x = torch.randn(8, 1024, requires_grad=True)
    grads = [torch.autograd.grad(layer(x).pow(2).sum(), [layer.scores, x], create_graph=create)
             for create in (False, True)]
    for plain, with_graph in zip(*grads):
        torch.testing.assert_close(with_graph.detach(), plain, rtol=0, atol=0)


def run_with_cache_setting(value: str, first: str = "apply_mask") -> subprocess.CompletedProcess:
    """A fresh process with MASKPRUNE_CPU_CACHE_MB=value: frees a 4 MB, then a 2 MB W ⊙ M, prints what stays
    cached after each. `first` = "cpu_cache_bytes" asks the cache before any op used it."""
    code = textwrap.dedent(f"""
        import torch
        from maskprune import ops
        if {first == "cpu_cache_bytes"}:
            ops.cpu_cache_bytes()
        for rows in (1024, 512):
            w, s = torch.randn(rows, 1024), torch.randn(rows, 1024)
            out = ops.apply_mask(w, s, ops.threshold(s, 0.5), backend="cpp")
            del out
            print("cached", ops.cpu_cache_bytes())
    """)
    env = dict(os.environ, MASKPRUNE_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value, cached", [
    ("0", [0, 0]),                  # off
    ("2", [0, 2 * MB]),             # the 4 MB buffer does not fit
    ("4", [4 * MB, 2 * MB]),        # the 2 MB buffer evicts the older 4 MB one
    ("8", [4 * MB, 6 * MB]),        # both fit
])
def test_capacity_comes_from_the_environment_and_old_buffers_make_room(value, cached):
    result = run_with_cache_setting(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [w for c in cached for w in ("cached", str(c))]


@pytest.mark.parametrize("first", ["apply_mask", "cpu_cache_bytes"])
@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999999999999"])
def test_bad_capacity_is_a_python_value_error_naming_the_variable(value, first):
    result = run_with_cache_setting(value, first)
    assert result.returncode == 1, result.stderr  # a Python exception, not an abort
    assert "ValueError: MASKPRUNE_CPU_CACHE_MB must be a whole number of megabytes >= 0" in result.stderr
