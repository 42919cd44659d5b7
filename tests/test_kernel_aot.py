"""GPU code checked without a GPU: every Triton kernel compiled ahead of time for sm_80 and
sm_90 in fp16/bf16/fp32 (PTX, then a cubin from the ptxas bundled with triton).

The compile runs in a subprocess (this file as a script) without TRITON_INTERPRET, which the
suite sets and which turns jitted functions into interpreter objects; a fresh
TRITON_CACHE_DIR makes it a real compile each time. ``python tests/test_kernel_aot.py``
prints the table of docs/kernels.md: shared memory (Triton's metadata), registers and spills
(``ptxas -v`` on the PTX), tensor-core instructions in the PTX.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

TARGETS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_ATTENTION_DIMS = (64, 128, 256)
KERNELS = 3 + 2 * len(HEAD_ATTENTION_DIMS)  # row_stats, column_sums, compact, (head, quantized)_attention x dims
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_specs(dtype: str):
    """(name, jitted fn, signature, constexprs, options) per kernel, every optional feature
    on, launched as the op launches it."""
    import triton.language as tl

    from kvpolicy_kernels import compact_triton, head_attention_triton, quantized_attention_triton, score_triton

    tl_dtype = getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype])
    blocks = dict(BLOCK_Q=score_triton.BLOCK_Q, BLOCK_N=score_triton.BLOCK_N, BLOCK_D=64)
    features = dict(HAS_KEY_MASK=True, HAS_QUERY_MASK=True, HAS_SOFTCAP=True, DOT_DTYPE=tl_dtype)
    pointers = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", key_mask_ptr="*i1", query_mask_ptr="*i1",
                    sinks_ptr="*fp32", lse_ptr="*fp32", max_ptr="*fp32", scores_ptr="*fp32",
                    below_ptr="*fp32", table_ptr="*i64", v_ptr=f"*{dtype}", heads_ptr="*i64",
                    visible_ptr="*i1", out_ptr=f"*{dtype}", kcode_ptr="*u8", vcode_ptr="*u8",
                    kscale_ptr=f"*{dtype}", kzero_ptr=f"*{dtype}", vscale_ptr=f"*{dtype}", vzero_ptr=f"*{dtype}")
    floats = ("scaling", "softcap", "tau")
    column_warps = score_triton.FP32_COLUMN_SUMS_WARPS if dtype == "fp32" else 4
    specs = [("row_stats", score_triton._row_stats_kernel,
              dict(features, HAS_SINKS=True, NEED_LSE=True, **blocks), 4),
             ("column_sums", score_triton._column_sums_kernel,
              dict(features, COUNT_BELOW=True, **blocks), column_warps),
             ("compact", compact_triton._compact_kernel,
              dict(DTYPE=tl_dtype, BLOCK_R=compact_triton.BLOCK_R, BLOCK_D=64, BLOCK_DV=64), 4)]
    for head_dim in HEAD_ATTENTION_DIMS:  # common head sizes and the largest supported
        block_t = head_attention_triton.block_t(head_dim, head_dim)
        specs.append((f"head_attention_d{head_dim}", head_attention_triton._head_attention_kernel,
                      dict(HAS_SOFTCAP=True, HAS_SINKS=True, DOT_DTYPE=tl_dtype,
                           BLOCK_H=head_attention_triton.BLOCK_H, BLOCK_T=block_t,
                           BLOCK_D=head_dim, BLOCK_DV=head_dim), 4))
    for head_dim in HEAD_ATTENTION_DIMS:  # the quantized decode kernel, bits a runtime argument
        block_t, warps = quantized_attention_triton.launch(head_dim, head_dim)
        specs.append((f"quantized_attention_d{head_dim}", quantized_attention_triton._quantized_attention_kernel,
                      dict(HAS_SOFTCAP=True, HAS_SINKS=True, DOT_DTYPE=tl_dtype,
                           BLOCK_H=quantized_attention_triton.BLOCK_H, BLOCK_T=block_t,
                           BLOCK_D=head_dim, BLOCK_DV=head_dim), warps))
    for name, fn, constexprs, warps in specs:
        signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "fp32" if arg in floats else "i32")
                     for arg in fn.arg_names}
        yield name, fn, signature, constexprs, dict(num_warps=warps)


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes that the bundled ptxas reports for the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(int(arch[3:5])).path, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(registers=int(re.search(r"Used (\d+) registers", out).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for capability in TARGETS:
        for dtype in DTYPES:
            for name, fn, signature, constexprs, options in kernel_specs(dtype):
                source = ASTSource(fn=fn, signature=signature,
                                   constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
                ptx = compiled.asm["ptx"]
                arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
                rows.append(dict(kernel=name, target=arch, dtype=dtype, warps=options["num_warps"],
                                 shared=compiled.metadata.shared,
                                 cubin_bytes=len(compiled.asm["cubin"]), mma=ptx.count("mma.sync.aligned"),
                                 wgmma=ptx.count("wgmma.mma_async"), **ptxas_usage(ptx, arch)))
    return rows


@pytest.mark.slow  # about 40 s of CPU (85 s wall on the shared 2-core machine)
def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    assert len(rows) == KERNELS * len(TARGETS) * len(DTYPES)
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["spill_stores"] == row["spill_loads"] == 0, row
        tensor_core = {"sm_80": row["mma"] > 0 and row["wgmma"] == 0, "sm_90a": row["wgmma"] > 0}[row["target"]]
        if row["kernel"] == "compact" or row["dtype"] == "fp32":  # no dot / ieee fp32 dots: FMA
            assert row["mma"] == row["wgmma"] == 0, row
        elif row["kernel"].startswith(("head_attention", "quantized_attention")):  # 16-row tiles: wgmma needs 64
            assert row["mma"] > 0 and row["wgmma"] == 0, row
        else:
            assert tensor_core, row


if __name__ == "__main__":
    results = compile_all()
    if "--table" in sys.argv:
        print("| kernel | target | dtype | warps | shared bytes | registers | spill stores/loads | tensor-core instructions |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            tc = f"mma.sync x{r['mma']}" if r["mma"] else f"wgmma x{r['wgmma']}" if r["wgmma"] else "none (FMA)"
            print(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {r['warps']} | {r['shared']} | {r['registers']} "
                  f"| {r['spill_stores']}/{r['spill_loads']} | {tc} |")
    else:
        print(json.dumps(results))
