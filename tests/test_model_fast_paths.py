"""The fast paths of the model layer agree with the float32 reference.

A tiny random Llama whose projections are made the way a Q4_1 GGUF is (per block
of 32: ``d*q + m``) and whose embedding is Q8_0, so the block decode path runs
the same weights as float32. Tolerances, on logits of magnitude ~1:
- block kernels vs dense matmul: 1e-5 (float32 summation order only)
- the one-call C decode step vs the torch forward over the same blocks: 1e-5
- auto decode (block weights, float16 KV) vs float32: 2e-2 (KV rounding)
- bfloat16 prefill vs float32: 0.15 (bfloat16 weights and activations)
- float32 continuation (chunked prefill, decode) vs one prefill: 1e-4
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from segcache.config import ModelConfig
from segcache.model.arch import ModelArch
from segcache.model.llama import causal_mask
from segcache.model.plan import PREFILL_ATTENTION_TOKENS, ExecPlan, Route, choose_plan
from segcache.model.quant import quantize_q8_0, recover_q4_1, to_blocks
from segcache.model.runtime import ModelRuntime

ARCH = ModelArch(vocab_size=160, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=6,
                 n_kv_heads=2, head_dim=16, max_position=512, tie_embeddings=True)


def q4_1_matrix(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """float32 [rows, cols] exactly as GGUF dequantises Q4_1 (float16 d and m)."""
    nb = cols // 32
    q = torch.randint(0, 16, (rows, nb, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # a real quantizer maps each block's min to 0 and max to 15
    d = (torch.rand(rows, nb, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-7.5 * d - torch.rand(rows, nb, 1, generator=g) * 0.002).half().float()
    return (d * q + m).reshape(rows, cols)


def q8_0_matrix(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=g).float()
    q[..., 0] = 127
    d = (torch.rand(rows, cols // 32, 1, generator=g) * 0.004 + 0.002).half().float()
    return (d * q).reshape(rows, cols)


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = ARCH
    sd = {"model.embed_tokens.weight": q8_0_matrix(a.vocab_size, a.hidden_size, g),
          "model.norm.weight": 1 + 0.1 * torch.randn(a.hidden_size, generator=g)}
    shapes = {"self_attn.q_proj": (a.q_dim, a.hidden_size), "self_attn.k_proj": (a.kv_dim, a.hidden_size),
              "self_attn.v_proj": (a.kv_dim, a.hidden_size), "self_attn.o_proj": (a.hidden_size, a.q_dim),
              "mlp.gate_proj": (a.intermediate_size, a.hidden_size),
              "mlp.up_proj": (a.intermediate_size, a.hidden_size),
              "mlp.down_proj": (a.hidden_size, a.intermediate_size)}
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(a.hidden_size, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(a.hidden_size, generator=g)
        for name, (rows, cols) in shapes.items():
            sd[p + name + ".weight"] = q4_1_matrix(rows, cols, g)
    return sd


@pytest.fixture(scope="module")
def sd():
    return state_dict()


def reference(sd) -> ModelRuntime:
    return ModelRuntime(ARCH, sd, ExecPlan.dense(torch.float32), source_digest="tiny")


def auto_plan(bf16_gemm: bool = False, arch: ModelArch = ARCH) -> ExecPlan:
    """The default plan on a CPU with the kernels (float32 prefill unless ``bf16_gemm``)."""
    return choose_plan(arch, ModelConfig(dtype="auto"), kernels=True, bf16_gemm=bf16_gemm)


def block_plan(kv_dtype: torch.dtype, c_step: bool = True, c_layers: bool = True) -> ExecPlan:
    """The float32 block plan with ``kv_dtype`` KV, with or without the one-call C step
    and the C prefill layers (without them, the torch layer over the same weights)."""
    plan = replace(auto_plan(), kv_dtype=kv_dtype)
    if not c_layers:
        plan = replace(plan, c_layers_tokens=0, independent_rows=0)
    return plan if c_step else replace(plan, c_step=False)


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, ARCH.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


# --- block formats and kernels -------------------------------------------------------------

def test_q4_1_and_q8_0_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    w4, w8 = q4_1_matrix(40, 96, g), q8_0_matrix(40, 96, g)
    b4, b8 = recover_q4_1(w4), quantize_q8_0(w8)
    assert b4 is not None and b4.kind == "q4_1" and b4.exact
    assert torch.equal(b4.dequantize(), w4)
    assert b8.exact and torch.equal(b8.dequantize(), w8)
    assert to_blocks(w8).kind == "q8_0"  # not mistaken for Q4_1


def test_dense_weights_fall_back_to_lossy_q8_0():
    w = torch.randn(16, 64)
    assert recover_q4_1(w) is None
    b = to_blocks(w)
    assert b.kind == "q8_0" and not b.exact
    step = b.d.repeat_interleave(32, 1)
    assert ((b.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    assert to_blocks(torch.randn(8, 40)) is None  # inputs not a multiple of 32


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11, 16])  # every row-group size, 8 + 3, 8 + 8
def test_block_matmul_matches_dense(kernels, rows):
    """dot_rows: outputs not a multiple of 16 (72), or the decode's batches (gemm_rows=12)."""
    g = torch.Generator().manual_seed(rows)
    for w in (q4_1_matrix(72, 128, g), q8_0_matrix(72, 128, g), q4_1_matrix(80, 128, g)):
        x = torch.randn(rows, 128, generator=g)
        got = kernels.matmul(x, to_blocks(w), gemm_rows=12)
        torch.testing.assert_close(got, x @ w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [2, 5, 13, 18, 25, 32, 100])  # the GEMM: outputs a multiple of 16
def test_block_gemm_matches_dense(kernels, rows):
    g = torch.Generator().manual_seed(rows)
    for w in (q4_1_matrix(80, 160, g), q8_0_matrix(48, 96, g)):
        x = torch.randn(rows, w.shape[1], generator=g)
        got = kernels.matmul(x, to_blocks(w))
        torch.testing.assert_close(got, x @ w.T, atol=1e-5, rtol=1e-5)


def test_block_gemm_rows_do_not_depend_on_the_call(kernels):
    """Every output of the GEMM is one FMA chain over k in order: a row gives the same
    bits whether it is computed with 1 other row or 40, at any position in the call
    (a prefill's rows: the KV of a prompt's tokens must not depend on its chunking)."""
    g = torch.Generator().manual_seed(3)
    for w in (to_blocks(q4_1_matrix(64, 128, g)), to_blocks(q8_0_matrix(32, 64, g))):
        x = torch.randn(41, w.shape[1], generator=g)
        whole = kernels.matmul(x, w)
        for a, b in ((7, 20), (22, 41), (3, 5), (30, 35)):
            assert torch.equal(kernels.matmul(x[a:b], w), whole[a:b]), (a, b)


def test_packed_panels_give_the_gemm_the_same_bits(kernels):
    """Q4_1 weights packed per panel (no transpose when dequantised) against the
    transposing dequantisation: the same values, so the same GEMM results."""
    g = torch.Generator().manual_seed(5)
    w = to_blocks(q4_1_matrix(48, 96, g))
    x = torch.randn(20, 96, generator=g)
    packed = kernels.matmul(x, w)
    plain = torch.empty(20, 48)
    p, null = kernels.ptr, kernels.ffi.NULL
    kernels.lib.q4_1_matmul(p("float *", x), 20, 96, p("uint8_t *", w.qs), p("float *", w.d),
                            p("float *", w.m), null, null, null, p("float *", plain), 48, 1, 2)
    assert torch.equal(packed, plain)
    q, d, m = w.panels()
    assert q.shape == (3, 96, 8) and d.shape == m.shape == (3, 3, 16)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [1, 7, 300])
def test_decode_attention_matches_sdpa(kernels, kv_dtype, slots):
    g = torch.Generator().manual_seed(slots)
    kv = torch.randn(2, 2, 320, 16, generator=g).to(kv_dtype)  # [K/V, Hkv, capacity, D]
    keys, values = kv[0, :, :slots], kv[1, :, :slots]
    q = torch.randn(6, 1, 16, generator=g)
    want = F.scaled_dot_product_attention(q.view(2, 3, 16), keys.float(), values.float(), scale=0.25)
    got = kernels.attend_decode(q, keys, values, 0.25)
    torch.testing.assert_close(got, want.view(6, 1, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("start", "new"), [(0, 2), (0, 40), (5, 3), (130, 7), (250, 140)])
def test_prefill_attention_matches_causal_sdpa(kernels, kv_dtype, start, new):
    """attend_prefill: new token t sees slots 0..start+t, over chunk boundaries (128 slots)."""
    g = torch.Generator().manual_seed(start + new)
    kv = torch.randn(2, 2, start + new + 9, 16, generator=g).to(kv_dtype)  # spare capacity: strided heads
    keys, values = kv[0, :, :start + new], kv[1, :, :start + new]
    q = torch.randn(6, new, 16, generator=g)
    want = F.scaled_dot_product_attention(q[None], keys.float()[None], values.float()[None],
                                          attn_mask=causal_mask(start, new, "cpu"), scale=0.25,
                                          enable_gqa=True)[0]
    got = kernels.attend_prefill(q, keys, values, start, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefill_attention_rejects_a_layout_it_cannot_read(kernels):
    q, kv = torch.randn(6, 3, 16), torch.randn(2, 2, 10, 16)
    with pytest.raises(ValueError):
        kernels.attend_prefill(q, kv[0, :, :9], kv[1, :, :9], 5, 0.25)  # 9 slots != 5 + 3
    with pytest.raises(ValueError):
        kernels.attend_prefill(q, kv[0, :, :8, :8], kv[1, :, :8, :8], 5, 0.25)  # K/V rows of 8, q of 16
    kv8 = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError):
        kernels.attend_prefill(q[..., :8], kv8[0], kv8[1], 5, 0.25)  # head_dim 8: not in tiles of 16


# --- float32 reference: continuation is exact -------------------------------------------------

def test_float32_chunked_prefill_equals_one_prefill(sd):
    rt = reference(sd)
    ids = prompt(40)
    kv_one, kv_two = rt.new_kv(64), rt.new_kv(64)
    with torch.inference_mode():
        whole = rt.prefill(ids, torch.arange(40), kv_one, 0, torch.arange(40))  # [40, vocab]
        rt.prefill(ids[:25], torch.arange(25), kv_two, 0)
        tail = rt.prefill(ids[25:], torch.arange(25, 40), kv_two, 25, torch.arange(15))
    assert (tail - whole[25:]).abs().max() < 1e-4
    assert (kv_two[:, :, :, :40] - kv_one[:, :, :, :40]).abs().max() < 1e-4


def test_float32_decode_steps_equal_prefill(sd):
    rt = reference(sd)
    ids = prompt(30)
    kv_one, kv_steps = rt.new_kv(32), rt.new_kv(32)
    with torch.inference_mode():
        whole = rt.prefill(ids, torch.arange(30), kv_one, 0, torch.arange(30))
        rt.prefill(ids[:20], torch.arange(20), kv_steps, 0)
        for t in range(20, 30):
            step = rt.decode(ids[t:t + 1], torch.tensor([t]), kv_steps, t)
            assert (step[0] - whole[t]).abs().max() < 1e-4


def test_causal_mask_with_offset():
    mask = causal_mask(3, 2)  # new tokens at slots 3 and 4
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]


# --- fast paths against the reference ---------------------------------------------------------

def test_auto_block_decode_matches_float32(sd, kernels):
    ref = reference(sd)
    plan = auto_plan()
    assert (plan.prefill_dtype, plan.decode_dtype, plan.kv_dtype) == (torch.float32, torch.float32, torch.float16)
    assert plan.decode_weights == plan.prefill_weights == "blocks"
    fast = ModelRuntime(ARCH, sd, plan, source_digest="tiny", kernels=kernels)
    assert fast.block_formats.endswith(":q4_1+q8_0:exact")
    assert fast.fingerprint != ref.fingerprint
    ids = prompt(48)
    kv_ref, kv_fast = ref.new_kv(64), fast.new_kv(64)
    assert kv_fast.dtype == torch.float16
    with torch.inference_mode():
        ref.prefill(ids[:32], torch.arange(32), kv_ref, 0)
        fast.prefill(ids[:32], torch.arange(32), kv_fast, 0)
        for t in range(32, 48):
            want = ref.decode(ids[t:t + 1], torch.tensor([t]), kv_ref, t)
            got = fast.decode(ids[t:t + 1], torch.tensor([t]), kv_fast, t)
            assert (got - want).abs().max() < 2e-2


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_fused_decode_step_matches_torch_forward(sd, kernels, kv_dtype):
    """The C step (``ModelRuntime.decode`` on the c-step route) against the torch layer
    over the same block weights (the torch-blocks route, its fallback): logits and the
    K/V it writes."""
    fast = ModelRuntime(ARCH, sd, block_plan(kv_dtype), source_digest="tiny", kernels=kernels)
    slow = ModelRuntime(ARCH, sd, block_plan(kv_dtype, c_step=False, c_layers=False),
                        source_digest="tiny", kernels=kernels)
    assert fast.fingerprint != slow.fingerprint  # other code, other KV namespace
    assert "c-step" in fast.describe() and "torch-blocks" in slow.describe()
    assert fast.plan.decode_route() is fast.plan.prefill_route(1) is Route.C_STEP
    assert slow.plan.decode_route() is slow.plan.prefill_route(1) is Route.TORCH_BLOCKS
    ids = prompt(40)
    kv_fused, kv_torch = fast.new_kv(48), fast.new_kv(48)
    with torch.inference_mode():
        fast.prefill(ids[:30], torch.arange(30), kv_fused, 0)
        kv_torch[:, :, :, :30] = kv_fused[:, :, :, :30]
        for t in range(30, 40):
            got = fast.decode(ids[t:t + 1], torch.tensor([t]), kv_fused, t)
            want = slow.decode(ids[t:t + 1], torch.tensor([t]), kv_torch, t)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        one = fast.prefill(ids[:1], torch.arange(1), fast.new_kv(4), 0)  # a 1-token prefill takes the step
        whole = slow.prefill(ids[:1], torch.arange(1), fast.new_kv(4), 0)
    torch.testing.assert_close(kv_fused[:, :, :, :40].float(), kv_torch[:, :, :, :40].float(),
                               atol=2e-3, rtol=1e-3)  # one float16 step where rounding differs
    torch.testing.assert_close(one, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("start", "new"), [(0, 2), (0, 40), (33, 7), (130, 256)])
def test_fused_prefill_layers_match_torch_layers(sd, kernels, kv_dtype, start, new):
    """Prefills of 2..256 tokens run their layers in one C call (``prefill_layers``)
    per slice (the c-layers route); against the torch layer over the same weights and
    attention (the torch-blocks route)."""
    fast = ModelRuntime(ARCH, sd, block_plan(kv_dtype), source_digest="tiny", kernels=kernels)
    slow = ModelRuntime(ARCH, sd, block_plan(kv_dtype, c_layers=False), kernels=kernels)
    assert fast.plan.prefill_route(new) is Route.C_LAYERS
    assert slow.plan.prefill_route(new) is Route.TORCH_BLOCKS
    ids = prompt(start + new, seed=new)
    kv_c, kv_torch = fast.new_kv(start + new + 2), fast.new_kv(start + new + 2)
    with torch.inference_mode():
        if start:
            fast.prefill(ids[:start], torch.arange(start), kv_c, 0)
            kv_torch[:, :, :, :start] = kv_c[:, :, :, :start]
        got = fast.prefill(ids[start:], torch.arange(start, start + new), kv_c, start, torch.arange(new))
        sliced = fast.new_kv(start + new + 2)
        sliced[:, :, :, :start] = kv_c[:, :, :, :start]
        steps = fast.prefill_steps(ids[start:], torch.arange(start, start + new), sliced, start, 1)
        done = []
        while True:
            try:
                done.append(next(steps))
            except StopIteration:
                break
        want = slow.prefill(ids[start:], torch.arange(start, start + new), kv_torch, start, torch.arange(new))
    # a layer per step, but a short prefill (a few tokens cost little) in one step
    assert done == ([] if new <= fast.plan.small_prefill_tokens else list(range(1, ARCH.n_layers)))
    end = start + new  # (slots past it are uninitialised)
    assert torch.equal(sliced[:, :, :, :end], kv_c[:, :, :, :end])  # a layer at a time: the same bits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tol = 2e-3 if kv_dtype == torch.float16 else 1e-5
    torch.testing.assert_close(kv_c[:, :, :, :end].float(), kv_torch[:, :, :, :end].float(), atol=tol, rtol=tol)


def test_fused_decode_batch_equals_single_steps(sd, kernels):
    fast = ModelRuntime(ARCH, sd, auto_plan(), source_digest="tiny", kernels=kernels)
    assert fast.plan.batch_decode_route() is Route.C_STEP
    lengths = [5, 17, 30]
    kvs_one, kvs_batch = [fast.new_kv(40) for _ in lengths], [fast.new_kv(40) for _ in lengths]
    ids = prompt(40)
    with torch.inference_mode():
        for n, a, b in zip(lengths, kvs_one, kvs_batch, strict=True):
            fast.prefill(ids[:n], torch.arange(n), a, 0)
            b.copy_(a)
        tokens = [int(ids[n]) for n in lengths]
        want = torch.cat([fast.decode(torch.tensor([t]), torch.tensor([n]), kv, n)
                          for t, n, kv in zip(tokens, lengths, kvs_one, strict=True)])
        got = fast.decode_batch(tokens, lengths, kvs_batch)
    assert torch.equal(got, want)  # batches of up to 4 rows share one arithmetic per row (dot_rows)
    for n, a, b in zip(lengths, kvs_one, kvs_batch, strict=True):
        assert torch.equal(a[:, :, :, :n + 1], b[:, :, :, :n + 1])


def test_fused_decode_rejects_out_of_range(sd, kernels):
    fast = ModelRuntime(ARCH, sd, auto_plan(), source_digest="tiny", kernels=kernels)
    kv = fast.new_kv(8)
    with torch.inference_mode(), pytest.raises(IndexError):
        fast.decode(torch.tensor([0]), torch.tensor([8]), kv, 8)  # slot 8 of a capacity-8 buffer


def test_bf16_prefill_plan_matches_float32(sd, kernels):
    ref = reference(sd)
    plan = auto_plan(bf16_gemm=True)
    assert plan.prefill_dtype == torch.bfloat16 and plan.kv_dtype == torch.float16
    assert plan.prefill_weights == "dense" and plan.block_head
    assert [plan.prefill_route(n) for n in (1, 24, 33, 300)] == [
        Route.C_STEP, Route.C_LAYERS, Route.TORCH_DENSE, Route.TORCH_DENSE]
    fast = ModelRuntime(ARCH, sd, plan, source_digest="tiny", kernels=kernels)
    ids = prompt(40)
    with torch.inference_mode():
        want = ref.prefill(ids, torch.arange(40), ref.new_kv(48), 0, torch.arange(40))
        kv = fast.new_kv(48)
        got = fast.prefill(ids[:24], torch.arange(24), kv, 0, torch.arange(24))
        got_tail = fast.prefill(ids[24:], torch.arange(24, 40), kv, 24, torch.arange(16))
        step = fast.decode(ids[39:40], torch.tensor([40]), kv, 40)
    assert got.dtype == torch.float32
    assert (got - want[:24]).abs().max() < 0.15
    assert (got_tail - want[24:]).abs().max() < 0.15
    assert torch.isfinite(step).all()


def test_plans():
    def plan(dtype, device="cpu", kernels=True, bf16_gemm=False):
        return choose_plan(ARCH, ModelConfig(dtype=dtype, device=device), kernels, bf16_gemm)

    assert plan("float32") == ExecPlan.dense(torch.float32)
    assert plan("bfloat16") == ExecPlan.dense(torch.bfloat16)
    assert plan("auto", device="cuda") == ExecPlan.dense(torch.bfloat16)
    assert plan("auto", kernels=False) == ExecPlan.dense(torch.float32)
    assert plan("auto", kernels=False, bf16_gemm=True) == ExecPlan.dense(torch.bfloat16)
    assert plan("auto").uses_kernels and not plan("float32").uses_kernels
    assert plan("auto").name == "kernels-float32" and plan("float32").name == "dense-float32"
    with pytest.raises(ValueError):  # a block plan needs the kernels
        ModelRuntime(ARCH, state_dict(), plan("auto"))


def test_routes_of_the_float32_kernel_plan():
    """The table in ``segcache.model.plan``'s docstring, for the default CPU plan."""
    p = auto_plan()
    assert p.decode_route() is p.batch_decode_route() is Route.C_STEP
    assert p.prefill_route(1) is Route.C_STEP
    assert {p.prefill_route(n) for n in (2, 32, 33, PREFILL_ATTENTION_TOKENS)} == {Route.C_LAYERS}
    assert p.prefill_route(PREFILL_ATTENTION_TOKENS + 1) is Route.TORCH_BLOCKS
    assert p.blend_route() is Route.TORCH_BLOCKS
    assert p.independent_rows == PREFILL_ATTENTION_TOKENS
    dense = ExecPlan.dense(torch.float32)
    assert {dense.decode_route(), dense.prefill_route(1), dense.prefill_route(300), dense.blend_route()} == {
        Route.TORCH_DENSE}
    assert dense.independent_rows == 0


def test_the_architecture_rules_kernels_out():
    """Where a kernel cannot take the shapes, the plan takes the next route down."""
    odd_head = replace(ARCH, n_heads=4, head_dim=24)  # head_dim 24: not in tiles of 16, q_dim 96
    p = auto_plan(arch=odd_head)
    assert p.c_step and p.c_layers_tokens == 0 and p.kernel_prefill_tokens == 0 and p.independent_rows == 0
    assert p.prefill_route(20) is Route.TORCH_BLOCKS and p.prefill_route(1) is Route.C_STEP
    unpacked = replace(ARCH, intermediate_size=72)  # the down projection's inputs: not in blocks of 32
    p = auto_plan(arch=unpacked)
    assert not p.c_step and p.decode_route() is Route.TORCH_BLOCKS and p.independent_rows == 0
    big_group = replace(ARCH, n_heads=18, n_kv_heads=2, head_dim=16)  # 9 query heads per KV head
    assert not auto_plan(arch=big_group).c_step


def test_plans_that_no_code_runs_are_rejected():
    f32, f16 = torch.float32, torch.float16
    with pytest.raises(ValueError):  # dense weights in two dtypes
        ExecPlan(f32, torch.bfloat16, f32)
    with pytest.raises(ValueError):  # a kernel on dense weights
        ExecPlan(f32, f32, f32, c_step=True)
    with pytest.raises(ValueError):  # the C prefill layers without the C step
        replace(auto_plan(), c_step=False)
    with pytest.raises(ValueError):  # independent rows beyond the C prefill layers
        replace(auto_plan(), c_layers_tokens=0)
    with pytest.raises(ValueError):  # a bfloat16 prefill on the float32 block kernels
        replace(auto_plan(), prefill_dtype=torch.bfloat16)
    with pytest.raises(ValueError):  # the kernels' attention over bfloat16 KV
        replace(auto_plan(), kv_dtype=torch.bfloat16)
    assert replace(auto_plan(), kv_dtype=f16).kv_dtype == f16


def test_fingerprint_names_the_plan(sd):
    """Plans that compute different numbers give different fingerprints; the same plan the same."""
    a = ModelRuntime(ARCH, sd, ExecPlan.dense(torch.float32), source_digest="w")
    b = ModelRuntime(ARCH, sd, ExecPlan.dense(torch.float32), source_digest="w")
    c = ModelRuntime(ARCH, sd, ExecPlan.dense(torch.bfloat16), source_digest="w")
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.slow
def test_real_model_auto_greedy_equals_float32(tmp_path, real_model_dir, kernels):
    """Greedy tokens of the real model: float32, ``auto`` as this CPU chooses it, and
    both kernel plans (float32 and bfloat16 prefill) selected explicitly."""
    from segcache.model.weights import ResolvedModel, load_arch, load_state_dict

    resolved = ResolvedModel(real_model_dir, "real", real_model_dir, "sha256:test")
    arch, sd = load_arch(real_model_dir), load_state_dict(real_model_dir)
    ids = prompt(24, seed=7) + 100  # any ids in the real vocab
    runtimes = [ModelRuntime.load(resolved, ModelConfig(dtype=d, cache_dir=tmp_path)) for d in ("float32", "auto")]
    runtimes += [ModelRuntime(arch, sd, auto_plan(bf16, arch), kernels=kernels) for bf16 in (False, True)]
    assert {rt.plan.name for rt in runtimes[2:]} == {"kernels-float32", "kernels-bfloat16"}
    outs = []
    for rt in runtimes:
        kv = rt.new_kv(64)
        with torch.inference_mode():
            logits = rt.prefill(ids, torch.arange(24), kv, 0)
            tokens = []
            for t in range(24, 40):
                tok = logits[0].argmax().view(1)
                tokens.append(int(tok))
                logits = rt.decode(tok, torch.tensor([t]), kv, t)
        outs.append(tokens)
    assert outs[1:] == [outs[0]] * 3


@pytest.mark.parametrize("batch", [1, 12])
def test_fused_decode_step_on_the_pool_gives_the_bits_of_one_thread(sd, kernels, batch):
    """The C step is a program of stages whose tasks the pool's threads claim, may compute
    twice, and commit once (csrc/pool.c); run so on two threads it gives the bits of the
    same program run task by task on the calling thread (``seg_pool_serial``), logits and
    K/V, over several steps. 12 sequences take the GEMM for every product."""
    fast = ModelRuntime(ARCH, sd, auto_plan(), source_digest="tiny", kernels=kernels)
    lengths = [5 + 3 * b for b in range(batch)]
    ids = prompt(64)
    threads = torch.get_num_threads()
    runs = []
    try:
        torch.set_num_threads(2)
        for serial in (False, True):
            kernels.lib.seg_pool_serial(int(serial))
            kvs, pos, tokens, logits = [fast.new_kv(64) for _ in lengths], list(lengths), [], []
            with torch.inference_mode():
                for n, kv in zip(lengths, kvs, strict=True):
                    fast.prefill(ids[:n], torch.arange(n), kv, 0)
                tokens = [int(ids[n]) for n in lengths]
                for _ in range(4):
                    out = (fast.decode(torch.tensor(tokens), torch.tensor(pos), kvs[0], pos[0]) if batch == 1
                           else fast.decode_batch(tokens, pos, kvs))
                    logits.append(out)
                    tokens = [int(t) for t in out.argmax(-1)]
                    pos = [p + 1 for p in pos]
            runs.append((logits, kvs))
    finally:
        kernels.lib.seg_pool_serial(0)
        torch.set_num_threads(threads)
    (pooled, kv_pooled), (serial_logits, kv_serial) = runs
    assert all(torch.equal(a, b) for a, b in zip(pooled, serial_logits, strict=True))
    for n, a, b in zip(lengths, kv_pooled, kv_serial, strict=True):
        assert torch.equal(a[:, :, :, :n + 4], b[:, :, :, :n + 4])  # the slots written


def test_a_task_a_stalled_pool_thread_holds_is_redone_and_later_stages_go_on(kernels):
    """A pool thread the OS parks while it holds a task (here: a task that sleeps 300 ms
    the first time a pool thread runs it) stalls nothing but the program's return: the
    calling thread computes that task again, every later stage finishes before the stalled
    thread wakes, each task is committed exactly once with the right value, and the call
    returns only once the stalled thread has left the task (``seg_pool_check``)."""
    threads = torch.get_num_threads()
    before = kernels.pool_stats()
    try:
        torch.set_num_threads(2)
        for _ in range(5):  # 3: no pool thread took a task in time (nothing was checked)
            result = kernels.lib.seg_pool_check(300, 2)
            if result != 3:
                break
    finally:
        torch.set_num_threads(threads)
    assert result == 0, {1: "a value is wrong", 2: "a task was committed other than once",
                         3: "no pool thread ever took a task", 4: "a later stage waited for the stalled thread",
                         5: "the call returned while the stalled thread was inside a task"}[result]
    after = kernels.pool_stats()
    assert after["redone"] > before["redone"] and after["final_waits"] > before["final_waits"]
