#!/usr/bin/env python
"""The GPU benchmark: one prepared, time-bounded run of every speed figure on a lent card.

Sections (jaxft against the PyTorch reference, same random weights, same device, same run):
  1. classification train step, gpt2-small shape, batch 8 x 120, the reference's trainable set
     (last block + final norm + head): jaxft fp32 and bf16 compute (`make_steps(dtype=bf16)`)
     against the torch reference in fp32 and under `torch.autocast(bfloat16)`;
  2. instruction train step, gpt2-medium shape, batch 8 x 256, all parameters trainable,
     same four variants;
  3. generation, gpt2-medium shape: batch-1 greedy tokens/s (jaxft's cached, compiled loop
     against the reference's uncached loop), and the 110-prompt test split batched with an eos
     stop (up to 256 new tokens) against the reference's one-prompt-at-a-time uncached loop, run
     on as many prompts as its time budget allows and EXTRAPOLATED to the whole split.

  4. many devices (jaxft only): the LM train step (all trainable, AdamW), gpt2-small and gpt2-medium
     shapes, bf16 and fp32, on one device and on meshes data=N and fsdp=N over all N local devices
     (jax.local_devices(); skipped with a note when N == 1), global batch N x --mesh-batch rows of
     --mesh-seq tokens: tokens/s, tokens/s per device, scaling efficiency (throughput / (N x the
     one-device throughput)), the train state's bytes per device (sharding.bytes_per_device);
  5. MFU (jaxft only): the gpt2-medium bf16 instruction step (masked LM, all trainable) at the
     --mfu-shapes batches, model FLOPs (PaLM's convention: 6 x N x tokens + 12 x n_layers x d x T^2
     per sequence) / step time / the card's peak dense bf16 FLOP/s (a table by device_kind, or
     --peak-tflops; "peak unknown" otherwise);
  6. trunk cache (jaxft only): the classification recipe (gpt2-small shape, the bundled SMS spam
     splits, last block trainable, --trunk-steps steps, then the final accuracy on every split)
     with the frozen-trunk cache (trunk_features once + suffix steps) against without (full steps).

fp32 matmuls: JAX uses TF32 on recent NVIDIA cards by default; torch does not. With
--fp32-matmul tf32 (default) torch is set to "high" too, so both do the same arithmetic;
--fp32-matmul full makes both use true fp32.

Every section has a time budget and the whole run a deadline (--budget-s, default 420 s after imports;
a section's share is its weight in SECTIONS over those still to run, so unused time rolls over;
--sections picks some): timing loops stop early and variants are skipped (saying so) rather than overrun. Needs
jax (CUDA), flax, optax, numpy and torch; works from a plain copy of the repository (adds
the repo root to sys.path; no transformers needed; without safetensors a stub stands in,
since only saving/loading weights files uses it). The tokenizer and the instruction data
are optional: without them the split's prompts are synthetic (the output says so).

    python scripts/bench_gpu.py --out $OUT/bench_gpu.json     # on the GPU machine
    python scripts/bench_gpu.py --quick --out /tmp/bench_gpu.json   # tiny shapes, any machine, ~2 min on 2 CPU cores
    python scripts/bench_gpu.py --sections mesh,mfu --out $OUT/b.json   # some sections only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests", REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# jax preallocates 75% of GPU memory by default; torch shares the card in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
# --quick on a CPU: two host devices, so the mesh section runs its data=2 / fsdp=2 programs too
# (JAX fixes the device count at start-up; the flag touches the CPU platform only).
if "--quick" in sys.argv[1:] and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()


def _stub_missing_safetensors() -> str | None:
    """jaxft.weights imports safetensors at import time for its own file format; this
    benchmark never reads or writes weights files, so a stub is enough where it is missing."""
    if importlib.util.find_spec("safetensors") is not None:
        return None

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("safetensors is not installed (stubbed by bench_gpu.py)")

    package, numpy_mod = types.ModuleType("safetensors"), types.ModuleType("safetensors.numpy")
    numpy_mod.save_file = numpy_mod.load_file = package.safe_open = unavailable
    package.numpy = numpy_mod
    sys.modules.update({"safetensors": package, "safetensors.numpy": numpy_mod})
    return "safetensors missing: stubbed (not needed here)"


_STUB_NOTE = _stub_missing_safetensors()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_train as bt  # noqa: E402  (scripts/bench_train.py: shared models, batches and runners)
from jaxft import generate as gen  # noqa: E402
from jaxft.config import GPTConfig  # noqa: E402
from jaxft.attention import fused_attention  # noqa: E402
from jaxft.model import init_params, param_count  # noqa: E402

EOS = 50256
# The sections in their default order, with their weights: each gets its weight's share of the time
# still left among the sections still to run.
SECTIONS = {"cls-train": 1.0, "lm-train": 2.0, "generation": 2.0, "mesh": 2.5, "mfu": 1.2, "trunk": 1.3}
SPLIT = slice(935, 1045)  # the reference's test split of the 1,100 instruction entries
# --quick: a small vocabulary keeps the head cheap; token ids are folded into it.
TINY = GPTConfig(vocab_size=1024, context_length=256, emb_dim=64, n_layers=1, n_heads=2, name="tiny 64x1x2, vocab 1024")


class Deadline:
    """The whole run's time limit; sections ask it how long they may take."""

    def __init__(self, total_s: float):
        self.start, self.total = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def environment(args) -> dict:
    dev = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "jax_device": f"{dev.device_kind} ({jax.default_backend()})",
        "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "fp32_matmul": args.fp32_matmul,
        "quick": args.quick,
        "notes": [n for n in (_STUB_NOTE,) if n],
    }


# --------------------------------------------------------------------------- train steps


def train_section(title: str, config: GPTConfig, params: dict, batch: dict, task: str, trainable: str,
                  args, deadline: Deadline, budget_s: float) -> list[dict]:
    """fp32 then bf16, each jaxft vs torch; a variant is skipped when the deadline is near."""
    rows = []
    section_end = deadline.elapsed() + budget_s
    needed = 5.0  # before the first compile nothing is known; then: the last compile time, plus a margin
    for precision, jax_dtype, autocast in (("fp32", jnp.float32, None), ("bf16", jnp.bfloat16, torch.bfloat16)):
        if deadline.elapsed() > section_end - needed:
            rows.append({"section": title, "precision": precision, "skipped": "time budget"})
            print(f"{title} [{precision}]: skipped (time budget: {section_end - deadline.elapsed():.0f} s left, ~{needed:.0f} s needed)")
            continue
        runners = [
            bt.jaxft_runner("jaxft", config, params, batch, task, trainable, dtype=jax_dtype),
            bt.torch_runner("torch", config, params, batch, task, trainable, torch_device(), autocast=autocast),
        ]
        # Leave the remaining variant its share of the section.
        share = max(2.0, (section_end - deadline.elapsed()) / (2 if precision == "fp32" else 1))
        r = bt.time_runners(runners, args.steps, budget_s=share)
        j, t = r["jaxft"], r["torch"]
        row = {
            "section": title, "precision": precision,
            "jaxft_ms": j["median_ms"], "torch_ms": t["median_ms"], "speedup": t["median_ms"] / j["median_ms"],
            "jaxft_compile_s": j["compile_s"], "steps_timed": len(j["times"]),
            "first_loss": {"jaxft": j["first_loss"], "torch": t["first_loss"]},
        }
        rows.append(row)
        needed = 1.3 * j["compile_s"] + 5
        print(f"{title} [{precision}]: jaxft {row['jaxft_ms']:.1f} ms/step (compile {row['jaxft_compile_s']:.1f} s), "
              f"torch {row['torch_ms']:.1f} ms/step -> {row['speedup']:.2f}x; first loss {j['first_loss']:.5f} vs "
              f"{t['first_loss']:.5f}; {row['steps_timed']} steps timed; t={deadline.elapsed():.0f}s")
        del runners
        sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- generation


def split_prompts(data: Path, vocab_dir: Path | None, n: int, vocab: int, context: int, max_new: int) -> tuple[list[list[int]], str]:
    """Token ids of the test split's Alpaca prompts, or synthetic prompts of similar lengths."""
    try:
        from jaxft.data.instruct import format_prompt, load_entries
        from jaxft.tokenizer import get_tokenizer

        entries = load_entries(data)[SPLIT][:n]
        tokenizer = get_tokenizer(vocab_dir if vocab_dir and vocab_dir.is_dir() else None)
        prompts = [tokenizer.encode(format_prompt(e, "alpaca")) for e in entries]
        source = f"{data} entries 935:1045 (real prompts)"
    except Exception as exc:  # no data file or no tokenizer on this machine
        rng = np.random.default_rng(0)
        lengths = rng.integers(40, 130, n)  # the real split's prompts are 43-126 tokens
        prompts = [rng.integers(0, 50256, k).tolist() for k in lengths]
        source = f"SYNTHETIC prompts, 40-129 tokens ({type(exc).__name__}: {str(exc)[:120]})"
    keep = context - max_new
    return [[t % vocab for t in p[-keep:]] for p in prompts], source


def jaxft_split(config, params, prompts, max_new, batch_size) -> tuple[list[list[int]], float]:
    """All prompts, sorted by length, `batch_size` at a time (0: one batch); eos stop."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for s in range(0, len(order), size):
        rows = order[s : s + size]
        for i, ids in zip(rows, gen.generate(config, params, [prompts[i] for i in rows], max_new_tokens=max_new, eos_id=EOS)):
            out[i] = ids
    return out, time.perf_counter() - start


def generation_section(config: GPTConfig, args, deadline: Deadline, budget_s: float) -> list[dict]:
    from reference_gpt import generate as seed_generate
    from reference_gpt import generate_text_simple

    rows = []
    section_end = min(deadline.elapsed() + budget_s, deadline.total - 5)
    if section_end - deadline.elapsed() < 20:
        print("generation: skipped (time budget)")
        return [{"section": "generation batch 1", "skipped": "time budget"},
                {"section": "generation split", "skipped": "time budget"}]
    params = init_params(config, jax.random.key(args.seed))
    model = bt.reference_model(config, params, torch_device()).eval()
    prompts, source = split_prompts(args.data, args.vocab_dir, 110, config.vocab_size, config.context_length, args.max_new_tokens)
    print(f"generation: {config.name} ({param_count(params) / 1e6:.1f}M params), prompts: {source}")
    ctx = config.context_length

    # Batch 1, fixed length (no eos), the first split prompt.
    n = args.b1_tokens
    prompt = prompts[0]
    t0 = time.perf_counter()
    first = gen.generate(config, params, [prompt], max_new_tokens=n, eos_id=None)[0]
    cold = time.perf_counter() - t0
    times = []
    for _ in range(args.b1_repeats):
        t0 = time.perf_counter()
        gen.generate(config, params, [prompt], max_new_tokens=n, eos_id=None)  # returns host lists: synced
        times.append(time.perf_counter() - t0)
    ids = torch.tensor([prompt], device=torch_device())
    generate_text_simple(model, ids, 2, ctx)  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    seed_out = generate_text_simple(model, ids, n, ctx)
    sync()
    seed_s = time.perf_counter() - t0
    seed_ids = seed_out[0, len(prompt):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(first, seed_ids)) if a != b), len(first))
    jaxft_s = statistics.median(times)
    row = {"section": "generation batch 1", "prompt_tokens": len(prompt), "new_tokens": n,
           "jaxft_tok_s": n / jaxft_s, "jaxft_cold_s": cold, "seed_tok_s": n / seed_s,
           "speedup": seed_s / jaxft_s, "ids_agree_first": agree}
    rows.append(row)
    print(f"batch-1 greedy, {len(prompt)}+{n} tokens: jaxft {row['jaxft_tok_s']:.0f} tok/s (first call incl. compile "
          f"{cold:.1f} s), seed uncached loop {row['seed_tok_s']:.0f} tok/s -> {row['speedup']:.1f}x; "
          f"ids agree for the first {agree} of {n}; t={deadline.elapsed():.0f}s")

    # The test split, eos stop: jaxft batched (cold, then warm) vs the reference's loop on a subset.
    # Its compile takes about as long as the batch-1 one (the same program at another shape).
    needed = 1.5 * cold + 2 * seed_s * args.max_new_tokens / n + 5
    if deadline.elapsed() > section_end - needed:
        rows.append({"section": "generation split", "skipped": "time budget"})
        print(f"split: skipped (time budget: {section_end - deadline.elapsed():.0f} s left, ~{needed:.0f} s needed)")
        return rows
    out, cold_s = jaxft_split(config, params, prompts, args.max_new_tokens, args.gen_batch)
    _, warm_s = jaxft_split(config, params, prompts, args.max_new_tokens, args.gen_batch)
    tokens = sum(len(o) for o in out)
    spread = np.unique(np.linspace(0, len(prompts) - 1, min(args.ref_prompts, len(prompts))).round().astype(int))
    seed_s, seed_tokens, matches, done = 0.0, 0, 0, []
    for i in spread.tolist():
        if done and deadline.elapsed() > section_end:
            break
        ids = torch.tensor([prompts[i]], device=torch_device())
        t0 = time.perf_counter()
        res = seed_generate(model, ids, args.max_new_tokens, ctx, eos_id=EOS)
        sync()
        seed_s += time.perf_counter() - t0
        new = res[0, len(prompts[i]):].tolist()
        seed_tokens += len(new)
        matches += new == out[i]
        done.append(i)
    scale = len(prompts) / len(done)
    row = {"section": "generation split", "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "gen_batch": args.gen_batch or len(prompts), "jaxft_tokens": tokens, "jaxft_cold_s": cold_s,
           "jaxft_warm_s": warm_s, "seed_prompts_run": done, "seed_subset_s": seed_s,
           "seed_subset_tokens": seed_tokens, "seed_extrapolated_s": seed_s * scale,
           "speedup_warm": seed_s * scale / warm_s, "speedup_cold": seed_s * scale / cold_s,
           "seed_matches_jaxft": matches, "prompt_source": source}
    rows.append(row)
    print(f"split, {len(prompts)} prompts, up to {args.max_new_tokens} new (eos stop), jaxft batch {row['gen_batch']}: "
          f"jaxft {cold_s:.1f} s cold / {warm_s:.1f} s warm ({tokens} tokens, {tokens / warm_s:.0f} tok/s warm); "
          f"seed loop on {len(done)} prompt(s) {seed_s:.1f} s ({seed_tokens} tokens), EXTRAPOLATED x{scale:.1f} to "
          f"{row['seed_extrapolated_s']:.0f} s -> {row['speedup_warm']:.0f}x warm, {row['speedup_cold']:.0f}x cold; "
          f"identical ids for {matches} of {len(done)}; t={deadline.elapsed():.0f}s")
    return rows


# --------------------------------------------------------------------------- many devices, MFU, trunk cache


def _lm_step(config: GPTConfig, params: dict, host_batch: dict, dtype, spec: str | None, devices: list, attention: str = "auto"):
    """(compiled step, state, device batch) for the all-trainable LM step: on devices[0] (spec None)
    or on a mesh over `devices` (sharding.make_mesh / shard_tree / shard_steps / global_batch)."""
    from jaxft import optim, sharding, steps

    opt = optim.adamw(bt.LR, bt.WEIGHT_DECAY)
    state = steps.init_state(params, optim.trainable_mask(config, params, "all"), opt)
    train_step, eval_step = steps.make_steps(config, opt, "lm", dtype=dtype, attention=attention)
    if spec is None:
        state = jax.device_put(state, devices[0])
        batch = jax.device_put({k: jnp.asarray(v) for k, v in host_batch.items()}, devices[0])
    else:
        mesh = sharding.make_mesh(spec, devices)
        state = sharding.shard_tree(state, mesh)
        train_step, _ = sharding.shard_steps(train_step, eval_step, mesh, state, host_batch)
        batch = sharding.global_batch(host_batch, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start


def _time_pipelined(compiled, state, batch, max_steps: int, budget_s: float, chunk: int = 5):
    """One warm-up step, then rounds of `chunk` back-to-back steps (dispatch overlaps compute, as in
    training), synced at the end of each round; stops after `max_steps` steps or `budget_s` (at least
    one round). Returns (median seconds per step over rounds, steps timed, first loss, state)."""
    state, metrics = compiled(state, batch)
    first_loss = float(metrics["loss"])
    per_step, done, start = [], 0, time.perf_counter()
    while done < max_steps and (not per_step or time.perf_counter() - start < budget_s):
        n = min(chunk, max_steps - done)
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - t0) / n)
        done += n
    return statistics.median(per_step), done, first_loss, state


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mesh_section(models: list[GPTConfig], args, deadline: Deadline, budget_s: float) -> list[dict]:
    """The LM train step on one device and on meshes data=N and fsdp=N over every local device,
    global batch N x the one-device batch: tokens/s/device, scaling efficiency, bytes per device."""
    from jaxft import sharding

    devices = sorted(jax.local_devices(), key=lambda d: d.id)
    n = len(devices)
    rows: list[dict] = []
    section_end = deadline.elapsed() + budget_s
    configs = [("1 device", None, 1)] + ([] if n == 1 else [(f"data={n}", f"data={n}", n), (f"fsdp={n}", f"fsdp={n}", n)])
    b, seq = args.mesh_batch, args.mesh_seq
    print(f"\nmany devices: {n} local device(s) ({devices[0].device_kind}); LM step, all trainable, AdamW; "
          f"{b} x {seq} tokens per device (global batch {b} x N), batch already on the device(s); "
          f"median over rounds of 5 back-to-back steps")
    if n == 1:
        note = "1 local device: data=N / fsdp=N skipped (the one-device figures only)"
        print(f"  note: {note}")
        rows.append({"section": "mesh", "skipped": note})
    needed = 5.0
    for size in models:
        config, params = bt.lm_params(size, args.seed)
        for precision, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
            one = None
            for name, spec, devs in configs:
                label = f"{size.name} {precision} {name}"
                if deadline.elapsed() > section_end - needed:
                    rows.append({"section": "mesh", "model": size.name, "precision": precision, "mesh": name, "skipped": "time budget"})
                    print(f"  {label}: skipped (time budget: {section_end - deadline.elapsed():.0f} s left, ~{needed:.0f} s needed)")
                    continue
                host_batch = bt.lm_batch(config, b * devs, seq, args.seed)
                try:
                    compiled, state, batch, compile_s = _lm_step(config, params, host_batch, dtype, spec, devices)
                    memory = sharding.bytes_per_device(state)
                    total_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
                    share = max(1.0, min(args.mesh_time_s, section_end - deadline.elapsed() - 2))
                    step_s, timed, first_loss, state = _time_pipelined(compiled, state, batch, args.steps, share)
                except Exception as exc:  # noqa: BLE001  (out of memory, most likely: say so and go on)
                    rows.append({"section": "mesh", "model": size.name, "precision": precision, "mesh": name,
                                 "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
                    print(f"  {label}: FAILED ({rows[-1]['skipped']})")
                    _free()
                    continue
                tokens = b * devs * seq
                row = {"section": "mesh", "model": size.name, "precision": precision, "mesh": name, "devices": devs,
                       "global_batch": [b * devs, seq], "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
                       "tokens_per_s_per_device": tokens / step_s / devs, "compile_s": compile_s, "steps_timed": timed,
                       "bytes_per_device": max(memory.values()), "bytes_total": total_bytes, "first_loss": first_loss}
                if one is None and spec is None:
                    one = row
                if one is not None:
                    row["scaling_efficiency"] = row["tokens_per_s"] / (devs * one["tokens_per_s"])
                rows.append(row)
                needed = 1.3 * compile_s + 5
                eff = f"; efficiency {row['scaling_efficiency']:.2f}" if "scaling_efficiency" in row else ""
                print(f"  {label}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
                      f"{row['tokens_per_s_per_device']:.0f} tok/s/device{eff}; state {row['bytes_per_device'] / 2**20:.0f} MiB/device "
                      f"of {total_bytes / 2**20:.0f} MiB; compile {compile_s:.1f} s; first loss {first_loss:.5f}; "
                      f"{timed} steps; t={deadline.elapsed():.0f}s")
                del state, batch, compiled
                _free()
        del params
        _free()
    return rows


# Peak dense bf16 tensor-core FLOP/s (no sparsity) by jax's device_kind; the most specific match wins
# (checked in this order). From NVIDIA's data sheets.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)

MFU_FORMULA = ("model FLOPs per step = 6 x N x tokens + 12 x n_layers x d x T^2 x sequences "
               "(PaLM, appendix B: forward + backward, attention counted in full, no recomputation); "
               "N = parameters that multiply in a matmul: all but the wte/wpe lookup tables (the untied head counts)")


def peak_flops(device_kind: str) -> tuple[float | None, str]:
    for name, flops in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return flops, name
    return None, "peak unknown"


def model_flops(config: GPTConfig, params: dict, batch: int, seq: int) -> tuple[float, int]:
    """(model FLOPs of one forward+backward step over batch x seq tokens, N) by MFU_FORMULA."""
    lookups = sum(x.size for name in ("wpe", "wte") if name in params and ("lm_head" in params or name == "wpe")
                  for x in jax.tree_util.tree_leaves(params[name]))
    n = param_count(params) - lookups
    return 6.0 * n * batch * seq + 12.0 * config.n_layers * config.emb_dim * seq**2 * batch, n


def mfu_section(size: GPTConfig, shapes: list[tuple[int, int]], args, deadline: Deadline, budget_s: float) -> list[dict]:
    """Model FLOPs utilisation of the bf16 instruction step (masked LM, all trainable) on one device."""
    rows: list[dict] = []
    section_end = deadline.elapsed() + budget_s
    device = jax.local_devices()[0]
    peak, matched = (args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops else peak_flops(device.device_kind)
    config, params = bt.lm_params(size, args.seed)
    print(f"\nMFU: {size.name}, bf16 compute, masked LM, all trainable, AdamW, one device ({device.device_kind}); "
          + (f"peak {peak / 1e12:.0f} TFLOP/s dense bf16 ({matched})" if peak else "peak unknown (no ratio; --peak-tflops sets it)"))
    print(f"  {MFU_FORMULA}")
    needed = 5.0
    variants = [(attention, shape) for shape in shapes for attention in args.mfu_attention.split(",")]
    for attention, (b, seq) in variants:
        impl = fused_attention(attention, jnp.bfloat16) or "xla"
        label = f"{size.name} bf16 {b}x{seq}, attention {attention} ({impl})"
        if deadline.elapsed() > section_end - needed:
            rows.append({"section": "mfu", "shape": [b, seq], "attention": impl, "skipped": "time budget"})
            print(f"  {label}: skipped (time budget)")
            continue
        flops, n = model_flops(config, params, b, seq)
        try:
            compiled, state, batch, compile_s = _lm_step(config, params, bt.lm_batch(config, b, seq, args.seed), jnp.bfloat16, None,
                                                         [device], attention)
            share = max(1.0, min(args.mesh_time_s, section_end - deadline.elapsed() - 2))
            step_s, timed, first_loss, state = _time_pipelined(compiled, state, batch, args.steps, share)
        except Exception as exc:  # noqa: BLE001  (out of memory: say so, try the next shape)
            rows.append({"section": "mfu", "shape": [b, seq], "attention": impl,
                         "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            print(f"  {label}: FAILED ({rows[-1]['skipped']})")
            _free()
            continue
        row = {"section": "mfu", "model": size.name, "shape": [b, seq], "attention": impl, "step_ms": 1e3 * step_s, "model_flops": flops,
               "matmul_params": n, "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak / 1e12 if peak else None,
               "peak_source": matched, "mfu": flops / step_s / peak if peak else None, "compile_s": compile_s,
               "steps_timed": timed, "tokens_per_s": b * seq / step_s, "first_loss": first_loss, "device_kind": device.device_kind}
        rows.append(row)
        needed = 1.3 * compile_s + 5
        ratio = f"MFU {100 * row['mfu']:.1f}%" if peak else "peak unknown: no MFU"
        print(f"  {label}: {row['step_ms']:.1f} ms/step, {flops / 1e12:.3g} TFLOP/step (N = {n / 1e6:.1f}M), "
              f"{row['achieved_tflops']:.3g} TFLOP/s achieved -> {ratio}; {row['tokens_per_s']:.0f} tok/s; "
              f"compile {compile_s:.1f} s; {timed} steps; t={deadline.elapsed():.0f}s")
        del state, batch, compiled
        _free()
    measured = [r for r in rows if r.get("mfu") is not None]
    if measured:
        best = max(measured, key=lambda r: r["mfu"])
        hopper = any(k in device.device_kind for k in ("H100", "H200", "H800"))
        goal = f"; goal >= 45% on an H100-class card: {'met' if best['mfu'] >= 0.45 else 'NOT met'}" if hopper else ""
        print(f"  best: {100 * best['mfu']:.1f}% at {best['shape'][0]}x{best['shape'][1]}, attention {best['attention']}{goal}")
    return rows


def spam_splits(config: GPTConfig) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """The recipe's SMS spam splits (bundled data, GPT-2 tokenizer, padded to the longest training
    text) as arrays; synthetic rows of the same shapes (1045/149/300 x 120) where that fails."""
    try:
        from jaxft import get_tokenizer, sources
        from jaxft.data import spam

        frames = spam.splits_with_classes(sources.sms_spam_file()).frames()
        encoded = spam.encode_splits(*frames, get_tokenizer(), context_length=config.context_length)
        splits = {name: s.arrays() for name, s in zip(("train", "validation", "test"), encoded)}
        source = "the bundled SMS Spam Collection, GPT-2 tokenizer"
    except Exception as exc:  # noqa: BLE001  (no pandas or tokenizer: synthetic rows)
        rng = np.random.default_rng(0)
        splits = {}
        for name, rows in (("train", 1045), ("validation", 149), ("test", 300)):
            lengths = rng.integers(5, 121, rows).astype(np.int32)
            tokens = np.full((rows, 120), 50256, np.int32)
            for i, m in enumerate(lengths):
                tokens[i, :m] = rng.integers(0, 50256, m)
            splits[name] = {"tokens": tokens, "labels": rng.integers(0, 2, rows).astype(np.int32), "lengths": lengths}
        source = f"SYNTHETIC rows of the real shapes ({type(exc).__name__}: {str(exc)[:120]})"
    for arrays in splits.values():  # a small test vocabulary: fold the ids into it
        arrays["tokens"] = (arrays["tokens"] % config.vocab_size).astype(np.int32)
    return splits, source


def trunk_section(size: GPTConfig, args, deadline: Deadline, budget_s: float) -> list[dict]:
    """The classification recipe (last block trainable) end to end with and without the trunk cache:
    the same training steps over shuffled epochs, then the final accuracy on every split."""
    from jaxft import optim, steps, trunk
    from jaxft.data import batching

    section_end = deadline.elapsed() + budget_s
    config, params = bt.classifier_params(size, args.seed)
    dtype = jnp.bfloat16 if args.trunk_dtype == "bfloat16" else jnp.float32
    splits, source = spam_splits(config)
    bs = 8
    mask = optim.trainable_mask(config, params, "last-block")
    start_block = trunk.frozen_prefix_blocks(config, mask)
    per_epoch = len(splits["train"]["labels"]) // bs
    want = args.trunk_steps
    shapes = ", ".join(f"{k} {v['tokens'].shape[0]}x{v['tokens'].shape[1]}" for k, v in splits.items())
    print(f"\ntrunk cache: classification recipe, {size.name}, last block + final norm + head trainable, "
          f"{args.trunk_dtype}, batch {bs}, data: {source} "
          f"({shapes}); "
          f"{want} steps ({want / per_epoch:.1f} epochs of {per_epoch}) + final accuracy on every split; "
          f"cached: the trunk (blocks 0..{start_block - 1}) once for all {sum(len(v['labels']) for v in splits.values())} examples")

    def run(cached: bool, max_steps: int, time_s: float) -> dict:
        t_start = time.perf_counter()
        opt = optim.adamw(bt.LR, bt.WEIGHT_DECAY)
        state = steps.init_state(params, mask, opt)
        data, trunk_s = splits, 0.0
        if cached:
            t0 = time.perf_counter()
            data = {name: {"hidden": trunk.trunk_features(config, params, a["tokens"], start_block, batch_size=bs, dtype=dtype,
                                                     progress=False),
                           "labels": a["labels"], "lengths": a["lengths"]} for name, a in splits.items()}
            trunk_s = time.perf_counter() - t0
        train_step, eval_step = steps.make_steps(config, opt, "classification", dtype=dtype,
                                                 start_block=start_block if cached else None)
        t_train, done, first_s, losses = time.perf_counter(), 0, None, []
        epoch = 0
        while done < max_steps:
            for batch in batching.classification_batches(data["train"], bs, shuffle=True, drop_last=True, seed=123,
                                                         epoch=epoch, pad_id=50256 % config.vocab_size):
                state, metrics = train_step(state, batch)
                done += 1
                if first_s is None:
                    losses.append(float(metrics["loss"]))  # synced: the first step's time includes compile
                    first_s = time.perf_counter() - t_train
                if done >= max_steps or time.perf_counter() - t_train > time_s:
                    max_steps = done
                    break
            epoch += 1
        losses.append(float(metrics["loss"]))
        train_s = time.perf_counter() - t_train
        t0 = time.perf_counter()
        accuracy = {name: steps.evaluate(eval_step, state.params, batching.classification_batches(
            data[name], bs, shuffle=False, drop_last=False, seed=0, pad_id=50256 % config.vocab_size)).get("accuracy")
            for name in data}
        eval_s = time.perf_counter() - t0
        return {"cached": cached, "steps": done, "trunk_s": trunk_s, "train_s": train_s, "first_step_s": first_s,
                "step_ms": 1e3 * (train_s - first_s) / max(done - 1, 1), "eval_s": eval_s,
                "total_s": time.perf_counter() - t_start, "first_loss": losses[0], "last_loss": losses[-1], "accuracy": accuracy}

    if section_end - deadline.elapsed() < 10 or start_block == 0:
        why = "time budget" if start_block else "no frozen prefix (one block)"
        print(f"  skipped ({why})")
        return [{"section": "trunk", "skipped": why}]
    # Uncached first, with half of what is left; the cached run then trains exactly as many steps.
    plain = run(False, want, max(2.0, (section_end - deadline.elapsed()) * 0.6 - 5))
    _free()
    cached = run(True, plain["steps"], float("inf"))
    _free()
    for r in (plain, cached):
        label = "cached  " if r["cached"] else "uncached"
        acc = ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items() if v is not None)
        print(f"  {label}: total {r['total_s']:.1f} s = trunk {r['trunk_s']:.1f} s + {r['steps']} steps {r['train_s']:.1f} s "
              f"(first incl. compile {r['first_step_s']:.1f} s, then {r['step_ms']:.1f} ms/step) + final accuracy {r['eval_s']:.1f} s; "
              f"loss {r['first_loss']:.5f} -> {r['last_loss']:.5f}; accuracy {acc}")
    row = {"section": "trunk", "model": size.name, "dtype": args.trunk_dtype, "data": source, "start_block": start_block,
           "uncached": plain, "cached": cached, "speedup_total": plain["total_s"] / cached["total_s"],
           "speedup_step": plain["step_ms"] / cached["step_ms"], "full_recipe": plain["steps"] >= want}
    print(f"  -> whole recipe {row['speedup_total']:.2f}x faster with the cache ({plain['total_s']:.1f} s vs {cached['total_s']:.1f} s), "
          f"per step {row['speedup_step']:.2f}x; first losses {plain['first_loss']:.6f} vs {cached['first_loss']:.6f}"
          + ("" if row["full_recipe"] else f"; ONLY {plain['steps']} of {want} steps (time budget)") + f"; t={deadline.elapsed():.0f}s")
    return [row]


# --------------------------------------------------------------------------- table


def table(env: dict, rows: list[dict]) -> str:
    lines = [
        f"device: jax {env['jax_device']} | torch {env['torch_device']}; jax {env['jax']}, torch {env['torch']}, "
        f"python {env['python']}; fp32 matmuls: {env['fp32_matmul']}" + ("; QUICK (tiny shapes)" if env["quick"] else ""),
        "",
        "| measure | jaxft | torch reference | jaxft speed-up | notes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] in ("mesh", "mfu", "trunk"):
            continue
        if "skipped" in r:
            lines.append(f"| {r['section']} {r.get('precision', '')} | - | - | - | skipped: {r['skipped']} |")
        elif r["section"] == "generation batch 1":
            lines.append(f"| batch-1 greedy tok/s ({r['prompt_tokens']}+{r['new_tokens']} tokens) | {r['jaxft_tok_s']:.0f} | "
                         f"{r['seed_tok_s']:.0f} (the reference's uncached loop) | {r['speedup']:.1f}x | "
                         f"jaxft first call {r['jaxft_cold_s']:.1f} s incl. compile |")
        elif r["section"] == "generation split":
            lines.append(f"| test split, {r['prompts']} prompts, <= {r['max_new_tokens']} new, eos stop: wall s | "
                         f"{r['jaxft_warm_s']:.1f} warm / {r['jaxft_cold_s']:.1f} cold | {r['seed_extrapolated_s']:.0f} "
                         f"(EXTRAPOLATED from {len(r['seed_prompts_run'])} prompts) | {r['speedup_warm']:.0f}x warm, "
                         f"{r['speedup_cold']:.0f}x cold | jaxft batch {r['gen_batch']}, {r['jaxft_tokens']} tokens |")
        else:
            torch_label = "fp32" if r["precision"] == "fp32" else "autocast bf16"
            lines.append(f"| {r['section']}, {r['precision']}: ms/step | {r['jaxft_ms']:.1f} | {r['torch_ms']:.1f} ({torch_label}) | "
                         f"{r['speedup']:.2f}x | compile {r['jaxft_compile_s']:.1f} s; median of {r['steps_timed']} |")
    return "\n".join(lines + extra_tables(rows))


def extra_tables(rows: list[dict]) -> list[str]:
    """The jaxft-only sections: many devices, MFU, trunk cache."""
    lines: list[str] = []
    mesh = [r for r in rows if r["section"] == "mesh"]
    if mesh:
        lines += ["", "| LM step, all trainable | mesh | global batch | ms/step | tokens/s | tokens/s/device | scaling efficiency | state MiB/device (of total) | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mesh:
            if "skipped" in r:
                lines.append(f"| {r.get('model', '')} {r.get('precision', '')} | {r.get('mesh', '-')} | - | - | - | - | - | - | skipped: {r['skipped']} |")
                continue
            eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
            lines.append(f"| {r['model']} {r['precision']} | {r['mesh']} | {r['global_batch'][0]}x{r['global_batch'][1]} | "
                         f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | {eff} | "
                         f"{r['bytes_per_device'] / 2**20:.0f} ({r['bytes_total'] / 2**20:.0f}) | {r['compile_s']:.1f} |")
    mfu = [r for r in rows if r["section"] == "mfu"]
    if mfu:
        lines += ["", f"MFU: {MFU_FORMULA}", "",
                  "| instruction step, bf16, all trainable | attention | batch | ms/step | model TFLOP/step | achieved TFLOP/s | peak TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mfu:
            if "skipped" in r:
                lines.append(f"| - | {r.get('attention', '-')} | {r['shape'][0]}x{r['shape'][1]} | - | - | - | - | skipped: {r['skipped']} |")
                continue
            peak = f"{r['peak_tflops']:.0f} ({r['peak_source']})" if r["peak_tflops"] else "peak unknown"
            ratio = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            lines.append(f"| {r['model']} | {r['attention']} | {r['shape'][0]}x{r['shape'][1]} | {r['step_ms']:.1f} | {r['model_flops'] / 1e12:.3g} | "
                         f"{r['achieved_tflops']:.3g} | {peak} | {ratio} |")
    for r in (r for r in rows if r["section"] == "trunk"):
        if "skipped" in r:
            lines += ["", f"trunk cache: skipped ({r['skipped']})"]
            continue
        lines += ["", f"| classification recipe, {r['model']}, last block, {r['dtype']} | total s | trunk s | train s ({r['uncached']['steps']} steps) | ms/step after compile | final accuracy s |",
                  "|---|---|---|---|---|---|"]
        for key in ("uncached", "cached"):
            x = r[key]
            lines.append(f"| {key} | {x['total_s']:.1f} | {x['trunk_s']:.1f} | {x['train_s']:.1f} | {x['step_ms']:.1f} | {x['eval_s']:.1f} |")
        lines.append(f"| cached speed-up | {r['speedup_total']:.2f}x | | | {r['speedup_step']:.2f}x | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (e.g. $OUT/bench_gpu.json)")
    parser.add_argument("--quick", action="store_true", help="every section at tiny shapes (a check that the script works)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="deadline for the whole run after imports (default 420 s)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which sections, in this order (default all: {','.join(SECTIONS)}); a section's share of "
                        "the deadline is its weight over the weights of those still to run, so unused time rolls over")
    parser.add_argument("--mesh-batch", type=int, default=8, help="rows per device in the mesh section (global batch: x devices)")
    parser.add_argument("--mesh-seq", type=int, default=512, help="tokens per row in the mesh section")
    parser.add_argument("--mesh-time-s", type=float, default=10.0, help="most seconds timing one mesh or MFU variant")
    parser.add_argument("--mfu-shapes", default="8x1024,16x1024", help="BATCHxSEQ shapes of the MFU step, tried in order")
    parser.add_argument("--mfu-attention", default="auto,xla", help="attention settings of the MFU step, each tried at every shape "
                        "(auto: cuDNN's fused kernel on a GPU; xla: explicit scores and softmax)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak dense bf16 TFLOP/s (default: from device_kind)")
    parser.add_argument("--trunk-steps", type=int, default=650, help="train steps of the trunk-cache recipe (650: 5 epochs of 130)")
    parser.add_argument("--trunk-dtype", choices=("float32", "bfloat16"), default="float32", help="the recipe's compute dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per variant (after 1 warm-up)")
    parser.add_argument("--data", type=Path, default=REPO / "shared" / "data" / "instruction-data.json",
                        help="the instruction data (default: shared/data/ in the repo, else ../shared/data/); "
                        "synthetic prompts when absent")
    parser.add_argument("--vocab-dir", type=Path, default=REPO / "shared" / "data" / "gpt2_vocab",
                        help="GPT-2 encoder.json + vocab.bpe (else $JAXFT_GPT2_VOCAB or tiktoken's cache)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--b1-tokens", type=int, default=128, help="new tokens in the batch-1 measurement")
    parser.add_argument("--b1-repeats", type=int, default=3)
    parser.add_argument("--gen-batch", type=int, default=0, help="jaxft batch size on the split (0: all prompts at once)")
    parser.add_argument("--ref-prompts", type=int, default=110, help="most split prompts run through the reference's loop")
    parser.add_argument("--fp32-matmul", choices=("tf32", "full"), default="tf32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # Outside the GPU machine the shared data usually sits next to the repository, not inside it.
    for name, default, alternative in (("data", parser.get_default("data"), REPO.parent / "shared" / "data" / "instruction-data.json"),
                                       ("vocab_dir", parser.get_default("vocab_dir"), REPO.parent / "shared" / "data" / "gpt2_vocab")):
        if getattr(args, name) == default and not default.exists() and alternative.exists():
            setattr(args, name, alternative)
    if args.quick:
        args.steps, args.max_new_tokens, args.b1_tokens, args.b1_repeats = min(args.steps, 3), 16, 16, 1
        args.ref_prompts, args.budget_s = min(args.ref_prompts, 3), min(args.budget_s, 240.0)
        args.mesh_batch, args.mesh_seq, args.mesh_time_s, args.mfu_shapes = 2, 64, 2.0, "4x64"
        args.trunk_steps = min(args.trunk_steps, 10)
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # tiny ops: torch's thread pool only spins on a shared CPU
    if args.fp32_matmul == "tf32":
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default on NVIDIA cards
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("highest")
        jax.config.update("jax_default_matmul_precision", "highest")

    deadline = Deadline(args.budget_s)
    env = environment(args)
    print(f"# jaxft GPU benchmark {env['date']}: jax {env['jax']} on {env['jax_device']}, torch {env['torch']} on "
          f"{env['torch_device']}; fp32 matmuls {args.fp32_matmul}; deadline {args.budget_s:.0f} s")
    for note in env["notes"]:
        print(f"note: {note}")
    small = TINY if args.quick else bt.parse_size("gpt2-small")
    medium = TINY if args.quick else bt.parse_size("gpt2-medium")
    lm_seq = 64 if args.quick else 256
    rows: list[dict] = []
    if torch.cuda.is_available() and jax.default_backend() != "gpu":
        env["notes"].append(f"WARNING: torch sees a GPU but jax runs on {jax.default_backend()} (is jax's CUDA plugin installed?)")
        print(f"note: {env['notes'][-1]}")

    def save() -> None:
        """Write what is measured so far (again after each section: a killed run still leaves results)."""
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"environment": env, "results": rows, "table": table(env, rows),
                                            "total_s": deadline.elapsed()}, indent=2, default=str))

    chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    mfu_shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.mfu_shapes.split(",")]
    for i, name in enumerate(chosen):
        weights = [SECTIONS[x] for x in chosen[i:]]
        budget = max(0.0, deadline.left() - 5) * weights[0] / sum(weights)
        if name == "cls-train":
            cls_config, params = bt.classifier_params(small, args.seed)
            batch = bt.classification_batch(cls_config, 8, 120, args.seed)
            title = f"classification {small.name}, batch 8x120, last block+norm+head"
            rows += train_section(title, cls_config, params, batch, "classification", "last-block", args, deadline, budget)
            del params
        elif name == "lm-train":
            lm_config, params = bt.lm_params(medium, args.seed)
            batch = bt.lm_batch(lm_config, 8, lm_seq, args.seed)
            title = f"instruction {medium.name}, batch 8x{lm_seq}, all trainable"
            rows += train_section(title, lm_config, params, batch, "lm", "all", args, deadline, budget)
            del params
        elif name == "generation":
            rows += generation_section(medium, args, deadline, budget_s=budget)
        elif name == "mesh":
            rows += mesh_section([TINY] if args.quick else [small, medium], args, deadline, budget)
        elif name == "mfu":
            rows += mfu_section(medium, mfu_shapes, args, deadline, budget)
        elif name == "trunk":
            rows += trunk_section(TINY.replace(n_layers=2, name="tiny 64x2x2, vocab 1024") if args.quick else small, args, deadline, budget)
        _free()
        save()

    save()
    print(f"\n{table(env, rows)}\n\ntotal {deadline.elapsed():.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
