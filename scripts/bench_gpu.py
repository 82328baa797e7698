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

fp32 matmuls: JAX uses TF32 on recent NVIDIA cards by default; torch does not. With
--fp32-matmul tf32 (default) torch is set to "high" too, so both do the same arithmetic;
--fp32-matmul full makes both use true fp32.

Every section has a time budget and the whole run a deadline (--budget-s, default 240 s after imports):
timing loops stop early and variants are skipped (saying so) rather than overrun. Needs
jax (CUDA), flax, optax, numpy and torch; works from a plain copy of the repository (adds
the repo root to sys.path; no transformers needed; without safetensors a stub stands in,
since only saving/loading weights files uses it). The tokenizer and the instruction data
are optional: without them the split's prompts are synthetic (the output says so).

    python scripts/bench_gpu.py --out $OUT/bench_gpu.json     # on the GPU machine
    python scripts/bench_gpu.py --quick --out /tmp/bench_gpu.json   # tiny shapes, any machine, < 2 min
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
from jaxft.model import init_params, param_count  # noqa: E402

EOS = 50256
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
    section_end = min(deadline.elapsed() + budget_s, deadline.total - args.reserve_s)
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (e.g. $OUT/bench_gpu.json)")
    parser.add_argument("--quick", action="store_true", help="every section at tiny shapes (a check that the script works)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="deadline for the whole run after imports (default 240 s)")
    parser.add_argument("--reserve-s", type=float, default=100.0, help="time the train sections leave for generation")
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
        args.ref_prompts, args.reserve_s = min(args.ref_prompts, 3), min(args.reserve_s, 30.0)
        args.budget_s = min(args.budget_s, 150.0)
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

    cls_config, params = bt.classifier_params(small, args.seed)
    batch = bt.classification_batch(cls_config, 8, 120, args.seed)
    title = f"classification {small.name}, batch 8x120, last block+norm+head"
    rows += train_section(title, cls_config, params, batch, "classification", "last-block", args, deadline,
                          budget_s=0.35 * (args.budget_s - args.reserve_s))
    del params
    save()

    lm_config, params = bt.lm_params(medium, args.seed)
    batch = bt.lm_batch(lm_config, 8, lm_seq, args.seed)
    title = f"instruction {medium.name}, batch 8x{lm_seq}, all trainable"
    rows += train_section(title, lm_config, params, batch, "lm", "all", args, deadline,
                          budget_s=args.budget_s - args.reserve_s - deadline.elapsed())
    del params
    save()

    rows += generation_section(medium, args, deadline, budget_s=deadline.left() - 5)

    save()
    print(f"\n{table(env, rows)}\n\ntotal {deadline.elapsed():.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
