"""The Triton store and reuse kernels (in Triton's interpreter where no GPU is present)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from attnreuse.attention.kernels import apply_map, attention_with_map
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        for b, h, nq, nk, d in [(2, 3, 70, 77, 40), (1, 2, 130, 130, 64)]:
            q = torch.randn(b, nq, h, d, dtype=dtype).transpose(1, 2)  # strided, as the processor passes it
            k, v = torch.randn(b, h, nk, d, dtype=dtype), torch.randn(b, nk, h, d, dtype=dtype).transpose(1, 2)
            out, a = attention_with_map(q, k, v, d ** -0.5)
            ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * d ** -0.5, -1)
            tol = 1e-3 if dtype == torch.float16 or DEVICE == "cuda" else 1e-6  # Triton's fp32 dot is TF32 on GPU
            assert (a.double().view(b, h, nq, nk) - ref).abs().max() < tol
            assert ((out.double() - (a.double().view(b, h, nq, nk) @ v.double()).transpose(1, 2)).abs().max()
                    < 50 * tol)
            again = apply_map(a, v, 0.5)  # the reuse kernel: A V from the kept map, scaled
            assert (again.double() - 0.5 * out.double()).abs().max() < 50 * tol
    # the processor's store path through the kernel gives the explicit path's result
    from attnreuse import Schedule, apply_attention_reuse
    from attnreuse.attention import kernel_check
    from attnreuse.bench import build_unet
    DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
    unet, inputs = build_unet("tiny-sd", DEVICE, DTYPE, 2)
    t = torch.tensor(500.0, device=DEVICE)
    results, fused = {}, []
    for name in ("attention_with_map", "apply_map"):
        op = getattr(torch.ops.attnreuse, name)
        setattr(torch.ops.attnreuse, name, lambda *a, op=op, name=name: fused.append(name) or op(*a))
    for impl in ("torch", "kernels"):
        kernel_check._PASSED.update({(kernel, DEVICE, DTYPE, d, DTYPE): True for d in (8, 16)
                                      for kernel in ("store", "reuse")})
        with torch.no_grad(), apply_attention_reuse(unet, Schedule("100"), attention="self",
                                                  kernels=impl == "kernels"):
            results[impl] = [unet(timestep=t, **inputs).sample for _ in range(3)]
    assert sorted(set(fused)) == ["apply_map", "attention_with_map"]  # the kernels served the "kernels" run
    assert len(fused) == 3 * 4  # each of the 4 self-attention layers stores once and reuses twice
    for a, b in zip(*results.values()):
        assert (a - b).abs().max() < (1e-4 if DTYPE == torch.float32 else 2e-2), (a - b).abs().max()
    print("ok")
""")


def test_store_kernel_against_softmax():
    """The Triton store kernel writes softmax(Q K^T * scale) once and returns the A V of that same A. Without a
    GPU it runs in Triton's interpreter; where Triton is not installed (CPU wheels of torch) it cannot run."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    code = KERNEL_CHECK.replace("dtype=dtype)", "dtype=dtype, device=DEVICE)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
