#!/usr/bin/env python
"""Reproduce the reference's instruction fine-tuning: pretrained GPT-2 medium (355M), every
parameter trained, AdamW 5e-5 / weight decay 0.1, 2 epochs, batch 8, eval every 5 steps on
5 batches, seed 123, Alpaca prompts; then a response for each of the 110 test entries
(greedy, up to 256 new tokens, eos stop) and the model saved (also as the reference's
gpt2-medium355M-sft.pth).

    python scripts/finetune_instruct.py --out runs/instruct [--data instruction-data.json] [--models-dir gpt2]

Every `jaxft finetune-instruct` flag works here too; this script only fixes the reference's recipe
(the CLI's defaults) and asks for the .pth export. Outputs in --out: metrics.json,
loss-plot.pdf/.png, instruction-data-with-response.json, model/, gpt2-medium355M-sft.pth.
"""

import sys

from jaxft.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", "runs/instruct"]
    if "--export-pth" not in args:
        args.append("--export-pth")
    sys.exit(main(["finetune-instruct", *args]))
