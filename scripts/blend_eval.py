#!/usr/bin/env python
"""Quality of non-prefix reuse (issue 7): CacheBlend at several recompute ratios
against a full prefill, on the real model in float32.

Every sample is a multi-document prompt built from real text on this machine
(the docstrings of four Python standard-library modules, ~500 tokens each),
with the documents shuffled between samples so that each one really moves, and
a question about a function of one of them at the end:

    <|im_start|>system\\n  INSTRUCTIONS \\n\\n DOC_a \\n\\n DOC_b \\n\\n DOC_c \\n\\n DOC_d <|im_end|>
    <|im_start|>user\\n QUESTION <|im_end|>\\n<|im_start|>assistant\\n

Methods, all on the same token ids at the same positions, with the instruction
prefix already cached (an exact tree hit in the server):

    full      the whole prompt prefilled (the reference)
    prefix    prefix-only reuse: the instruction prefix reused, the rest prefilled
              (exact; what a prefix cache does when the documents move)
    blend r   each document's standalone KV (computed behind the sink, keys before
              RoPE, as the server's background job stores it) placed at its new
              position and blended with ratio r (segcache.model.llama.LlamaModel.blend,
              layer c)
    derived r the same, but each document's KV taken from a full prefill of the same
              documents in another order (keys un-rotated): what the server derives
              from the first request that computed a block, so that the block's first
              move blends at once (issue 16)

Reported per method: KL(full || method) of the first generated token's
distribution and top-1 agreement, teacher-forced NLL of the reference's
32-token greedy continuation, exact match of 32 greedy tokens (and the mean
matching prefix), the fraction of the documents' tokens recomputed, and TTFT
(time to the first token's logits, median over samples; standalone entries are
computed before the clock starts, as they would be in the cache).

    .venv/bin/python scripts/blend_eval.py --samples 12 --json bench-out/blend-eval.json
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segcache.bench.corpus import fit, stdlib_files
from segcache.config import CacheConfig, ModelConfig
from segcache.engine.prompt import sink_ids
from segcache.model.runtime import ModelRuntime
from segcache.model.tokenizer import ChatTokenizer
from segcache.model.weights import load_arch, resolve_model

INSTRUCTIONS = ("You are a documentation assistant. Below are documents from the Python "
                "standard library. Answer the question using only these documents.")


@dataclass(frozen=True)
class Doc:
    module: str
    text: str
    functions: tuple[tuple[str, str], ...]  # (name, first docstring line)


def module_docs(min_chars: int, n_chars: int) -> list[Doc]:
    """One document per stdlib module with enough docstring text: its module
    docstring and its public functions' docstrings, cut to ``n_chars``."""
    docs = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        parts = [f"Document: the {path.stem} module."]
        head = ast.get_docstring(tree)
        if head:
            parts.append(inspect.cleandoc(head))
        funcs = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(f"{node.name}(): {inspect.cleandoc(doc)}")
                    funcs.append((node.name, inspect.cleandoc(doc).splitlines()[0]))
        text = "\n\n".join(parts)
        if len(text) >= min_chars and funcs:
            docs.append(Doc(path.stem, fit(text, n_chars), tuple(funcs)))
    return docs


@dataclass
class Sample:
    prefix: list[int]  # template + instructions (+ the joiner before the first document)
    blocks: list[list[int]]  # each document's tokens
    leads: list[list[int]]  # template tokens before each document (the joiner)
    tail: list[int]  # end of the system message, the question, the generation prompt


def build_sample(tok: ChatTokenizer, docs: list[Doc], question: str) -> Sample:
    instr = tok.encode(INSTRUCTIONS)
    blocks = [tok.encode(d.text) for d in docs]
    parts = tok.prompt_parts([{"role": "user", "content": question}], [instr, *blocks], True)
    seq: list[tuple[str, tuple[int, ...]]] = [(p.kind, p.ids) for p in parts]
    # template, instr(segment), joiner(template), doc(segment), ..., template, question, template
    prefix: list[int] = []
    leads: list[list[int]] = []
    tail: list[int] = []
    seg_seen = 0
    pending: list[int] = []
    for kind, ids in seq:
        if kind == "template":
            pending.extend(ids)
        elif kind == "segment":
            if seg_seen == 0:
                prefix = pending + list(ids)
            else:
                leads.append(pending)
            pending = []
            seg_seen += 1
        else:
            pending.extend(ids)
    tail = pending
    return Sample(prefix, blocks, leads, tail)


@dataclass
class MethodStats:
    kl: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    match_prefix: list[int] = field(default_factory=list)
    recomputed: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)


class Evaluator:
    def __init__(self, rt: ModelRuntime, tok: ChatTokenizer, gen_tokens: int, layer: int) -> None:
        self.rt, self.tok, self.n_gen, self.layer = rt, tok, gen_tokens, layer
        self.sink = list(sink_ids(tok))

    def standalone(self, block: list[int]) -> torch.Tensor:
        ids = self.sink + block
        kv = self.rt.new_kv(len(ids))
        self.rt.prefill(torch.tensor(ids), torch.arange(len(ids)), kv, 0)
        return self.rt.unrope_keys(kv[:, :, :, len(self.sink):], torch.arange(len(self.sink), len(ids)))

    def derived(self, s: Sample, docs: list[Doc]) -> dict[str, torch.Tensor]:
        """Each document's KV from a full prefill of ``s``, keys un-rotated."""
        ids = s.prefix + [t for lead, block in zip(s.leads, s.blocks, strict=True)
                          for t in lead + block] + s.tail
        kv = self.rt.new_kv(len(ids))
        self.rt.prefill(torch.tensor(ids), torch.arange(len(ids)), kv, 0)
        out, off = {}, len(s.prefix)
        for d, lead, block in zip(docs, s.leads, s.blocks, strict=True):
            a, b = off + len(lead), off + len(lead) + len(block)
            out[d.module] = self.rt.unrope_keys(kv[:, :, :, a:b], torch.arange(a, b))
            off = b
        return out

    def prefix_kv(self, s: Sample, capacity: int) -> torch.Tensor:
        kv = self.rt.new_kv(capacity)
        self.rt.prefill(torch.tensor(s.prefix), torch.arange(len(s.prefix)), kv, 0)
        return kv

    def run(self, s: Sample, method: str, ratio: float | None, handles: list[torch.Tensor],
            cached_prefix: torch.Tensor, filter_from: int | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(first-token logits, KV, TTFT seconds, recomputed fraction of document tokens)."""
        rest = [t for lead, block in zip(s.leads, s.blocks, strict=True) for t in lead + block] + s.tail
        p0 = len(s.prefix)
        n = p0 + len(rest)
        capacity = n + self.n_gen + 1
        t0 = time.perf_counter()
        if method == "full":
            ids = s.prefix + rest
            kv = self.rt.new_kv(capacity)
            logits = self.rt.prefill(torch.tensor(ids), torch.arange(n), kv, 0)[-1]
            return logits, kv, time.perf_counter() - t0, 1.0
        kv = self.rt.new_kv(capacity)
        kv[:, :, :, :p0] = cached_prefix[:, :, :, :p0]
        if method == "prefix":
            logits = self.rt.prefill(torch.tensor(rest), torch.arange(p0, n), kv, p0)[-1]
            return logits, kv, time.perf_counter() - t0, 1.0
        reused = torch.zeros(len(rest), dtype=torch.bool)
        off = 0
        for lead, block, handle in zip(s.leads, s.blocks, handles, strict=True):
            self.rt.place_keys(kv, handle, p0 + off + len(lead))
            reused[off + len(lead):off + len(lead) + len(block)] = True
            off += len(lead) + len(block)
        logits, recomputed = self.rt.blend(torch.tensor(rest), torch.arange(p0, n), kv, p0, reused,
                                           self.layer, ratio, filter_from)
        ttft = time.perf_counter() - t0
        frac = float((recomputed & reused).sum()) / max(1, int(reused.sum()))
        return logits[-1], kv, ttft, frac

    def greedy(self, logits: torch.Tensor, kv: torch.Tensor, pos: int) -> list[int]:
        out = []
        for _ in range(self.n_gen):
            token = int(logits.argmax())
            out.append(token)
            logits = self.rt.prefill(torch.tensor([token]), torch.tensor([pos]), kv, pos)[-1]
            pos += 1
        return out

    def nll(self, logits: torch.Tensor, kv: torch.Tensor, pos: int, ref: list[int]) -> float:
        """Mean NLL of ``ref`` teacher-forced after the prompt whose KV is in ``kv``."""
        rows = self.rt.prefill(torch.tensor(ref[:-1]), torch.arange(pos, pos + len(ref) - 1), kv, pos,
                               logits_at=torch.arange(len(ref) - 1))
        all_logits = torch.cat([logits[None], rows], 0)
        logp = torch.log_softmax(all_logits.float(), -1)
        return float(-logp[torch.arange(len(ref)), torch.tensor(ref)].mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12, help="prompts (default: %(default)s)")
    p.add_argument("--docs", type=int, default=4, help="documents per prompt (default: %(default)s)")
    p.add_argument("--doc-chars", type=int, default=2000,
                   help="characters per document, ~500 tokens (default: %(default)s)")
    p.add_argument("--ratios", default="0,0.05,0.15,0.3,1.0", help="blend ratios (default: %(default)s)")
    p.add_argument("--derived-ratios", default="0.15",
                   help="ratios for the derived entries (default: %(default)s; '' for none)")
    p.add_argument("--gradual-ratios", default="",
                   help="ratios for blends with gradual filtering from layer --filter-from "
                        "(default: none)")
    p.add_argument("--filter-from", type=int, default=1,
                   help="gradual filtering: layers 0..F run for every token (default: %(default)s)")
    p.add_argument("--layer", type=int, default=CacheConfig.blend_layer,
                   help="blend layer c (default: the server's, %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(path=args.model, dtype="float32")
    resolved = resolve_model(cfg.path, cfg.cache_dir, progress=True)
    arch = load_arch(resolved.directory)
    tok = ChatTokenizer.load(resolved.directory, arch.eos_token_ids)
    rt = ModelRuntime.load(resolved, cfg)
    ev = Evaluator(rt, tok, args.gen_tokens, args.layer)
    ratios = [float(r) for r in args.ratios.split(",")]
    derived = [float(r) for r in args.derived_ratios.split(",") if r.strip()]
    gradual = [float(r) for r in args.gradual_ratios.split(",") if r.strip()]
    methods = (["full", "prefix"] + [f"blend r={r:g}" for r in ratios]
               + [f"gradual r={r:g}" for r in gradual] + [f"derived r={r:g}" for r in derived])
    stats = {m: MethodStats() for m in methods}

    rng = random.Random(args.seed)
    pool = module_docs(min_chars=args.doc_chars, n_chars=args.doc_chars)
    handles_by_module: dict[str, torch.Tensor] = {}
    derived_by_module: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    with torch.inference_mode():
        for i in range(args.samples):
            if i % 3 == 0:  # a new document set every 3 samples, shuffled for each
                chosen = rng.sample(pool, args.docs)
                modules.extend(d.module for d in chosen)
                first = chosen[:]
                rng.shuffle(first)  # the order a first request computed them in
                derived_by_module.update(ev.derived(build_sample(tok, first, "Which modules?"), first))
            docs = chosen[:]
            rng.shuffle(docs)
            target = rng.choice(docs)
            name, _line = rng.choice(target.functions)
            question = f"What does the {name}() function of the {target.module} module do? Answer in one sentence."
            s = build_sample(tok, docs, question)
            for d, block in zip(docs, s.blocks, strict=True):
                if d.module not in handles_by_module:
                    handles_by_module[d.module] = ev.standalone(block)
            handles = [handles_by_module[d.module] for d in docs]
            n_prompt = len(s.prefix) + sum(len(a) + len(b) for a, b in zip(s.leads, s.blocks, strict=True)) + len(s.tail)
            cached_prefix = ev.prefix_kv(s, len(s.prefix))
            ref_logits, ref_kv, ttft, _ = ev.run(s, "full", None, handles, cached_prefix)
            ref_tokens = ev.greedy(ref_logits, ref_kv.clone(), n_prompt)
            ref_p = torch.softmax(ref_logits.float(), -1)
            for m in methods:
                ratio = None if "=" not in m else float(m.split("=")[1])
                if m == "full":
                    logits, kv, t, frac = ref_logits, ref_kv, ttft, 1.0
                elif m.startswith("derived"):
                    logits, kv, t, frac = ev.run(s, "blend", ratio,
                                                 [derived_by_module[d.module] for d in docs],
                                                 cached_prefix)
                elif m.startswith("gradual"):
                    logits, kv, t, frac = ev.run(s, "blend", ratio, handles, cached_prefix, args.filter_from)
                else:
                    logits, kv, t, frac = ev.run(s, m.split()[0], ratio, handles, cached_prefix)
                st = stats[m]
                logp = torch.log_softmax(logits.float(), -1)
                st.kl.append(float((ref_p * (torch.log(ref_p + 1e-30) - logp)).sum()))
                st.top1.append(int(logits.argmax()) == int(ref_logits.argmax()))
                st.nll.append(ev.nll(logits, kv.clone(), n_prompt, ref_tokens))
                gen = ref_tokens if m == "full" else ev.greedy(logits, kv.clone(), n_prompt)
                st.exact.append(gen == ref_tokens)
                st.match_prefix.append(next((k for k, (a, b) in enumerate(zip(gen, ref_tokens, strict=True))
                                             if a != b), len(gen)))
                st.recomputed.append(frac)
                st.ttft.append(t)
            print(f"sample {i + 1}/{args.samples}: {n_prompt} tokens, order "
                  f"{[d.module for d in docs]}, full {ttft * 1000:.0f} ms, "
                  f"r=0.15 {stats.get('blend r=0.15', stats[methods[-1]]).ttft[-1] * 1000:.0f} ms",
                  file=sys.stderr, flush=True)

    rows = []
    full_ttft = statistics.median(stats["full"].ttft)
    for m in methods:
        st = stats[m]
        rows.append({
            "method": m,
            "kl_first_token": statistics.mean(st.kl),
            "top1_agreement": sum(st.top1) / len(st.top1),
            "nll_ref_continuation": statistics.mean(st.nll),
            "exact_match_32": sum(st.exact) / len(st.exact),
            "mean_matching_prefix": statistics.mean(st.match_prefix),
            "recomputed_fraction": statistics.mean(st.recomputed),
            "ttft_ms_median": statistics.median(st.ttft) * 1000,
            "ttft_speedup_vs_full": full_ttft / statistics.median(st.ttft),
        })
    header = ("method", "KL(full||m)", "top-1", "NLL", f"exact {args.gen_tokens}", "match prefix",
              "recomputed", "TTFT ms", "vs full")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print(f"| {r['method']} | {r['kl_first_token']:.4f} | {r['top1_agreement']:.0%} | "
              f"{r['nll_ref_continuation']:.3f} | {r['exact_match_32']:.0%} | "
              f"{r['mean_matching_prefix']:.1f} | {r['recomputed_fraction']:.0%} | "
              f"{r['ttft_ms_median']:.0f} | {r['ttft_speedup_vs_full']:.2f}x |")
    meta = {"samples": args.samples, "docs": modules, "doc_chars": args.doc_chars,
            "layer": args.layer, "filter_from": args.filter_from, "gen_tokens": args.gen_tokens, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M"), "model": resolved.name}
    print(json.dumps(meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
