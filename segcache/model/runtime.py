"""The loaded model as the engine sees it: weights in the forms its ``ExecPlan``
names, the KV dtype, a fingerprint, and the calls ``prefill``, ``decode``,
``decode_batch`` and ``blend``, each dispatched on the plan's route for it
(``segcache.model.plan`` has the table of which code computes what).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Generator
from pathlib import Path

import torch
import torch.nn.functional as F

from segcache.config import ModelConfig
from segcache.model.arch import ModelArch
from segcache.model.kernels import (
    KERNEL_VERSION,
    MAX_GROUP,
    BlockKernels,
    DecodeLayer,
    FusedDecoder,
    KernelProbe,
    PackedLinear,
    probe_kernels,
    sources_digest,
)
from segcache.model.llama import Linear, LlamaModel, Weights, finish
from segcache.model.plan import (
    PREFILL_ATTENTION_TOKENS,
    ExecPlan,
    Route,
    choose_plan,
    cpu_has_bf16_gemm,
)
from segcache.model.quant import QUANT_VERSION, BlockLinear, load_blocks, save_blocks, to_blocks
from segcache.model.threads import CoreShare, halves_suffice, unstable_gemm_shapes
from segcache.model.weights import ResolvedModel, load_arch, load_state_dict

log = logging.getLogger("segcache.model")

# Bump when the layout or meaning of stored KV changes: old KV can then never be served.
KV_LAYOUT_VERSION = "kv1:[layers,2,kv_heads,tokens,head_dim]:k-after-rope"
# The Python that computes KV (the torch layer, the weight conversion and packing, the
# routes), derived from its sources as KERNEL_VERSION is from csrc/: KV stored by another
# version of this code is never served. Any edit counts, comments too: a needless
# recompute after an upgrade costs time, serving KV of other arithmetic costs answers.
MODEL_CODE_VERSION = "py-" + sources_digest(Path(__file__).parent, (".py",))[:16]


class ModelRuntime:
    """Weights for each route of ``plan`` plus the forward; no cache logic here.

    ``prefill``/``decode`` take the same arguments as ``LlamaModel.forward``
    minus the weights and return float32 logits; both mutate ``kv``. Which code
    runs is ``plan.prefill_route(len(ids))``, ``plan.decode_route()`` ... and
    nothing else (a ``c-step`` falls back to ``torch-blocks`` for a KV buffer
    it cannot index).
    """

    def __init__(self, arch: ModelArch, state_dict: dict[str, torch.Tensor], plan: ExecPlan,
                 device: str = "cpu", source_digest: str = "", tokenizer_digest: str = "",
                 kernels: BlockKernels | None = None, block_cache: Path | None = None,
                 core_share: CoreShare | None = None,
                 split_products: frozenset[tuple[int, int, int]] = frozenset()) -> None:
        """``kernels``: required by a plan with block weights. ``block_cache``: a file where
        the block form of the weights is kept between starts (packing takes seconds).
        ``core_share``: chooses torch's threads for each slice of a torch-dense prefill of
        up to ``core_share.max_rows`` tokens, whose products in ``split_products`` (those
        with bits that depend on the thread count) run as two row halves; ``load`` finds them.
        Raises ValueError where ``plan`` asks for code these weights cannot run."""
        if plan.uses_kernels and kernels is None:
            raise ValueError("a plan with block weights needs the block kernels (kernels.probe_kernels)")
        self.arch = arch
        self.plan = plan
        self.device = device
        # torch-dense: SDPA throughout. [vocab/hidden/...] shapes as in llama.Weights.
        self._dense_model = LlamaModel(arch, device, split_products=split_products)
        self.core_share = core_share
        dense_w = Weights.from_state_dict(arch, state_dict, plan.prefill_dtype, device)
        self._dense_w: Weights | None = dense_w
        self._block_w: Weights | None = None
        self._block_model: LlamaModel | None = None
        self._fused: FusedDecoder | None = None
        self.block_formats = ""  # which block formats, and whether all are exact (fingerprint)
        if plan.uses_kernels:
            self._block_w, self.block_formats = _block_weights(arch, state_dict, plan, kernels,
                                                               dense_w, block_cache)
            # torch-blocks: the torch layer with the kernels' attention where planned.
            self._block_model = LlamaModel(
                arch, device,
                decode_attention=kernels.attend_decode if plan.kernel_decode_attention else None,
                prefill_attention=kernels.attend_prefill if plan.kernel_prefill_tokens else None,
                prefill_attention_tokens=plan.kernel_prefill_tokens)
            if plan.c_step:
                self._fused = _fused_decoder(arch, self._block_w, kernels, self._block_model, plan.kv_dtype)
            if plan.prefill_weights == "blocks":
                self._dense_w = None  # every route runs on the blocks: the dense copy is not kept
            elif plan.block_head:
                self._dense_w = _with_head(dense_w, self._block_w.lm_head)
        self.fingerprint = _fingerprint(arch, plan, self.block_formats, source_digest, tokenizer_digest,
                                        split_products)
        self.kernel_probe: KernelProbe | None = None  # set by load(): how the kernels were had

    @classmethod
    def load(cls, resolved: ResolvedModel, cfg: ModelConfig, tokenizer_digest: str = "") -> ModelRuntime:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        arch = load_arch(resolved.directory)
        sd = load_state_dict(resolved.directory)
        probe = KernelProbe(None, "not-used", f"--dtype {cfg.dtype} on {cfg.device} runs dense")
        if cfg.dtype == "auto" and cfg.device == "cpu":
            probe = probe_kernels(Path(cfg.cache_dir) / "kernels")
            if probe.status == "build-failed":
                log.error("%s; serving on the dense torch path instead, at a fraction of the "
                          "speed.\nCompiler output:\n%s", probe.reason, probe.log)
        kernels = probe.kernels
        plan = choose_plan(arch, cfg, kernels=kernels is not None, bf16_gemm=cpu_has_bf16_gemm())
        block_cache = None
        if resolved.source_digest.startswith("sha256:"):
            digest = resolved.source_digest.removeprefix("sha256:")[:24]
            block_cache = Path(cfg.cache_dir) / "blocks" / f"{digest}-{QUANT_VERSION}.safetensors"
        core_share, split = None, frozenset()
        threads = torch.get_num_threads()
        if cfg.share_cores == "on" and 1 < threads <= CoreShare.MAX_THREADS and plan.shares_cores:
            split = unstable_gemm_shapes(_products(arch), PREFILL_ATTENTION_TOKENS, threads,
                                         plan.prefill_dtype, Path(cfg.cache_dir))
            if halves_suffice(split):
                core_share = CoreShare(threads, max_rows=PREFILL_ATTENTION_TOKENS)
            else:
                log.warning("torch's %s GEMM gives other bits at 1 and %d threads even for row halves "
                            "here; prefills keep %d threads under load", plan.prefill_dtype, threads, threads)
                split = frozenset()
        runtime = cls(arch, sd, plan, cfg.device, resolved.source_digest, tokenizer_digest, kernels,
                      block_cache, core_share, split)
        runtime.kernel_probe = probe
        log.info("execution plan: %s", runtime.describe())
        return runtime

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.plan.kv_dtype

    @property
    def split_products(self) -> frozenset[tuple[int, int, int]]:
        """The (M, K, N) products the torch-dense prefill computes as two row halves."""
        return self._dense_model.split_products

    @property
    def independent_rows(self) -> int:
        """``plan.independent_rows``: prefill calls of 2..this many tokens compute each
        row independently of the others in the call (0: no such guarantee)."""
        return self.plan.independent_rows

    def describe(self) -> str:
        """The plan in one line, for logs, benchmarks, /health and /v1/models; where the
        kernels are not used, why (a failed build shows here)."""
        p = self.plan
        weights = f"block weights ({self.block_formats})" if p.uses_kernels else "dense weights"
        why = ""
        if not p.uses_kernels and self.kernel_probe is not None:
            why = f"; block kernels {self.kernel_probe.status}: {self.kernel_probe.reason}"
        share = ""
        if self.core_share is not None:
            share = (f"; prefill slices drop to 1 of {self.core_share.threads} threads while other "
                     f"processes hold the cores ({len(self.split_products)} products in row halves)")
        return (f"plan {p.name}: prefill {p.prefill_dtype}, decode {p.decode_dtype} with {weights}, "
                f"KV {p.kv_dtype}; decode {p.decode_route().value}, prefill of 256 tokens "
                f"{p.prefill_route(256).value}{share}{why}")

    def new_kv(self, capacity: int) -> torch.Tensor:
        """Empty KV buffer [n_layers, 2, n_kv_heads, capacity, head_dim] in the KV dtype."""
        return self._dense_model.new_kv(capacity, self.plan.kv_dtype)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        return finish(self._prefill_steps(ids, positions, kv, start, self.arch.n_layers, logits_at))

    def prefill_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                      layers_per_step: int, logits_at: torch.Tensor | None = None,
                      ) -> Generator[int, None, torch.Tensor]:
        """``prefill`` a few layers at a time (``LlamaModel.forward_steps``): yields the
        layers done after each slice and returns the logits, bit-identical to one
        ``prefill``. A short prefill (a few tokens cost little) runs in one step."""
        return self._prefill_steps(ids, positions, kv, start, layers_per_step, logits_at)

    def _prefill_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                       layers_per_step: int, logits_at: torch.Tensor | None,
                       ) -> Generator[int, None, torch.Tensor]:
        route = self.plan.prefill_route(ids.shape[0])
        if ids.shape[0] <= self.plan.small_prefill_tokens:
            layers_per_step = self.arch.n_layers  # a few tokens: one step (they cost little)
        if route is Route.C_STEP and (logits_at is None or logits_at.tolist() in ([0], [])):
            # the decode step (its logits dropped when none are wanted: same KV either way)
            return self.decode(ids, positions, kv, start)[:len(logits_at) if logits_at is not None else 1]
        if route is Route.C_LAYERS:
            return (yield from self._c_layer_steps(ids, positions, kv, start, layers_per_step, logits_at))
        model, w = self._torch(Route.TORCH_BLOCKS if route is Route.C_STEP else route)
        steps = model.forward_steps(w, ids, positions, kv, start, layers_per_step, logits_at)
        if self.core_share is not None and route is Route.TORCH_DENSE \
                and ids.shape[0] <= self.core_share.max_rows:
            steps = self.core_share.run(steps)
        return (yield from steps)

    def _c_layer_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                       layers_per_step: int, logits_at: torch.Tensor | None,
                       ) -> Generator[int, None, torch.Tensor]:
        """The c-layers route: embedding and head in torch, each slice of layers one C call."""
        w, n_layers = self._block_w, self.arch.n_layers
        x = F.embedding(ids, w.embed).float().contiguous()  # [T, hidden]
        done = 0
        while done < n_layers:
            end = min(n_layers, done + layers_per_step)
            x = self._fused.prefill_layers(x, positions, kv, start, done, end)
            done = end
            if done < n_layers:
                yield done
        return self._block_model.head(w, x, logits_at)

    def _torch(self, route: Route) -> tuple[LlamaModel, Weights]:
        """The torch model and weights of a torch route."""
        if route is Route.TORCH_BLOCKS:
            return self._block_model, self._block_w
        return self._dense_model, self._dense_w

    def blend(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
              reused: torch.Tensor, layer: int, ratio: float,
              filter_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Selective recomputation over reused K/V (``LlamaModel.blend``), on the
        prefill weights. Returns (last logits [1, vocab], recomputed [T] bool)."""
        return finish(self.blend_steps(ids, positions, kv, start, reused, layer, ratio, filter_from))

    def blend_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                    reused: torch.Tensor, layer: int, ratio: float, filter_from: int | None = None,
                    ) -> Generator[int, None, tuple[torch.Tensor, torch.Tensor]]:
        """``blend`` one layer at a time (``LlamaModel.blend_steps``)."""
        model, w = self._torch(self.plan.blend_route())
        return model.blend_steps(w, ids, positions, kv, start, reused, layer, ratio, filter_from)

    def unrope_keys(self, handle: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A copy of KV ``handle`` [n_layers, 2, n_kv_heads, T, head_dim] whose keys,
        stored rotated for ``positions``, are un-rotated (position-independent)."""
        out = handle.clone()
        out[:, 0] = self._dense_model.rotate_keys(handle[:, 0], positions, inverse=True).to(handle.dtype)
        return out

    def place_keys(self, kv: torch.Tensor, handle: torch.Tensor, start: int) -> None:
        """Write position-independent ``handle`` into ``kv`` slots ``start..``,
        rotating its keys for positions ``start..`` (slot == position)."""
        n = handle.shape[3]
        positions = torch.arange(start, start + n)
        kv[:, 0, :, start:start + n] = self._dense_model.rotate_keys(handle[:, 0], positions).to(kv.dtype)
        kv[:, 1, :, start:start + n] = handle[:, 1]

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
               start: int) -> torch.Tensor:
        route = self.plan.decode_route()
        if route is Route.C_STEP:
            if ids.shape[0] == 1 and self._fused.accepts(kv):
                return self._fused(ids, positions, torch.tensor([start]), [kv])
            route = Route.TORCH_BLOCKS
        model, w = self._torch(route)
        return model.forward(w, ids, positions, kv, start, None)

    def decode_batch(self, tokens: list[int], positions: list[int],
                     kvs: list[torch.Tensor]) -> torch.Tensor:
        """One decode step for several sequences (each its own KV buffer); logits [B, vocab]."""
        route = self.plan.batch_decode_route()
        if route is Route.C_STEP:
            if all(map(self._fused.accepts, kvs)):
                pos = torch.tensor(positions)
                return self._fused(torch.tensor(tokens), pos, pos, kvs)
            route = Route.TORCH_BLOCKS
        model, w = self._torch(route)
        return model.decode_batch(w, tokens, positions, kvs)


def _with_head(w: Weights, head: Linear) -> Weights:
    """``w`` with another LM head (same weights in another form)."""
    return Weights(embed=w.embed, layers=w.layers, norm=w.norm, lm_head=head)


def _block_weights(arch: ModelArch, sd: dict[str, torch.Tensor], plan: ExecPlan,
                   kernels: BlockKernels, prefill_w: Weights,
                   cache: Path | None) -> tuple[Weights, str]:
    """Decode weights with every projection (and the LM head) in GGUF blocks, and
    the scheme name for the fingerprint: which formats, and whether all are exact."""
    known = load_blocks(cache) if cache is not None else {}
    made: dict[str, BlockLinear] = {}
    formats: set[str] = set()
    exact = True

    def pack(key: str, w: torch.Tensor) -> PackedLinear | torch.Tensor:
        nonlocal exact
        blocks = known.get(key)
        if blocks is None or blocks.shape != tuple(w.shape):
            blocks = to_blocks(w)
            if blocks is not None:
                made[key] = blocks
        if blocks is None:  # a shape the kernel does not take: stay dense
            formats.add("dense")
            return w.to(plan.decode_dtype).contiguous()
        formats.add(blocks.kind)
        exact = exact and blocks.exact
        return PackedLinear(blocks, kernels)

    embed = prefill_w.embed if prefill_w.dtype == plan.decode_dtype else None
    w = Weights.from_state_dict(arch, sd, plan.decode_dtype, "cpu", pack=pack, embed=embed)
    if cache is not None and made:
        try:
            save_blocks(cache, {**known, **made})
        except OSError:
            pass  # a read-only cache dir only costs the packing time at the next start
    scheme = f"{QUANT_VERSION}:{'+'.join(sorted(formats))}:{'exact' if exact else 'lossy'}"
    return w, scheme


def _fused_decoder(arch: ModelArch, w: Weights, kernels: BlockKernels, model: LlamaModel,
                   kv: torch.dtype) -> FusedDecoder:
    """The one-call decode step over ``w``. Raises ValueError where a projection stayed
    dense or the attention kernel's limits rule it out (``choose_plan`` never asks then)."""
    projections = [w.lm_head] + [p for lw in w.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    if not all(isinstance(p, PackedLinear) for p in projections) or w.dtype != torch.float32:
        raise ValueError("plan.c_step needs every projection in blocks and float32 activations")
    if arch.head_dim % 8 or arch.head_dim > 256 or arch.n_heads // arch.n_kv_heads > MAX_GROUP:
        raise ValueError("plan.c_step: head_dim or the query group is beyond the attention kernel's limits")
    layers = [DecodeLayer(lw.attn_norm, lw.qkv.w, lw.qkv_bias, lw.o.w, lw.mlp_norm, lw.gate_up.w, lw.down.w)
              for lw in w.layers]
    dims = {"n_layers": arch.n_layers, "hidden": arch.hidden_size, "inter": arch.intermediate_size,
            "n_heads": arch.n_heads, "n_kv": arch.n_kv_heads, "head_dim": arch.head_dim}
    return kernels.decoder(dims, arch.rms_eps, model.scale, layers, w.embed, w.norm, w.lm_head.w,
                           model.rope.cos, model.rope.sin, kv)


def _products(arch: ModelArch) -> list[tuple[int, int]]:
    """(inputs, outputs) of each projection of a layer (q/k/v and gate/up fused)."""
    return [(arch.hidden_size, arch.q_dim + 2 * arch.kv_dim), (arch.q_dim, arch.hidden_size),
            (arch.hidden_size, 2 * arch.intermediate_size), (arch.intermediate_size, arch.hidden_size)]


def _fingerprint(arch: ModelArch, plan: ExecPlan, block_formats: str, source_digest: str,
                 tokenizer_digest: str, split_products: frozenset[tuple[int, int, int]] = frozenset()) -> str:
    parts = {
        "arch": arch.as_dict(),
        "weights": source_digest,
        "tokenizer": tokenizer_digest,
        "plan": plan.as_dict(),  # every route and threshold: which code computed the KV
        "block_formats": block_formats,
        "split_products": sorted(split_products),  # products computed as two row halves
        "kernels": KERNEL_VERSION if plan.uses_kernels else "",
        "code": MODEL_CODE_VERSION,
        "kv_layout": KV_LAYOUT_VERSION,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
