"""jaxft.checkpoint: orbax checkpoints of a training state, restored bitwise; crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import optim, train
from jaxft.checkpoint import CheckpointMismatch, Checkpointer
from jaxft.config import GPTConfig
from jaxft.model import init_params

CONFIG = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2, num_classes=2, drop_rate=0.1)
REPO = Path(__file__).resolve().parents[1]


def batch(seed: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {
        "tokens": rs.randint(0, CONFIG.vocab_size, (4, 8)).astype(np.int32),
        "labels": rs.randint(0, 2, 4).astype(np.int32),
        "lengths": np.full(4, 8, np.int32),
        "weights": np.ones(4, np.float32),
    }


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(CONFIG, params, "last-block")
    opt = optim.adamw(1e-3, 0.1)
    step, _ = train.make_steps(CONFIG, opt, "classification")
    state = train.init_state(params, mask, opt, seed=3)
    for i in range(3):
        state, _ = step(state, batch(i))
    state = host(state)  # steps donate their input: each test takes its own device copy
    return step, lambda: jax.tree_util.tree_map(jnp.array, state)


def resumable(state: train.TrainState) -> dict:
    """What a run checkpoints: everything but the frozen weights (they come from the base model)."""
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_restore_is_bitwise_and_training_continues_identically(setup, tmp_path):
    step, fresh = setup
    state = fresh()
    saved = host(resumable(state))
    meta = {"epoch": 1, "batch": 3, "history": {"val_losses": [0.5, float("nan")]}, "settings": {"lr": 1e-3}, "data_hash": "abc"}
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(3, resumable(state), meta)
        # the state is donated right away: the background save must not depend on its buffers
        original, _ = step(state, batch(10))
        ckpt.wait()
        assert ckpt.latest_step() == 3
    with Checkpointer(tmp_path / "checkpoints") as ckpt:  # a new process would see the same
        restored, restored_meta = ckpt.restore(None, like=resumable(fresh()))
    assert restored_meta == {**meta, "history": {"val_losses": [0.5, None]}}
    assert_bitwise_equal(host(restored), saved)
    # the frozen weights' None leaves come back as None
    assert sum(x is None for x in jax.tree_util.tree_leaves(restored["trainable"], is_leaf=lambda x: x is None)) > 0

    resumed = train.TrainState(frozen=fresh().frozen, **restored)
    compiled = train.compile_count(step)
    for i in (10, 11, 12):
        resumed, _ = step(resumed, batch(i))
    assert train.compile_count(step) == compiled  # restored like `like`: no recompilation
    continued = original
    for i in (11, 12):
        continued, _ = step(continued, batch(i))
    assert_bitwise_equal(host(resumed), host(continued))


def test_whole_train_state_and_typed_keys(setup, tmp_path):
    state = setup[1]()._replace(rng=jax.random.key(7))  # a new-style typed key
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, state, {})
        restored, meta = ckpt.restore(5, like=state)
    assert isinstance(restored, train.TrainState) and meta == {}
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    assert [x._committed for x in jax.tree_util.tree_leaves(restored)] == [x._committed for x in jax.tree_util.tree_leaves(state)]
    assert_bitwise_equal(host(restored._replace(rng=None)), host(state._replace(rng=None)))
    assert np.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))


def test_restore_into_abstract_like_and_shardings(setup, tmp_path):
    state = setup[1]()
    like = jax.eval_shape(lambda: resumable(state))  # no second copy of the state needed
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, resumable(state), {"epoch": 0})
        restored, _ = ckpt.restore(1, like=like)
    assert_bitwise_equal(host(restored), host(resumable(state)))
    leaf = restored["trainable"]["cls_head"]["kernel"]
    assert leaf.sharding == state.trainable["cls_head"]["kernel"].sharding


def test_keeps_the_newest_and_overwrites_an_abandoned_future(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.zeros((), jnp.int32)}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(s, jax.tree_util.tree_map(lambda x, s=s: x + s, tree), {"step": s})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["3", "4"]
        restored, meta = ckpt.restore(3, like=tree)
        assert meta == {"step": 3} and np.array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 3)
        # continuing from step 3 again: the old step 4 is no longer this run's future
        ckpt.save(4, tree, {"step": "4 again"})
        assert ckpt.restore(None, like=tree)[1] == {"step": "4 again"}
        with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 1"):
            ckpt.restore(1, like=tree)
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(None, like=tree)


def test_a_full_disk_is_one_line_write_error_and_the_earlier_checkpoint_stays(tmp_path, monkeypatch):
    import collections

    from jaxft import checkpoint
    from jaxft.fileio import WriteError

    tree = {"w": jnp.zeros((256, 1024), jnp.float32)}  # 1 MiB of arrays
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, tree, {"step": 1})
        ckpt.wait()
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
        with pytest.raises(WriteError) as info:  # refused before orbax starts writing
            ckpt.save(2, tree, {"step": 2})
        assert str(info.value) == f"{tmp_path}: cannot write: No space left on device: a checkpoint needs about 2.1 MB, 1.0 MB free"
        monkeypatch.undo()

        def fails(*args, **kwargs):  # how TensorStore reports a failed write, through orbax
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/": Failed writing: '
                             '"/x/d/cf8d": Failed to write 20480 bytes to file 5: No space left on device [os_error_code=\'28\']')

        monkeypatch.setattr(ckpt._manager, "save", fails)
        with pytest.raises(WriteError, match=r"^\S+: cannot write: No space left on device$"):
            ckpt.save(2, tree, {"step": 2})
        monkeypatch.undo()
        assert ckpt.all_steps() == [1] and ckpt.restore(None, like=tree)[1] == {"step": 1}


def test_leftovers_of_an_interrupted_save_are_never_latest(tmp_path):
    tree = {"w": jnp.ones(3)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {})
    # what a crash leaves: orbax's temporary directory, and (on filesystems where orbax
    # marks completion with a file instead of a rename) a step directory without the marker
    (tmp_path / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (tmp_path / "2.orbax-checkpoint-tmp" / "state" / "junk").write_bytes(b"\0" * 100)
    (tmp_path / "3" / "state").mkdir(parents=True)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.all_steps() == [1]
        assert np.array_equal(ckpt.restore(None, like=tree)[0]["w"], np.ones(3))
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()  # cleaned up


CRASHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxft.checkpoint import CheckpointMismatch, Checkpointer

    directory, ready = Path(sys.argv[1]), Path(sys.argv[2])
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(1, {"w": jnp.zeros(1000)}, {"step": 1})

    async def stall(self):  # every array of step 2 is written; the commit never comes
        ready.write_text("writing")
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stall
    ckpt.save(2, {"w": jnp.arange(4_000_000, dtype=jnp.float32)}, {"step": 2})
    """
)


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(tmp_path / "ckpt"), str(ready)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp").is_dir()  # the half-finished save is there
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(None, like={"w": jnp.ones(1000)})
    assert meta == {"step": 1} and not np.asarray(restored["w"]).any()


def test_a_differently_shaped_state_is_one_clear_line(tmp_path):
    tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2), jnp.int32)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {})
        cases = {
            "b.c: stored int32[2, 2], expected float32[2, 2]": {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}},
            "a: stored float32[3], expected float32[4]": {"a": jnp.ones(4), "b": tree["b"]},
            "b.c: in the checkpoint, not in the state; d: not in the checkpoint": {"a": jnp.ones(3), "d": jnp.ones(1)},
        }
        for problem, like in cases.items():
            with pytest.raises(CheckpointMismatch) as excinfo:
                ckpt.restore(1, like=like)
            assert str(excinfo.value) == f"{tmp_path / '1'}: does not match the state to restore: {problem}"


def _biggest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def _flip(step_dir: Path) -> None:
    path = _biggest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped-bytes": _flip,
    "missing-file": lambda step_dir: _biggest_array_file(step_dir).unlink(),
    "truncated-file": lambda step_dir: (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))(_biggest_array_file(step_dir)),
    "garbage-record": lambda step_dir: (step_dir / "meta" / "metadata").write_text('{"epoch": 1, "batch'),
    "garbage-array-metadata": lambda step_dir: (step_dir / "state" / "_METADATA").write_text("\0\0 not json"),
    "record-not-an-object": lambda step_dir: (step_dir / "meta" / "metadata").write_text("[1, 2]"),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_one_line_naming_its_step_and_the_others_restore(how, tmp_path, caplog, capfd):
    from jaxft.checkpoint import CorruptCheckpoint

    tree = {"w": jnp.arange(20000, dtype=jnp.float32).reshape(100, 200), "b": {"c": jnp.ones(7, jnp.bfloat16)}, "k": jax.random.key(1)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {"step": 1})
        ckpt.save(2, jax.tree_util.tree_map(lambda x: x, tree), {"step": 2})
    CORRUPTIONS[how](tmp_path / "2")
    capfd.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]  # complete as far as its listing goes
        with pytest.raises(CorruptCheckpoint) as info:
            ckpt.restore(2, like=tree)
        restored, meta = ckpt.restore(1, like=tree)
    message = str(info.value)
    assert message.startswith(f"the checkpoint of step 2 in {tmp_path} is corrupt: ") and "\n" not in message, message
    assert len(message) < 500 and "tensorstore_spec" not in message, message
    assert meta == {"step": 1}  # the digest's key stays inside the checkpoint
    assert_bitwise_equal(host(restored["w"]), host(tree["w"]))
    assert not [r for r in caplog.records if r.levelno >= 40], "orbax logged its traceback"
    assert "Traceback" not in capfd.readouterr().err


def test_the_digest_sees_every_value_name_shape_and_non_finite_value():
    from jaxft.digest import digest

    names = [("a",), ("b",)]
    a, b = np.arange(1000, dtype=np.float32), np.arange(6, dtype=np.int8).reshape(2, 3)
    base, finite = digest(names, [jnp.asarray(a), jnp.asarray(b)])
    assert finite and base == digest(names, [a, b])[0]  # host or device, the same digest
    for i in (0, 499, 999):
        for bit in (0, 31):
            flipped = a.view(np.uint32).copy()
            flipped[i] ^= np.uint32(1 << bit)
            assert digest(names, [flipped.view(np.float32), b])[0] != base
    assert digest(names, [a[::-1].copy(), b])[0] != base  # the same values elsewhere
    assert digest(names, [a, b.reshape(3, 2)])[0] != base  # another shape
    assert digest([("a",), ("c",)], [a, b])[0] != base  # another name
    assert digest(names, [np.where(a == 7, np.nan, a), b])[1] is False


def test_a_background_save_that_fills_the_disk_is_one_line_and_removes_its_leftovers(tmp_path, monkeypatch, caplog, capfd):
    import errno

    from orbax.checkpoint._src.path import atomicity

    from jaxft.fileio import WriteError

    tree = {"w": jnp.ones((64, 64))}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, tree, {"step": 1})
        ckpt.wait()

        async def full(self, *args, **kwargs):  # TensorStore's write failing in orbax's background thread
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
        capfd.readouterr()
        ckpt.save(2, tree, {"step": 2})  # returns: the failure comes in the background
        with pytest.raises(WriteError) as info:
            ckpt.wait()
        monkeypatch.undo()
        assert str(info.value) == f"{tmp_path}: cannot write: No space left on device"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # the partial step 2 removed: its space freed
        assert ckpt.restore(None, like=tree)[1] == {"step": 1}
    assert not [r for r in caplog.records if r.levelno >= 40], "orbax logged its traceback"
    assert "Traceback" not in capfd.readouterr().err


SHARDED_DIGEST = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxft.digest import digest
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
names = [("x",), ("y",), ("z",)]
leaves = [jnp.arange(24 * 6, dtype=jnp.float32).reshape(24, 6), jnp.arange(10, dtype=jnp.int8), jnp.float32(3.0)]
base = digest(names, leaves)
for spec in (P("a", "b"), P("a"), P(None, "b"), P(("a", "b")), P()):
    placed = [jax.device_put(leaves[0], NamedSharding(mesh, spec)), *(jax.device_put(l, NamedSharding(mesh, P())) for l in leaves[1:])]
    assert digest(names, placed) == base, spec
print("ok")
"""


def test_the_digest_is_the_same_on_any_mesh():
    """A checkpoint written on a mesh verifies on one device, and the other way round."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", SHARDED_DIGEST], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
