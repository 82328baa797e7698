#!/usr/bin/env python3
"""Generate the TensorFlow checkpoint fixtures in tests/fixtures with REAL TensorFlow.

TensorFlow is not a jaxft dependency: this script runs in its own virtual environment
outside the repository, created on first use:

    python3 scripts/make_tf_fixtures.py            # creates /tmp/tfvenv if needed, re-runs in it

It writes, with `tf.compat.v1.train.Saver` as OpenAI did:

* openai-tiny/       a tiny float32 GPT-2 with OpenAI's variable names and shapes
                     (n_vocab 96, n_ctx 16, n_embd 8, n_head 2, n_layer 2), plus model.ckpt.meta;
* openai-tiny-fp16/  another shape (n_vocab 50, n_ctx 8, n_embd 12, n_head 3, n_layer 1) in float16;
* tf-bundle-dtypes/  a plain bundle of other dtypes (bfloat16, float64, int32, int64, uint8,
                     bool), a scalar and an empty tensor;

each with `reference.npz` (the same values; bfloat16 stored as its uint16 bits) and
`manifest.json` (dtype and shape of every tensor as TensorFlow's own reader reports them).

Then it checks the other direction: bundles written by jaxft's `tf_bundle.write_bundle`
(loaded by path, without jax) are read back by `tf.train.load_checkpoint` and restored by a
`Saver`, bit for bit, and are byte-identical to TensorFlow's own files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures"
DEFAULT_VENV = Path("/tmp/tfvenv")


def ensure_tensorflow(venv: Path) -> None:
    """Re-run this script inside a venv with tensorflow-cpu unless TensorFlow imports here."""
    try:
        import tensorflow  # noqa: F401

        return
    except ImportError:
        pass
    python = venv / "bin" / "python"
    if os.environ.get("JAXFT_TF_FIXTURES_REEXEC"):
        sys.exit(f"tensorflow does not import in {sys.executable}; delete {venv} and retry")
    if not python.exists():
        print(f"creating {venv} with tensorflow-cpu (outside the repository; not a jaxft dependency)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "tensorflow-cpu", "numpy"], check=True)
    os.environ["JAXFT_TF_FIXTURES_REEXEC"] = "1"
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


def load_tf_bundle():
    """jaxft.weights.tf_bundle without jax: it and the modules it imports (crc32c, tf_index,
    fileio) need only NumPy, but jaxft's package __init__ files import jax. Stand-ins for the two
    packages (empty modules with the right __path__) let its relative imports resolve."""
    for name, path in (("jaxft", REPO / "jaxft"), ("jaxft.weights", REPO / "jaxft" / "weights")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    return importlib.import_module("jaxft.weights.tf_bundle")


def gpt2_tensors(hparams: dict[str, int], seed: int, dtype) -> dict[str, np.ndarray]:
    """Random values under OpenAI's variable names and shapes."""
    rng = np.random.default_rng(seed)
    d, v, ctx = hparams["n_embd"], hparams["n_vocab"], hparams["n_ctx"]

    def normal(shape, std=0.2, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(dtype)

    out = {"model/wte": normal((v, d)), "model/wpe": normal((ctx, d), 0.1)}
    for i in range(hparams["n_layer"]):
        h = f"model/h{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{h}/{ln}/g"] = normal((d,), 0.1, 1.0)
            out[f"{h}/{ln}/b"] = normal((d,), 0.1)
        for name, n_in, n_out in (("attn/c_attn", d, 3 * d), ("attn/c_proj", d, d), ("mlp/c_fc", d, 4 * d), ("mlp/c_proj", 4 * d, d)):
            out[f"{h}/{name}/w"] = normal((1, n_in, n_out))
            out[f"{h}/{name}/b"] = normal((n_out,), 0.05)
    out["model/ln_f/g"] = normal((d,), 0.1, 1.0)
    out["model/ln_f/b"] = normal((d,), 0.1)
    return out


def dtype_tensors(seed: int) -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(seed)
    return {
        "bf16/weights": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "f64/values": rng.standard_normal((3, 2, 2)),
        "f32/empty": np.zeros((0, 3), np.float32),
        "f32/scalar": np.array(3.25, np.float32),
        "i32/ids": rng.integers(-(2**31), 2**31 - 1, (4, 3), dtype=np.int32),
        "i64/step": np.array(1234567890123, np.int64),
        "i64/table": rng.integers(-(2**62), 2**62, (6,), dtype=np.int64),
        "u8/bytes": rng.integers(0, 256, (17,), dtype=np.uint8),
        "bool/mask": rng.integers(0, 2, (9,)).astype(bool),
    }


def build_graph(tf, tensors: dict[str, np.ndarray]):
    """Variables with exactly these names, filled through placeholders (so the graph,
    and its .meta file, holds no values), and a Saver over them."""
    variables, feeds, assigns = [], {}, []
    for name, value in tensors.items():
        tf_dtype = tf.as_dtype(value.dtype)
        var = tf.compat.v1.get_variable(name, shape=value.shape, dtype=tf_dtype, initializer=tf.compat.v1.zeros_initializer())
        ph = tf.compat.v1.placeholder(tf_dtype, shape=value.shape)
        assigns.append(var.assign(ph))
        feeds[ph] = value
        variables.append(var)
    saver = tf.compat.v1.train.Saver(variables, save_relative_paths=True)
    return variables, feeds, assigns, saver


def tf_save(tf, tensors: dict[str, np.ndarray], ckpt_dir: Path, meta: bool) -> None:
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        _, feeds, assigns, saver = build_graph(tf, tensors)
        sess.run(tf.compat.v1.global_variables_initializer())
        sess.run(assigns, feed_dict=feeds)
        saver.save(sess, str(ckpt_dir / "model.ckpt"), write_meta_graph=meta)


def tf_restore(tf, tensors: dict[str, np.ndarray], prefix: Path) -> dict[str, np.ndarray]:
    """Restore `prefix` into a fresh graph of the same variables with a Saver, as TF users would."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        variables, _, _, saver = build_graph(tf, tensors)
        saver.restore(sess, str(prefix))
        return {name: value for name, value in zip(tensors, sess.run(variables))}


def tf_view(tf, prefix: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    return {name: (dtypes[name].name, list(shapes[name]), reader.get_tensor(name)) for name in sorted(shapes)}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes()


def reference_arrays(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # npz cannot hold ml_dtypes types portably: bfloat16 goes in as its raw uint16 bits.
    return {k: (v.view(np.uint16) if v.dtype.name == "bfloat16" else v) for k, v in tensors.items()}


def make_fixture(tf, tb, out: Path, name: str, tensors, hparams=None, meta=False) -> None:
    ckpt_dir = out / name
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    tf_save(tf, tensors, ckpt_dir, meta)
    if hparams is not None:
        (ckpt_dir / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
    np.savez(ckpt_dir / "reference.npz", **reference_arrays(tensors))
    view = tf_view(tf, ckpt_dir / "model.ckpt")
    rows = ",\n".join(f'  {json.dumps(k)}: {{"dtype": "{dtype}", "shape": {shape}}}' for k, (dtype, shape, _) in view.items())
    header = f'"generator": "scripts/make_tf_fixtures.py", "tensorflow": "{tf.__version__}"'
    (ckpt_dir / "manifest.json").write_text(f'{{{header},\n "tensors": {{\n{rows}\n }}\n}}\n')
    json.loads((ckpt_dir / "manifest.json").read_text())
    # Our reader on TF's files: the same names, dtypes, shapes and bits.
    ours = tb.read_bundle(ckpt_dir / "model.ckpt")
    assert sorted(ours) == sorted(view), f"{name}: tensor names differ"
    for key, (dtype, shape, value) in view.items():
        assert ours[key].dtype.name == dtype.replace("half", "float16"), (key, ours[key].dtype, dtype)
        assert list(ours[key].shape) == shape and same_bits(ours[key], value), key
    sizes = {p.name: p.stat().st_size for p in sorted(ckpt_dir.iterdir())}
    print(f"{name}: {sum(sizes.values()):,} bytes " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


def check_our_writer(tf, tb, name: str, tensors: dict[str, np.ndarray], tf_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for block_size in (262144, 64):  # TF's default, and tiny blocks for a multi-block index
            prefix = Path(tmp) / f"b{block_size}" / "model.ckpt"
            tb.write_bundle(prefix, tensors, block_size=block_size)
            view = tf_view(tf, prefix)  # TensorFlow checks every tensor's CRC32C as it reads
            assert sorted(view) == sorted(tensors), f"{name}: TF sees other names"
            for key, (_, shape, value) in view.items():
                assert list(tensors[key].shape) == shape and same_bits(value, tensors[key]), f"{name}: {key} differs in TF"
            restored = tf_restore(tf, tensors, prefix)
            assert all(same_bits(restored[k], tensors[k]) for k in tensors), f"{name}: Saver.restore differs"
            data_blocks = _count_data_blocks(prefix)
            if block_size == 262144:
                for suffix in (".index", ".data-00000-of-00001"):
                    identical = Path(f"{prefix}{suffix}").read_bytes() == (tf_dir / f"model.ckpt{suffix}").read_bytes()
                    assert identical, f"{name}: our model.ckpt{suffix} differs from TensorFlow's"
                same_state = (prefix.parent / "checkpoint").read_text() == (tf_dir / "checkpoint").read_text()
                assert same_state, f"{name}: our checkpoint file differs from TensorFlow's"
            print(f"  our writer (index blocks of {block_size} B -> {data_blocks} data block(s)): "
                  f"TF load_checkpoint + Saver.restore read all {len(tensors)} tensors bit for bit"
                  + ("; files byte-identical to TF's" if block_size == 262144 else ""))


def _count_data_blocks(prefix: Path) -> int:
    index = importlib.import_module("jaxft.weights.tf_index")  # loaded by load_tf_bundle
    table = Path(f"{prefix}.index").read_bytes()
    _, pos = index._read_handle(table[-48:], 0, "footer")
    index_handle, _ = index._read_handle(table[-48:], pos, "footer")
    return sum(1 for _ in index._block_entries(index._read_block(table, index_handle, prefix, "index"), prefix, "index"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory (default tests/fixtures)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv for tensorflow-cpu (default /tmp/tfvenv)")
    parser.add_argument("--fast-crc", action="store_true", help="let tf_bundle use google_crc32c if installed")
    args = parser.parse_args()
    ensure_tensorflow(args.venv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    tb = load_tf_bundle()
    crc = importlib.import_module("jaxft.weights.crc32c")
    if not args.fast_crc:
        crc.CRC32C_BACKEND = "numpy"  # check the pure implementation against TensorFlow's
    print(f"TensorFlow {tf.__version__}; CRC32C backend of tf_bundle: {crc.CRC32C_BACKEND}")

    tiny = {"n_vocab": 96, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
    tiny16 = {"n_vocab": 50, "n_ctx": 8, "n_embd": 12, "n_head": 3, "n_layer": 1}
    fixtures = [
        ("openai-tiny", gpt2_tensors(tiny, seed=20190214, dtype=np.float32), tiny, True),
        ("openai-tiny-fp16", gpt2_tensors(tiny16, seed=1558, dtype=np.float16), tiny16, False),
        ("tf-bundle-dtypes", dtype_tensors(seed=7), None, False),
    ]
    total = 0
    for name, tensors, hparams, meta in fixtures:
        make_fixture(tf, tb, args.out, name, tensors, hparams, meta)
        check_our_writer(tf, tb, name, tensors, args.out / name)
        total += sum(p.stat().st_size for p in (args.out / name).iterdir())
    print(f"total fixture size: {total:,} bytes")


if __name__ == "__main__":
    main()
