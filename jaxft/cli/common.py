"""What every command shares: the user-error type, exit codes, argparse value types."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import typing
from pathlib import Path
from typing import Any, Iterator

import jax

from .. import distributed, interrupts
from ..fileio import check_writable
from ..recipes.common import check_model
from ..rundir import check, claim
from ..resume import Interrupted, TrainingStopped

from .commands import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE  # noqa: F401 (their home before)


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def on_off(value: str) -> bool:
    """argparse type for on/off flags (1/0, true/false, yes/no, on/off)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")


# --------------------------------------------------------------------------- flags from settings


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(int|float|str|bool, optional?) of a field annotation such as `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # a union with None
        return args[0], True
    return annotation, False


def settings_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every leaf setting of a settings dataclass; nested settings
    dataclasses (e.g. `trainer`) are walked into, in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += settings_fields(hints[f.name])
        else:
            out.append((f, hints[f.name]))
    return out


def _leaf_defaults(defaults: Any) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        values.update(_leaf_defaults(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return values


def add_settings_arguments(parser: argparse.ArgumentParser, defaults: Any, groups: dict[str, str]) -> None:
    """One flag per setting of the dataclass instance `defaults` (nested ones included): name
    `--field-name`, type, default and help from the field. `groups` maps a field's `group`
    metadata to the help section's title. A bool that defaults to False is a switch
    (`--export-pth`), one that defaults to True a `--no-...` switch, an optional bool takes on/off."""
    sections = {key: parser.add_argument_group(title) for key, title in groups.items()}
    values = _leaf_defaults(defaults)
    for f, annotation in settings_fields(type(defaults)):
        meta = dict(f.metadata)
        group = meta.pop("group", "training")
        if group not in sections:  # a group the command does not title: its own section
            sections[group] = parser.add_argument_group(group)
        section = sections[group]
        help_text = meta.pop("help", None)
        flag = "--" + f.name.replace("_", "-")
        kind, optional = _base_type(annotation)
        default = values[f.name]
        if kind is bool and not optional:
            if default:  # (its default, True, comes from the parser: help shows no "(default: True)" beside --no-)
                parser.set_defaults(**{f.name: True})
                section.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                     default=argparse.SUPPRESS, help=f"turn off: {help_text}" if help_text else None)
            else:
                section.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        arg_type = meta.pop("type", on_off if kind is bool else kind)
        section.add_argument(flag, dest=f.name, type=arg_type, default=default, help=help_text, **meta)


def settings_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build the settings dataclass `cls` (nested ones included) from parsed flags."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = settings_from_args(hints[f.name], args)
        else:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def add_recipe_command(subparsers: Any, name: str, help_text: str, defaults: Any, groups: dict[str, str], out_help: str) -> argparse.ArgumentParser:
    """A fine-tuning command: one flag per setting of `defaults` (a recipe's settings), plus
    the vocabulary directory and the output directory every recipe takes."""
    parser = subparsers.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings_arguments(parser, defaults, groups)
    data = next(g for g in parser._action_groups if g.title == groups["data"])
    data.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe (default: $JAXFT_GPT2_VOCAB, else the bundled copy)")
    parser.add_argument("--out", required=True, help=out_help)
    add_run_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument(
        "--compile-cache", default=str(default_compile_cache()), metavar="DIR",
        help="JAX's persistent compilation cache, so a rerun does not recompile ('off' to disable)",
    )
    return parser


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Multi-host flags (jax.distributed): without them, one process; on a cluster JAX knows
    (SLURM, ...), `--num-processes` alone lets JAX detect the rest."""
    group = parser.add_argument_group("processes (one per host; see README 'Multiple devices and hosts')")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    group.add_argument("--distributed-timeout", type=float, default=300.0, help="seconds to wait for every process to join")


def start_processes(args: argparse.Namespace) -> int:
    """Join the other processes when asked (before JAX touches a device); how many there are."""
    if any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes", "process_id")):
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.distributed_timeout)
        return jax.process_count()
    return 1


def default_compile_cache() -> Path:
    """The user's cache directory for compiled programs ($XDG_CACHE_HOME or ~/.cache)/jaxft/jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxft" / "jax"


def use_compile_cache(directory: str | None) -> None:
    """Point JAX's persistent compilation cache at `directory` ('off' or None: leave it off).
    Every compiled step is cached, however quick its compile, so a rerun starts at once."""
    if directory is None or directory == "off":
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # also the GPU autotuning results (XLA's per-fusion cache, beside the programs), where this JAX has the option
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    except AttributeError:  # (an older JAX: no such option)
        pass


# --------------------------------------------------------------------------- run directories


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and --overwrite: how to use an --out that already holds a run (not settings)."""
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out (only a directory holding a jaxft run is cleared)")


def flat_settings(recipe: Any) -> dict[str, Any]:
    """A settings dataclass's leaf settings by name (what run.json records and compares)."""
    return _leaf_defaults(recipe)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run."""
    argv = [a for a in getattr(args, "argv", None) or [] if a not in ("--resume", "--overwrite")]
    return "jaxft " + shlex.join([*argv, "--resume"])


def require_torch(flag: str = "--export-pth") -> None:
    """A one-line error now, where `flag` would need PyTorch only at the end of a run."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CLIError(f"{flag} writes the reference's .pth file, which needs PyTorch (pip install torch); install it or drop {flag}") from None


def check_before_work(args: argparse.Namespace, recipe: Any) -> None:
    """What a fine-tuning command checks before it reads data or builds a model, so that a
    mistake costs nothing and creates nothing: the settings' ranges, whether --out may be
    used as asked (jaxft.rundir's rules: an existing file, --resume on nothing, --resume
    with --overwrite, a used directory), whether it can be written (a path component that
    is a file, no permission: exit 1), the model's name or path, and PyTorch for --export-pth."""
    recipe.validate()
    # Several processes: the same settings and the same --resume/--overwrite everywhere, checked
    # before process 0 touches --out (one --overwrite would wipe what the others resume from).
    distributed.check_same_settings({**flat_settings(recipe), "resume": bool(args.resume), "overwrite": bool(args.overwrite)})

    def check_out() -> None:  # process 0 owns --out; the others may find it already taken
        check_writable(args.out, directory=True)  # first: a directory on the way that may not be searched is named
        check(args.out, command=args.command, settings=flat_settings(recipe), resume=args.resume, overwrite=args.overwrite)

    distributed.on_main(check_out, "checking --out")
    check_model(recipe.trainer.model, init=recipe.trainer.init)
    if recipe.trainer.export_pth:
        require_torch()


class LazyRun:
    """Claims --out (jaxft.rundir) when `claim()` is called: after the data and settings
    checks, before any training, so that a mistake leaves no directory behind."""

    def __init__(self, args: argparse.Namespace, recipe: Any, then: Any = None) -> None:
        self.args, self.recipe, self.then = args, recipe, then
        self.run: Any = None

    def claim(self) -> Any:
        """Take the directory; returns its checkpoint directory (for train.fit). With several
        processes, process 0 owns the directory (run.json, outputs); the others wait until it
        has taken it, then share its checkpoint directory (orbax writes every process's shards)."""
        args = self.args
        interrupts.check()  # a signal while the data and the model loaded: stop before --out is taken

        def take() -> None:
            self.run = claim(args.out, command=args.command, settings=flat_settings(self.recipe), resume=args.resume,
                             overwrite=args.overwrite, argv=getattr(args, "argv", None))
            if self.then is not None:
                self.then()

        distributed.on_main(take, f"taking {args.out}")  # no process left waiting if it fails
        return Path(args.out) / "checkpoints" if self.run is None else self.run.checkpoints


@contextlib.contextmanager
def claimed_run(args: argparse.Namespace, recipe: Any, then: Any = None) -> Iterator[LazyRun]:
    """Yields a LazyRun whose `claim` the recipe calls just before training; once claimed,
    how the run ends is recorded in run.json: completed, failed (with the reason) or
    interrupted. An interruption is re-raised with the command that resumes it."""
    lazy = LazyRun(args, recipe, then)
    try:
        yield lazy
        interrupts.check()  # a signal after the run's last safe point: not recorded as completed
    except Interrupted as exc:
        if lazy.run is not None:
            lazy.run.mark("interrupted", str(exc))
            if exc.checkpointed:
                exc.args = (f"{exc}; resume with: {resume_command(args)}",)
        raise
    except TrainingStopped as exc:
        if lazy.run is not None:
            lazy.run.mark("failed", str(exc))
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or a signal outside the training steps (interrupts.Terminated)
        if lazy.run is not None:
            lazy.run.mark("interrupted", str(exc) or "KeyboardInterrupt")
            if lazy.run.latest_checkpoint() is not None:
                exc.resume = resume_command(args)
        raise
    except BaseException as exc:
        if lazy.run is not None:
            lazy.run.mark("failed", " ".join(str(exc).split()) or type(exc).__name__)
        raise
    else:
        if lazy.run is not None:
            lazy.run.mark("completed")
    finally:
        if lazy.run is not None:
            lazy.run.release()
