"""The settings every fine-tuning recipe shares, as data: `TrainerSettings`, composed into each
recipe's settings as `trainer` (like Levanter's `trainer:`). Each field is a CLI flag
(jaxft.cli.common generates them from `setting(...)`'s metadata)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from . import optim, sharding
from .attention import ATTENTIONS

TRAINABLE_HELP = "head | last-block | last-N-blocks (e.g. last-2-blocks) | all | lora"


def setting(default: Any, help: str, group: str = "training", **extra: Any) -> Any:
    """A settings field; the CLI makes it a flag with this help text, in this help group,
    with any extra argparse options (e.g. choices)."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass(frozen=True)
class TrainerSettings:
    """The settings every fine-tuning recipe shares (composed into each recipe's settings as
    `trainer`, like Levanter's `trainer:`). Defaults are the classification recipe's; each
    recipe states its own defaults."""

    model: str = setting("gpt2-small (124M)", "size name, checkpoint path, or OpenAI-style hparams.json", group="model")
    init: str = setting("pretrained", "start from pretrained weights or GPT-2's random initialisation", choices=("pretrained", "random"), group="model")
    models_dir: str = setting("gpt2", "where OpenAI checkpoints are (or get downloaded)", group="model")
    trainable: str = setting("last-block", TRAINABLE_HELP, group="model")
    final_norm: bool | None = setting(None, "train the final LayerNorm (on/off; default on unless --trainable head or lora)", group="model")
    lora_rank: int = setting(0, "add LoRA adapters of this rank (use with --trainable lora)", group="model")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (updates scale by alpha / rank)", group="model")
    drop_rate: float = setting(0.0, "dropout rate while training", group="model")
    epochs: int = setting(5, "passes over the training split")
    batch_size: int = setting(8, "examples per optimizer step")
    lr: float = setting(5e-5, "AdamW learning rate")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay")
    grad_clip_norm: float | None = setting(None, "clip gradients to this global norm (default: no clipping)")
    accumulation_steps: int = setting(1, "accumulate gradients over this many batches per update")
    eval_freq: int = setting(50, "evaluate every this many steps")
    eval_iter: int = setting(5, "batches per periodic evaluation")
    max_steps: int | None = setting(None, "stop training after this many steps (quick runs)")
    remat: bool = setting(False, "recompute each block's activations in the backward pass (less memory)")
    seed: int = setting(123, "seed of the data order, head initialisation and dropout")
    dtype: str = setting("float32", "compute dtype; parameters and optimizer state stay float32, loss and softmax are float32", choices=("float32", "bfloat16"))
    attention: str = setting("auto", "causal attention: xla (explicit scores, the reference's arithmetic), cudnn (fused flash "
                             "attention, NVIDIA GPUs, bfloat16), auto (cudnn on a GPU with bfloat16, else xla)", choices=ATTENTIONS)
    scan_layers: str = setting("auto", "run runs of identical blocks as one jax.lax.scan over stacked weights (compiles one block, "
                               "not every layer): on, off, auto (on on a CPU, off on a GPU/TPU)", choices=("auto", "on", "off"))
    mesh: str | None = setting(None, "device mesh 'data=D,fsdp=F' (default: every device on data; one device: no mesh)", group="devices")
    progress: bool = setting(True, "a progress bar per epoch (plain lines when not on a terminal)", group="output")
    checkpoint_every: int | None = setting(None, "write a checkpoint every this many training steps (batches; default: at every epoch end)", group="output")
    keep: int = setting(2, "how many of the newest checkpoints to keep", group="output")
    export_pth: bool = setting(False, "also write the reference's state dict (.pth)", group="output")

    @property
    def compute_dtype(self) -> Any:
        """The steps' compute dtype for `dtype` (parameters and optimizer state stay fp32)."""
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def validate(self, devices: bool = True) -> None:
        """One-line errors for settings that cannot work, before anything runs; `devices`: also
        the mesh against this host's devices (a sweep, which runs on one device, skips it)."""
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight-decay must be finite and >= 0, got {self.weight_decay}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be >= 1, got {self.max_steps}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad-clip-norm must be > 0, got {self.grad_clip_norm}")
        if self.lora_rank < 0:
            raise ValueError(f"lora-rank must be >= 0, got {self.lora_rank}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop-rate must be in [0, 1), got {self.drop_rate}")
        if self.attention == "cudnn" and (self.dtype != "bfloat16" or self.drop_rate > 0):
            raise ValueError("attention cudnn needs --dtype bfloat16 and no dropout (--drop-rate 0): use --attention auto or xla")
        optim.check_trainable(self.trainable)
        if not 0 <= self.seed < 2**32:  # NumPy's and pandas' generators take 32-bit seeds (the data order)
            raise ValueError(f"seed must be 0 to 2**32 - 1, got {self.seed}")
        if self.trainable == "lora" and not self.lora_rank:
            raise ValueError("trainable lora trains LoRA adapters: give them a rank, --lora-rank R (e.g. 8)")
        if self.scan_layers not in ("auto", "on", "off"):
            raise ValueError(f"scan-layers must be auto, on or off, got {self.scan_layers!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if devices and self.attention == "cudnn" and jax.default_backend() != "gpu":  # (else a traceback from XLA)
            raise ValueError(f"attention cudnn is NVIDIA's kernel and needs a GPU (this backend: {jax.default_backend()}): use --attention auto")
        mesh = run_mesh(self.mesh) if devices else None  # a mesh that needs more devices than exist: one line, now
        if mesh is not None:
            sharding.check_batch_size(self.batch_size, mesh)


def run_mesh(spec: str | None) -> Mesh | None:
    """The device mesh a run uses: `spec` ("data=4,fsdp=2"), else every device on `data`; None
    (no mesh, no sharding: exactly the one-device program) when that is a single device."""
    if spec is None and jax.device_count() == 1:
        return None
    mesh = sharding.make_mesh(spec)
    return None if mesh.size == 1 else mesh
