#!/usr/bin/env python
"""Reproduce the reference's SMS spam classifier: GPT-2 small, last block + final norm + head,
AdamW 5e-5 / weight decay 0.1, 5 epochs, batch 8, eval every 50 steps on 5 batches, seed 123.

    python scripts/finetune_classifier.py --out runs/spam [--data SMSSpamCollection] [--model gpt2/124M]

Every `jaxft finetune-classifier` flag works here too; this script only fixes the reference's recipe
as the defaults (they are the CLI's defaults as well).
"""

import sys

from jaxft.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", "runs/spam-classifier"]
    sys.exit(main(["finetune-classifier", *args]))
