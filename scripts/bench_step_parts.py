#!/usr/bin/env python
"""Where the LM train step's time goes (bf16 compute, all trainable, AdamW, one device): the whole
step against its parts, each compiled and timed alone in one run.

  step          the train step of steps.make_steps (what scripts/bench_gpu.py's MFU section times);
                step-padded: the same with the head's vocabulary padded to a multiple of 64
                (`finetune-instruct --head-vocab-multiple 64`)
  gradient      the same loss's gradient without the optimizer update (step - gradient = AdamW)
  blocks        embeddings + blocks + final norm, forward and backward, no head (a sum of squares as loss);
                blocks-xla: the same with explicit attention (scores and softmax), to see the fused kernel's share
  head          losses.lm_head_loss alone on [rows, d] hidden states, forward and backward;
                head-padded: the same with the vocabulary padded to a multiple of 64 (masked columns)

The head's chunk size is varied (logits per chunk; the default is losses.chunk_elements()), for the
head alone and for the whole step: on a GPU with memory to spare, fewer and larger chunks keep the card busier.

    python scripts/bench_step_parts.py --out $OUT/parts.json                 # gpt2-medium 16x1024 (a GPU)
    python scripts/bench_step_parts.py --size 64x2x2 --shape 4x64 --quick    # any machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_train as bt  # noqa: E402
from bench_gpu import model_flops, peak_flops  # noqa: E402
from jaxft import losses, optim, steps  # noqa: E402
from jaxft.attention import fused_attention  # noqa: E402


def timed(fn, args: tuple, repeats: int, budget_s: float) -> dict:
    """Compile fn(*args), run it once, then `repeats` times back to back (at most budget_s): ms per call."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    n, t0 = 0, time.perf_counter()
    while n < repeats and (n == 0 or time.perf_counter() - t0 < budget_s):
        out = compiled(*args)
        n += 1
    jax.block_until_ready(out)
    return {"ms": 1e3 * (time.perf_counter() - t0) / n, "calls": n, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2-medium")
    parser.add_argument("--shape", default="16x1024", help="BATCHxSEQ")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--chunks", default=f"{losses.CHUNK_ELEMENTS},{1 << 28},{losses.ACCELERATOR_CHUNK_ELEMENTS}",
                        help="logits per chunk to try (the CPU default, 2^28, the GPU/TPU default)")
    parser.add_argument("--parts", default="head,head-padded,step,step-padded,blocks,blocks-xla,step-chunks,gradient",
                        help="in this order: head and head-padded (every --chunks value), step, step-padded, blocks, blocks-xla, "
                        "step-chunks (the step at the other --chunks values), gradient")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new parts after this many seconds")
    parser.add_argument("--quick", action="store_true", help="few repeats (a check that the script works)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    repeats = 2 if args.quick else args.repeats
    b, seq = (int(v) for v in args.shape.lower().split("x"))
    config, params = bt.lm_params(bt.parse_size(args.size), 0)
    batch = {k: jnp.asarray(v) for k, v in bt.lm_batch(config, b, seq, 0).items()}
    dtype = jnp.bfloat16
    chunks = [int(c) for c in args.chunks.split(",")]
    device = jax.devices()[0]
    peak, _ = peak_flops(device.device_kind)
    flops, _ = model_flops(config, params, b, seq)
    impl = fused_attention(args.attention, dtype) or "xla"
    print(f"# LM step parts: {config.name}, {b}x{seq}, bf16, attention {args.attention} ({impl}), on {device.device_kind}; "
          f"model TFLOP/step {flops / 1e12:.3g}" + (f", peak {peak / 1e12:.0f}" if peak else ""), flush=True)
    rows: list[dict] = []
    default_chunk = losses.chunk_elements()  # this backend's: the "step" and "gradient" parts

    def record(name: str, result: dict, **extra) -> None:
        row = {"part": name, **extra, **result}
        if name.startswith("step") and peak:
            row["mfu"] = flops / (result["ms"] / 1e3) / peak
        rows.append(row)
        mfu = f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""
        print(f"  {name:<28} {result['ms']:9.2f} ms  (compile {result['compile_s']:.1f} s, {result['calls']} calls){mfu}; "
              f"t={time.perf_counter() - start:.0f}s", flush=True)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    hidden = jax.random.normal(jax.random.key(1), (b * seq, config.emb_dim), jnp.float32)
    head = params["lm_head"]["kernel"]
    targets = batch["targets"].reshape(-1)
    opt = optim.adamw(bt.LR, bt.WEIGHT_DECAY)
    mask = optim.trainable_mask(config, params, "all")

    def full_step(chunk: int, vocab_multiple: int | None = None) -> dict:
        saved = losses.chunk_elements
        losses.chunk_elements = lambda: chunk  # read when the step is traced
        try:
            state = steps.init_state(params, mask, opt)
            train_step, _ = steps.make_steps(config, opt, "lm", dtype=dtype, attention=args.attention, vocab_multiple=vocab_multiple)
            return timed(train_step, (state, batch), repeats, min(10.0, left()))
        finally:
            losses.chunk_elements = saved

    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        if left() < 0:
            print(f"  {part}: skipped (time budget)")
            rows.append({"part": part, "skipped": "time budget"})
            continue
        if part in ("head", "head-padded"):
            multiple = 64 if part == "head-padded" else None
            for chunk in chunks:
                rows_per_chunk = max(1, chunk // config.vocab_size)
                fn = jax.grad(lambda h, w, c=rows_per_chunk, m=multiple: losses.lm_head_loss(
                    h, w, targets, head_layout="dv", dtype=dtype, chunk_rows=c, vocab_multiple=m)[0], argnums=(0, 1))
                label = f"{part}, {rows_per_chunk} rows/chunk"
                record(label, timed(fn, (hidden, head), repeats, min(5.0, left())), chunk_elements=chunk, vocab_multiple=multiple)
        elif part in ("blocks", "blocks-xla"):
            attention = "xla" if part == "blocks-xla" else args.attention

            def blocks_loss(p, attention=attention):
                out = steps._forward(config, p, batch["inputs"], None, dtype, False, return_hidden=True, attention=attention)
                return jnp.mean(out.astype(jnp.float32) ** 2)
            label = f"blocks, attention {fused_attention(attention, dtype) or 'xla'}"
            record(label, timed(jax.grad(blocks_loss), (params,), repeats, min(5.0, left())))
        elif part == "gradient":
            fn = jax.grad(lambda p: steps.lm_metrics(config, p, batch, None, dtype, False, args.attention)[0])
            record("gradient (no optimizer)", timed(fn, (params,), repeats, min(5.0, left())))
        elif part == "step":
            record(f"step, {max(1, default_chunk // config.vocab_size)} rows/chunk", full_step(default_chunk), chunk_elements=default_chunk)
        elif part == "step-padded":
            padded_vocab = -(-config.vocab_size // 64) * 64
            record(f"step, head padded to {padded_vocab}, {max(1, default_chunk // padded_vocab)} rows/chunk",
                   full_step(default_chunk, 64), chunk_elements=default_chunk, vocab_multiple=64)
        elif part == "step-chunks":
            for chunk in chunks:
                if chunk != default_chunk and left() > 0:
                    record(f"step, {max(1, chunk // config.vocab_size)} rows/chunk", full_step(chunk), chunk_elements=chunk)
        else:
            parser.error(f"unknown part {part!r}")
    if args.out:
        args.out.write_text(json.dumps({"config": config.to_dict(), "shape": [b, seq], "device": device.device_kind, "attention": impl,
                                        "model_flops": flops, "peak": peak, "rows": rows, "jax": jax.__version__}, indent=2))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
