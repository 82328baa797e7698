#!/usr/bin/env python
"""Generation speed: jaxft's cached, compiled generation against two torch baselines.

1. Batch-1 greedy tokens/s against transformers' `GPT2LMHeadModel.generate` (KV cache on),
   same random weights, fp32, same device, same run, warm-up excluded, fixed length.
2. The instruction test split (Alpaca prompts, entries 935:1045 of instruction-data.json,
   up to --max-new-tokens new tokens, eos stop) batched in jaxft against the reference's
   one-prompt-at-a-time uncached torch loop (`generate` / `generate_text_simple` of
   tests/reference_gpt.py). The reference's loop is slow: it is timed on --ref-prompts prompts
   spread over the split and extrapolated to the whole split (the output says so).
   Random weights rarely emit eos, so a fixed-length variant (no eos) is reported too.

Weights are random (no pretrained GPT-2 here); speed does not depend on their values.
jax picks the GPU when it has one; torch uses CUDA when available.

    python scripts/bench_generate.py                      # gpt2-small, full settings
    python scripts/bench_generate.py --split-size 384x6x6 --ref-prompts 1 --repeats 5   # BENCHMARKS.md, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
if (SHARED_DATA / "gpt2_vocab").is_dir():
    os.environ.setdefault("JAXFT_GPT2_VOCAB", str(SHARED_DATA / "gpt2_vocab"))
sys.path.insert(0, str(REPO / "tests"))  # the reference's model and loops: tests/reference_gpt.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxft import generate as gen  # noqa: E402
from jaxft.config import GPTConfig, get_config, is_size_name  # noqa: E402
from jaxft.model import init_params, param_count  # noqa: E402
from bench_train import cpu_name  # noqa: E402  (scripts/ is on sys.path when run as a script)

EOS = 50256
SPLIT = slice(935, 1045)  # the reference's 85% / 10% split of the 1,100 entries: the test part


def parse_size(name: str) -> GPTConfig:
    """A GPT-2 size name, or EMBxLAYERSxHEADS for a smaller model with GPT-2's vocabulary."""
    if is_size_name(name):
        return get_config(name)
    try:
        emb, layers, heads = (int(x) for x in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {name!r}: use a GPT-2 size (gpt2-small, ...) or EMBxLAYERSxHEADS, e.g. 384x6x6")
    return GPTConfig(emb_dim=emb, n_layers=layers, n_heads=heads, name=name)


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_model(config: GPTConfig, params):
    """transformers' GPT2LMHeadModel holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxft.weights.hf import hf_config_json, params_to_state_dict

    fields = {k: v for k, v in hf_config_json(config).items() if k not in ("architectures", "model_type")}
    model = GPT2LMHeadModel(GPT2Config(**fields))
    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval().to(torch_device())


def reference_model(config: GPTConfig, params):
    """The reference's GPTModel (tests/reference_gpt.py) holding the same weights."""
    from reference_gpt import GPTModel, config_dict

    from jaxft.weights.torch_ref import params_to_state_dict

    model = GPTModel(config_dict(config))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(config, params).items()})
    return model.eval().to(torch_device())


def split_prompts(data: Path, n: int) -> tuple[list[list[int]], str]:
    """Token ids of the first n Alpaca-formatted test-split prompts (or a synthetic stand-in)."""
    try:
        from jaxft.data.instruct import format_prompt, load_entries
        from jaxft.tokenizer import get_tokenizer

        entries = load_entries(data)[SPLIT][:n]
        tokenizer = get_tokenizer()
        return [tokenizer.encode(format_prompt(e, "alpaca")) for e in entries], f"{data} [935:1045]"
    except Exception as exc:  # a machine without the data or the vocabulary files
        rng = np.random.default_rng(0)
        lengths = rng.integers(30, 57, n)  # the real split's prompts are 30-56 tokens
        note = f"SYNTHETIC prompts ({type(exc).__name__}: {exc})"
        return [rng.integers(0, 50256, k).tolist() for k in lengths], note


def jaxft_compile_seconds() -> list[float]:
    """A running total of XLA compile time, from jax's monitoring events."""
    total = [0.0]

    def listener(event: str, duration: float, **_) -> None:
        if "backend_compile" in event:
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return total


def bench_batch1(config, params, prompt, n_tokens, repeats) -> dict:
    """Batch-1 fixed-length greedy: jaxft vs HF generate, interleaved repeats.

    On CPU, HF runs with 1 thread and with all cores; its faster setting is the baseline."""
    model = hf_model(config, params)
    ids = torch.tensor([prompt], device=torch_device())

    def run_jaxft():
        return gen.generate(config, params, [prompt], max_new_tokens=n_tokens, eos_id=None)[0]

    def hf_runner(threads):
        def run():
            if threads:
                torch.set_num_threads(threads)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n_tokens,
                    min_new_tokens=n_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=EOS,
                )
            sync()
            return out[0, len(prompt) :].tolist()

        return run

    saved_threads = torch.get_num_threads()
    thread_options = [None] if torch.cuda.is_available() else sorted({1, os.cpu_count() or 1})
    runners = {"jaxft": run_jaxft} | {f"hf/{t or 'cuda'}": hf_runner(t) for t in thread_options}
    outputs = {name: fn() for name, fn in runners.items()}  # warm-up: compilation, allocator, caches
    times = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so background load hits all alike
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    torch.set_num_threads(saved_threads)
    jax_ids = outputs["jaxft"]
    hf_name = min((k for k in times if k != "jaxft"), key=lambda k: statistics.median(times[k]))
    hf_ids = outputs[hf_name]
    agree = next((i for i, (a, b) in enumerate(zip(jax_ids, hf_ids)) if a != b), len(jax_ids))
    return {"times": times, "hf": hf_name, "agree": agree, "n": n_tokens, "prompt_len": len(prompt)}


def bench_split(
    config, params, prompts, max_new, batch_size, ref_prompts, compile_total, always_fixed, torch_threads
) -> dict:
    """The test split: jaxft batched (eos stop, then fixed length) vs the reference's loop on a subset."""
    from reference_gpt import generate as seed_generate
    from reference_gpt import generate_text_simple

    result = {}
    compiles0, compile_s0 = gen.compilations(), compile_total[0]
    start = time.perf_counter()
    eos_out = gen.generate_batched(config, params, prompts, batch_size=batch_size, max_new_tokens=max_new, eos_id=EOS)
    result["jaxft_eos"] = time.perf_counter() - start
    result["jaxft_eos_compile"] = compile_total[0] - compile_s0
    result["compilations"] = gen.compilations() - compiles0
    result["jaxft_eos_tokens"] = sum(len(r) for r in eos_out)
    result["jaxft_fixed_tokens"] = len(prompts) * max_new
    result["jaxft_fixed_same_run"] = result["jaxft_eos_tokens"] == result["jaxft_fixed_tokens"] and not always_fixed
    if result["jaxft_fixed_same_run"]:
        # No eos fired: a fixed-length run is the same compiled program doing the same work.
        result["jaxft_fixed"] = result["jaxft_eos"] - result["jaxft_eos_compile"]
    else:
        start = time.perf_counter()
        gen.generate_batched(config, params, prompts, batch_size=batch_size, max_new_tokens=max_new, eos_id=None)
        result["jaxft_fixed"] = time.perf_counter() - start

    model = reference_model(config, params)
    # Load changes over minutes on a shared machine: pick the reference loop's threads right now.
    result["seed_threads"] = pick_torch_threads(model, config.vocab_size, torch_threads)
    subset = np.unique(np.linspace(0, len(prompts) - 1, ref_prompts).round().astype(int)).tolist()
    seed_eos_time, seed_eos_tokens, matches = 0.0, 0, 0
    ctx = config.context_length
    for i in subset:
        ids = torch.tensor([prompts[i]], device=torch_device())
        start = time.perf_counter()
        out = seed_generate(model, ids, max_new, ctx, eos_id=EOS)
        sync()
        seed_eos_time += time.perf_counter() - start
        new = out[0, len(prompts[i]) :].tolist()
        seed_eos_tokens += len(new)
        matches += new == eos_out[i]
    result["subset"] = subset
    result["seed_eos_subset"] = seed_eos_time
    result["seed_matches"] = matches
    if seed_eos_tokens == len(subset) * max_new and not always_fixed:
        # No eos fired: the reference's fixed-length loop would do exactly the same work.
        result["seed_fixed_subset"] = seed_eos_time
        result["seed_fixed_same_run"] = True
    else:
        start = time.perf_counter()
        for i in subset:
            generate_text_simple(model, torch.tensor([prompts[i]], device=torch_device()), max_new, ctx)
        sync()
        result["seed_fixed_subset"] = time.perf_counter() - start
        result["seed_fixed_same_run"] = False
    scale = len(prompts) / len(subset)
    result["seed_eos"] = seed_eos_time * scale
    result["seed_fixed"] = result["seed_fixed_subset"] * scale
    result["seed_eos_tokens_subset"] = seed_eos_tokens
    return result


def pick_torch_threads(model, vocab_size: int, requested: int | None) -> str:
    """Give the torch baselines their faster thread count on this CPU (1 or all cores).

    On a busy machine torch's default (all cores) can be several times slower than one
    thread, because its worker threads spin while competing with other processes."""
    if torch.cuda.is_available():
        return "cuda"
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} (--torch-threads)"
    tokens = torch.randint(0, vocab_size, (1, 150))
    best = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            model(tokens)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model(tokens)
                times.append(time.perf_counter() - start)
        best[threads] = min(times)
    choice = min(best, key=best.get)
    torch.set_num_threads(choice)
    timings = ", ".join(f"{t} thread(s) {s * 1e3:.0f} ms" for t, s in best.items())
    return f"{choice} (fastest of: {timings} per 150-token forward)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2-small", help="model for the batch-1 benchmark (default gpt2-small)")
    parser.add_argument("--split-size", default=None, help="model for the split benchmark (default: --size)")
    parser.add_argument("--batch1-tokens", type=int, default=128, help="new tokens in the batch-1 benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the batch-1 benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per split prompt (seed: 256)")
    parser.add_argument("--n-prompts", type=int, default=110, help="split prompts generated by jaxft (max 110)")
    parser.add_argument("--ref-prompts", type=int, default=None, help="prompts timed with the reference's loop (default all)")
    parser.add_argument("--batch-size", type=int, default=16, help="jaxft batch size on the split")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "instruction-data.json")
    parser.add_argument("--always-fixed", action="store_true",
                        help="time the fixed-length runs even when no eos fired (then they repeat the same work)")
    parser.add_argument("--skip-batch1", action="store_true")
    parser.add_argument("--skip-split", action="store_true")
    parser.add_argument("--device-note", default="", help="free text describing the machine, printed in the header")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: the faster of 1 and all cores")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    compile_total = jaxft_compile_seconds()
    config = parse_size(args.size)
    params = init_params(config, jax.random.key(args.seed))
    threads = pick_torch_threads(reference_model(config, params), config.vocab_size, args.torch_threads)
    print(f"# jaxft generation benchmark {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {args.device_note or '-'}; {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}); torch {torch.__version__} on {torch_device()}, "
          f"threads {threads}; fp32 everywhere")
    rows = []

    if not args.skip_batch1:
        prompt = split_prompts(args.data, 1)[0][0]
        r = bench_batch1(config, params, prompt, args.batch1_tokens, args.repeats)
        tj, th = (statistics.median(r["times"][k]) for k in ("jaxft", r["hf"]))
        bj, bh = (min(r["times"][k]) for k in ("jaxft", r["hf"]))
        print(f"\n## batch 1, greedy, {config.name} ({param_count(params) / 1e6:.0f}M params), prompt "
              f"{r['prompt_len']} tokens + {r['n']} new, {args.repeats} interleaved repeats after a warm-up")
        for name, times in r["times"].items():
            print(f"{name}: " + ", ".join(f"{r['n'] / t:.1f}" for t in times) + " tok/s")
        print(f"baseline: {r['hf']} (HF generate, threads/device); "
              f"jaxft ids == HF ids for the first {r['agree']} of {r['n']} tokens")
        rows.append(("batch-1 greedy tok/s (median)", f"{r['n'] / tj:.1f}", f"HF generate {r['n'] / th:.1f}",
                     f"{th / tj:.2f}x"))
        rows.append(("batch-1 greedy tok/s (best)", f"{r['n'] / bj:.1f}", f"HF generate {r['n'] / bh:.1f}",
                     f"{bh / bj:.2f}x"))

    if not args.skip_split:
        if args.split_size and parse_size(args.split_size) != config:
            config = parse_size(args.split_size)
            params = init_params(config, jax.random.key(args.seed))
        prompts, source = split_prompts(args.data, min(args.n_prompts, 110))
        n_ref = len(prompts) if args.ref_prompts is None else max(1, min(args.ref_prompts, len(prompts)))
        r = bench_split(
            config, params, prompts, args.max_new_tokens, args.batch_size, n_ref, compile_total, args.always_fixed,
            args.torch_threads,
        )
        k, n = len(r["subset"]), len(prompts)
        extrap = f"measured on {k} of {n} prompts (indices {r['subset']}), EXTRAPOLATED x{n / k:.1f}" if k < n else "measured on all prompts"
        print(f"\n## test split: {n} prompts from {source}, {config.name} ({param_count(params) / 1e6:.0f}M params), "
              f"up to {args.max_new_tokens} new tokens, jaxft batch {args.batch_size}")
        print(f"jaxft eos run: {r['jaxft_eos_tokens']} tokens, {r['compilations']} compilations "
              f"taking {r['jaxft_eos_compile']:.1f} s (included in its time)")
        if r["jaxft_fixed_same_run"]:
            print("jaxft fixed-length time = its eos run minus compilation (no eos fired: the same program and work)")
        print(f"seed loop: torch threads {r['seed_threads']}; {extrap}; {r['seed_eos_tokens_subset']} tokens generated on the subset; "
              f"identical ids to jaxft for {r['seed_matches']} of {k} prompts")
        if r["seed_fixed_same_run"]:
            print("seed loop fixed-length time = its eos run (no eos fired on the subset: the same work)")
        rows.append(("split, eos stop, wall s", f"{r['jaxft_eos']:.1f} (cold)", f"seed loop {r['seed_eos']:.0f}",
                     f"{r['seed_eos'] / r['jaxft_eos']:.1f}x"))
        warm = r["jaxft_eos"] - r["jaxft_eos_compile"]
        rows.append(("split, eos stop, wall s excl. compile", f"{warm:.1f}", f"seed loop {r['seed_eos']:.0f}",
                     f"{r['seed_eos'] / warm:.1f}x"))
        rows.append((f"split, fixed {args.max_new_tokens} tokens, wall s", f"{r['jaxft_fixed']:.1f}",
                     f"seed loop {r['seed_fixed']:.0f}", f"{r['seed_fixed'] / r['jaxft_fixed']:.1f}x"))
        rows.append(("split, fixed, tok/s", f"{r['jaxft_fixed_tokens'] / r['jaxft_fixed']:.1f}",
                     f"seed loop {r['jaxft_fixed_tokens'] / r['seed_fixed']:.2f}",
                     f"{r['seed_fixed'] / r['jaxft_fixed']:.1f}x"))

    print("\n| measure | jaxft | baseline | jaxft speed-up |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
