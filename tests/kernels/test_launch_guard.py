"""Every Triton launch runs with the tensors' device made current (issue: tensors on cuda:1 while cuda:0
is current got device-1 pointers launched on GPU 0).

Without two GPUs this is checked three ways: the source (every `kernel[grid](...)` in kernels/*.py sits
inside a `with device_guard(...)` block), the guard itself (a CUDA device gives torch.cuda.device of that
index), and each public launcher (it enters the guard with its tensors' device). With two GPUs, the
launchers run on cuda:1 while cuda:0 is current.
"""
import ast
import contextlib
import importlib
from pathlib import Path

import pytest
import torch

try:
    from maskprune import kernels
except ImportError:
    import kernels
# The modules themselves (kernels.threshold is the function of the same name).
_utils, elementwise, masked_matmul, threshold_mod = (
    importlib.import_module(f"{kernels.__name__}.{name}") for name in ("_utils", "elementwise", "masked_matmul",
                                                                       "threshold"))

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"


def _launches_outside_guard(path: Path) -> list[str]:
    """`name[grid](...)` calls not lexically inside a `with device_guard(...)` block."""
    tree = ast.parse(path.read_text())
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(item.context_expr, ast.Call)
                                     and getattr(item.context_expr.func, "id", "") == "device_guard"
                                     for item in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")
                and not guarded):
            bad.append(f"{path.name}:{node.lineno} {node.func.value.id}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return bad


def test_every_launch_is_inside_a_device_guard():
    files = sorted(KERNEL_DIR.glob("*.py"))
    launches = sum(len([n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Subscript)]) for f in files)
    assert launches >= 7  # the scan sees the launches (apply_mask, score_grad, 2 threshold, 3 GEMM)
    assert [b for f in files for b in _launches_outside_guard(f)] == []


def test_guard_makes_the_tensors_device_current():
    guard = _utils.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_utils.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_each_launcher_enters_the_guard_with_its_tensors_device(device, monkeypatch):
    seen = []

    def recording_guard(dev):
        seen.append(dev)
        return contextlib.nullcontext()

    for module in (elementwise, masked_matmul, threshold_mod):
        monkeypatch.setattr(module, "device_guard", recording_guard)
    x, w, s, g = (torch.randn(*shape, device=device) for shape in ((5, 7), (6, 7), (6, 7), (5, 6)))
    t = s.abs().median()
    calls = {
        "apply_mask": lambda: kernels.apply_mask(w, s, t),
        "score_grad": lambda: kernels.score_grad(w, w, s),
        "threshold": lambda: kernels.threshold(s, 10),
        "linear": lambda: masked_matmul.linear(x, w),
        "matmul": lambda: masked_matmul.matmul(g, w),
        "forward": lambda: kernels.masked_linear_forward(x, w, s, t),
        "grad_input": lambda: kernels.masked_linear_grad_input(g, w, s, t),
        "grad_scores": lambda: kernels.masked_linear_grad_scores(g, x, w, s),
        "grad_scores split": lambda: kernels.masked_linear_grad_scores(g, x, w, s, split_m=2),
    }
    for name, call in calls.items():
        seen.clear()
        call()
        assert seen and all(d == torch.device(device) for d in seen), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x, w, s, g = (torch.randn(*shape, device=dev) for shape in ((37, 70), (53, 70), (53, 70), (37, 53)))
    t = kernels.threshold(s, 1000)
    w_eff = w * (s.abs() >= t)
    torch.testing.assert_close(kernels.masked_linear_forward(x, w, s, t), x @ w_eff.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.masked_linear_grad_input(g, w, s, t), g @ w_eff, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.masked_linear_grad_scores(g, x, w, s), torch.sign(s) * w * (g.T @ x),
                               rtol=1e-5, atol=1e-4)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
