"""TensorFlow checkpoints without TensorFlow: the tensor-bundle reader/writer and the
OpenAI GPT-2 checkpoint directory, against fixtures written by real TensorFlow
(scripts/make_tf_fixtures.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jaxft.config import GPTConfig
from jaxft.weights import crc32c as crc_impl
from jaxft.weights import tf_bundle
from jaxft.weights.common import WeightsError, expected_shapes, flatten, unflatten
from jaxft.weights.openai import load_openai_checkpoint, save_openai_checkpoint, variable_map
from jaxft.weights.tf_bundle import BundleError, crc32c, list_bundle, read_bundle, read_entries, write_bundle

FIXTURES = Path(__file__).parent / "fixtures"
TF_FIXTURES = ["openai-tiny", "openai-tiny-fp16", "tf-bundle-dtypes"]
DATA = "model.ckpt.data-00000-of-00001"


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as npz:
        return {key: npz[key] for key in npz.files}


def manifest(name: str) -> dict[str, dict]:
    return json.loads((FIXTURES / name / "manifest.json").read_text())["tensors"]


def bits(array: np.ndarray) -> np.ndarray:
    """Raw bits, so that bfloat16 compares with the uint16 copy in reference.npz."""
    array = np.asarray(array)
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# ---------------------------------------------------------------- CRC32C


def test_crc32c_known_vectors():
    assert crc32c(b"123456789", backend="numpy") == 0xE3069283
    assert crc32c(b"", backend="numpy") == 0
    # RFC 3720 (iSCSI) B.4 test vectors
    assert crc32c(bytes(32), backend="numpy") == 0x8A9136AA
    assert crc32c(b"\xff" * 32, backend="numpy") == 0x62A8AB43
    assert crc32c(bytes(range(32)), backend="numpy") == 0x46DD794E
    assert crc_impl.unmask_crc(crc_impl.mask_crc(0xE3069283)) == 0xE3069283
    assert crc_impl.mask_crc(0) == 0xA282EAD8


@pytest.mark.parametrize("size", [1, 63, 64, 129, 3 * 64 + 5, 5000, 70_001, 1_100_003])
def test_crc32c_lanes_match_bytewise(size, monkeypatch):
    monkeypatch.setattr(crc_impl, "_CHUNK", 1 << 19)  # several chunks for the largest size
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    expected = crc_impl._raw_scalar(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    assert crc32c(data, backend="numpy") == expected
    half = size // 2  # extending a running CRC equals one pass
    assert crc32c(data[half:], crc32c(data[:half], backend="numpy"), backend="numpy") == expected


def test_crc32c_fast_backend_dispatch(monkeypatch):
    """An installed C backend (google_crc32c) gets the data as bytes, chunk by chunk."""
    calls = []

    def extend(crc, buf):
        assert isinstance(buf, bytes)
        calls.append(len(buf))
        return crc_impl._crc32c_numpy(np.frombuffer(buf, np.uint8), crc)

    monkeypatch.setattr(crc_impl, "CRC32C_BACKEND", "stand-in")
    monkeypatch.setattr(crc_impl, "_FAST_EXTEND", extend)
    monkeypatch.setattr(crc_impl, "_CHUNK", 1000)
    data = np.random.default_rng(0).integers(0, 256, 3001, dtype=np.uint8)
    assert crc32c(data) == crc32c(data, backend="numpy") == crc32c(data.tobytes(), backend="numpy")
    assert calls == [1000, 1000, 1000, 1]
    with pytest.raises(ValueError, match="backend 'other' is not available"):
        crc32c(data, backend="other")


# ---------------------------------------------------------------- reading TF's files


@pytest.mark.parametrize("name", TF_FIXTURES)
def test_reads_tensorflow_bundle_bit_for_bit(name):
    prefix = FIXTURES / name / "model.ckpt"
    listed = list_bundle(prefix)
    expected = manifest(name)  # TensorFlow's own reader's view
    assert sorted(listed) == sorted(expected)
    for key, (dtype, shape) in listed.items():
        assert str(dtype) == expected[key]["dtype"].replace("half", "float16"), key
        assert list(shape) == expected[key]["shape"], key
    tensors = read_bundle(prefix)
    ref = reference(name)
    assert sorted(tensors) == sorted(ref)
    for key, value in tensors.items():
        assert value.dtype == listed[key][0] and value.shape == listed[key][1], key
        assert bits(value).tobytes() == ref[key].tobytes(), key
        assert not value.flags.writeable  # a view of the read-only mapped file


def test_read_selected_names_and_unknown_name():
    prefix = FIXTURES / "tf-bundle-dtypes" / "model.ckpt"
    got = read_bundle(prefix, ["i64/step", "f32/scalar"])
    assert list(got) == ["i64/step", "f32/scalar"]
    assert int(got["i64/step"]) == 1234567890123 and got["f32/scalar"].shape == ()
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        read_bundle(prefix, ["nope"])


def test_resolve_prefix_follows_checkpoint_file(tmp_path):
    ckpt = copy_fixture("openai-tiny-fp16", tmp_path)
    assert tf_bundle.resolve_prefix(ckpt) == ckpt / "model.ckpt"
    assert tf_bundle.resolve_prefix(ckpt / "model.ckpt.index") == ckpt / "model.ckpt"
    for suffix in (".index", ".data-00000-of-00001"):
        (ckpt / f"model.ckpt{suffix}").rename(ckpt / f"other.ckpt{suffix}")
    # an absolute path from another machine: found here by its base name
    (ckpt / "checkpoint").write_text('model_checkpoint_path: "/gone/elsewhere/other.ckpt"\n')
    assert tf_bundle.resolve_prefix(ckpt) == ckpt / "other.ckpt"
    (ckpt / "checkpoint").unlink()
    assert tf_bundle.resolve_prefix(ckpt) == ckpt / "other.ckpt"  # the only *.index


# ---------------------------------------------------------------- writing


def test_writer_output_is_byte_identical_to_tensorflow(tmp_path):
    for name in TF_FIXTURES:
        tensors = read_bundle(FIXTURES / name / "model.ckpt")
        write_bundle(tmp_path / name / "model.ckpt", tensors)
        for file in ("model.ckpt.index", DATA, "checkpoint"):
            assert (tmp_path / name / file).read_bytes() == (FIXTURES / name / file).read_bytes(), (name, file)


@pytest.mark.parametrize("block_size", [262144, 48])
def test_write_read_round_trip(tmp_path, block_size):
    rng = np.random.default_rng(0)
    tensors = {
        "a/float32": rng.standard_normal((3, 4)).astype(np.float32),
        "a/float16": rng.standard_normal((5,)).astype(np.float16),
        "a/bfloat16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "b/int32": rng.integers(-100, 100, (7,), dtype=np.int32),
        "b/int64": np.array(-(2**40), np.int64),
        "c/empty": np.zeros((0, 4), np.float32),
        "c/big-endian input": np.arange(6, dtype=">f4").reshape(2, 3),
        "c/non-contiguous": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "ünïcode/name": np.ones(3, np.float64),
    }
    tensors.update({f"many/{i:03d}": np.full(2, i, np.float32) for i in range(40)})
    prefix = tmp_path / "out" / "model.ckpt"
    write_bundle(prefix, tensors, block_size=block_size)
    assert (tmp_path / "out" / "checkpoint").read_text().startswith('model_checkpoint_path: "model.ckpt"\n')
    back = read_bundle(prefix)
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        expected = np.asarray(value)
        assert back[key].shape == expected.shape, key
        assert back[key].dtype == expected.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(back[key].astype(np.float64), expected.astype(np.float64), err_msg=key)
    if block_size < 1000:  # the index really is split over many blocks
        table = Path(f"{prefix}.index").read_bytes()
        assert table.count(b"\x00\x00\x00\x00\x01\x00\x00\x00") > 10


def test_writer_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="'s' has dtype <U1"):
        write_bundle(tmp_path / "x", {"s": np.array(["a"])})
    with pytest.raises(ValueError, match="non-empty strings"):
        write_bundle(tmp_path / "x", {"": np.zeros(1)})


# ---------------------------------------------------------------- damaged files


def test_missing_files(tmp_path):
    ckpt = copy_fixture("openai-tiny-fp16", tmp_path)
    (ckpt / DATA).unlink()
    with pytest.raises(FileNotFoundError, match=f"{DATA}: checkpoint data file not found"):
        read_bundle(ckpt / "model.ckpt")
    (ckpt / "model.ckpt.index").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt\.index: checkpoint index file not found"):
        read_bundle(ckpt / "model.ckpt")
    with pytest.raises(FileNotFoundError, match=r"no TensorFlow checkpoint \(model\.ckpt\.index\) found"):
        load_openai_checkpoint(ckpt)


def test_truncated_data_file(tmp_path):
    ckpt = copy_fixture("openai-tiny", tmp_path)
    data = ckpt / DATA
    entries = read_entries(ckpt / "model.ckpt")[1]
    cut = entries["model/wte"].offset + 10  # in the middle of the last tensor
    data.write_bytes(data.read_bytes()[:cut])
    with pytest.raises(BundleError, match=rf"{DATA}: tensor 'model/wte' needs bytes .* the file has {cut} \(truncated"):
        read_bundle(ckpt / "model.ckpt")
    with pytest.raises(BundleError, match="model/wte"):
        load_openai_checkpoint(ckpt)


def test_flipped_data_byte_fails_checksum(tmp_path):
    ckpt = copy_fixture("openai-tiny", tmp_path)
    data = bytearray((ckpt / DATA).read_bytes())
    entry = read_entries(ckpt / "model.ckpt")[1]["model/h1/mlp/c_fc/w"]
    data[entry.offset + 17] ^= 0x01
    (ckpt / DATA).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{DATA}: checksum mismatch for tensor 'model/h1/mlp/c_fc/w'"):
        read_bundle(ckpt / "model.ckpt")
    got = read_bundle(ckpt / "model.ckpt", verify=False)  # explicitly unchecked reads still work
    assert got["model/h1/mlp/c_fc/w"].tobytes() != reference("openai-tiny")["model/h1/mlp/c_fc/w"].tobytes()


def test_damaged_index(tmp_path):
    ckpt = copy_fixture("openai-tiny", tmp_path)
    index = ckpt / "model.ckpt.index"
    good = index.read_bytes()
    flipped = bytearray(good)
    flipped[40] ^= 0x20  # inside the data block
    index.write_bytes(bytes(flipped))
    with pytest.raises(BundleError, match=r"model\.ckpt\.index: checksum mismatch in data block"):
        list_bundle(ckpt / "model.ckpt")
    index.write_bytes(good[:-1] + b"\x00")
    with pytest.raises(BundleError, match=r"model\.ckpt\.index: bad magic number"):
        list_bundle(ckpt / "model.ckpt")
    index.write_bytes(good[:20])
    with pytest.raises(BundleError, match="too short"):
        list_bundle(ckpt / "model.ckpt")


# ---------------------------------------------------------------- the OpenAI checkpoint


def numpy_gpt2(tf: dict[str, np.ndarray], hparams: dict[str, int], tokens: np.ndarray) -> np.ndarray:
    """GPT-2 straight from OpenAI's model.py, on the TF variable names (float64)."""
    tf = {k: v.astype(np.float64) for k, v in tf.items()}

    def norm(x, scope):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * tf[f"{scope}/g"] + tf[f"{scope}/b"]

    def conv1d(x, scope):
        return x @ tf[f"{scope}/w"][0] + tf[f"{scope}/b"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    heads, seq = hparams["n_head"], tokens.shape[1]
    x = tf["model/wte"][tokens] + tf["model/wpe"][np.arange(seq)]
    causal = np.tril(np.ones((seq, seq)))
    for i in range(hparams["n_layer"]):
        h = f"model/h{i}"
        q, k, v = np.split(conv1d(norm(x, f"{h}/ln_1"), f"{h}/attn/c_attn"), 3, axis=-1)
        split = lambda t: t.reshape(t.shape[0], seq, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        w = w * causal - 1e10 * (1 - causal)
        w = np.exp(w - w.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + conv1d(a, f"{h}/attn/c_proj")
        x = x + conv1d(gelu(conv1d(norm(x, f"{h}/ln_2"), f"{h}/mlp/c_fc")), f"{h}/mlp/c_proj")
    return norm(x, "model/ln_f") @ tf["model/wte"].T


@pytest.mark.parametrize("name", ["openai-tiny", "openai-tiny-fp16"])
def test_load_openai_checkpoint_logits(name):
    from jaxft.model import logits

    hparams = json.loads((FIXTURES / name / "hparams.json").read_text())
    config, params = load_openai_checkpoint(FIXTURES / name)
    assert config.to_hparams() == hparams
    assert config.tie_embeddings and config.num_classes is None and "lm_head" not in params
    ref = reference(name)
    np.testing.assert_array_equal(params["h_0"]["attn"]["c_attn"]["kernel"], ref["model/h0/attn/c_attn/w"][0])
    np.testing.assert_array_equal(params["ln_f"]["scale"], ref["model/ln_f/g"])
    assert all(leaf.dtype == np.float32 for leaf in _leaves(params))
    tokens = np.random.default_rng(1).integers(0, hparams["n_vocab"], (2, hparams["n_ctx"]))
    got = np.asarray(logits(config, params, tokens))
    assert got.shape == (2, hparams["n_ctx"], hparams["n_vocab"])
    np.testing.assert_allclose(got, numpy_gpt2(ref, hparams, tokens), atol=2e-5, rtol=1e-5)


def _leaves(tree):
    for value in tree.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]


def _rewrite(ckpt: Path, change) -> None:
    tensors = {k: np.array(v) for k, v in read_bundle(ckpt / "model.ckpt").items()}
    change(tensors)
    write_bundle(ckpt / "model.ckpt", tensors)


def test_missing_extra_and_misshapen_variables(tmp_path):
    ckpt = copy_fixture("openai-tiny", tmp_path)
    good = {k: np.array(v) for k, v in read_bundle(ckpt / "model.ckpt").items()}
    index = r"openai-tiny/model\.ckpt\.index"

    _rewrite(ckpt, lambda t: t.pop("model/h1/ln_2/b"))
    with pytest.raises(WeightsError, match=rf"{index}: missing variable\(s\) 'model/h1/ln_2/b' required by hparams.json"):
        load_openai_checkpoint(ckpt)

    _rewrite(ckpt, lambda t: t.update({**good, "model/h2/ln_1/g": np.ones(8, np.float32)}))
    with pytest.raises(WeightsError, match=rf"{index}: unexpected variable\(s\) 'model/h2/ln_1/g'"):
        load_openai_checkpoint(ckpt)

    _rewrite(ckpt, lambda t: (t.clear(), t.update({**good, "model/ln_f/b": good["model/ln_f/b"].astype(np.int32)})))
    with pytest.raises(WeightsError, match=rf"{index}: variable 'model/ln_f/b' has dtype int32, expected float32"):
        load_openai_checkpoint(ckpt)

    _rewrite(ckpt, lambda t: (t.clear(), t.update(good)))
    hparams = json.loads((ckpt / "hparams.json").read_text())
    (ckpt / "hparams.json").write_text(json.dumps({**hparams, "n_ctx": 17}))
    with pytest.raises(WeightsError, match=rf"{index}: variable 'model/wpe' has shape \(16, 8\), but hparams.json implies \(17, 8\)"):
        load_openai_checkpoint(ckpt)

    (ckpt / "hparams.json").write_text(json.dumps({**hparams, "n_head": 3}))
    with pytest.raises(WeightsError, match=r"hparams\.json: .*divisible by n_heads"):
        load_openai_checkpoint(ckpt)

    (ckpt / "hparams.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"hparams\.json: file not found"):
        load_openai_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_openai_checkpoint(tmp_path / "nowhere")


def random_params(config: GPTConfig, seed: int = 0) -> dict:
    """Parameters of the right names and shapes (NumPy: no jit compile needed)."""
    rng = np.random.default_rng(seed)
    flat = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in expected_shapes(config).items()}
    return unflatten(flat)


def test_save_then_load_round_trip(tmp_path):
    config = GPTConfig(vocab_size=40, context_length=12, emb_dim=16, n_layers=2, n_heads=4)
    params = random_params(config)
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    for file in ("encoder.json", "vocab.bpe"):
        (vocab / file).write_text(f"fake {file}")
    out = save_openai_checkpoint(config, params, tmp_path / "ckpt", vocab_dir=vocab)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.index", DATA, "vocab.bpe"]
    )
    assert (out / "vocab.bpe").read_text() == "fake vocab.bpe"
    assert json.loads((out / "hparams.json").read_text()) == config.to_hparams()
    listed = list_bundle(out / "model.ckpt")
    assert set(listed) == set(variable_map(config))
    assert listed["model/h1/mlp/c_fc/w"] == (np.dtype(np.float32), (1, 16, 64))

    loaded_config, loaded = load_openai_checkpoint(out)
    assert loaded_config.to_hparams() == config.to_hparams() and loaded_config.tie_embeddings
    flat_a, flat_b = flatten(params), flatten(loaded)
    assert sorted(flat_a) == sorted(flat_b)
    for key, value in flat_a.items():
        np.testing.assert_array_equal(value, flat_b[key], err_msg=key)


def test_save_fp16_and_without_qkv_bias(tmp_path):
    config = GPTConfig(vocab_size=20, context_length=4, emb_dim=8, n_layers=1, n_heads=2, qkv_bias=False)
    params = random_params(config, seed=1)
    save_openai_checkpoint(config, params, tmp_path, dtype="float16")
    assert list_bundle(tmp_path / "model.ckpt")["model/wte"][0] == np.float16
    loaded_config, loaded = load_openai_checkpoint(tmp_path)
    assert loaded_config.qkv_bias  # the format always has the bias: zeros, the same function
    np.testing.assert_array_equal(loaded["h_0"]["attn"]["c_attn"]["bias"], np.zeros(24, np.float32))
    expected = params["wte"]["embedding"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(loaded["wte"]["embedding"], expected)


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    base = GPTConfig(vocab_size=20, context_length=4, emb_dim=8, n_layers=1, n_heads=2)
    for config, message in [
        (base.replace(tie_embeddings=False), "ties the output head to wte"),
        (base.replace(num_classes=2), r"no classification head \(num_classes=2\)"),
    ]:
        with pytest.raises(WeightsError, match=message):
            save_openai_checkpoint(config, random_params(config), tmp_path / "x")
    params = random_params(base)
    params["h_0"]["mlp"]["c_fc"]["kernel"] = np.zeros((8, 31), np.float32)
    with pytest.raises(WeightsError, match=r"h_0/mlp/c_fc/kernel has shape \(8, 31\), expected \(8, 32\)"):
        save_openai_checkpoint(base, params, tmp_path / "y")
    del params["h_0"]["mlp"]["c_fc"]["kernel"]
    with pytest.raises(WeightsError, match=r"missing parameter\(s\): h_0/mlp/c_fc/kernel"):
        save_openai_checkpoint(base, params, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-written


def test_public_api_reads_and_writes_openai_tf(tmp_path):
    import jaxft

    config, params = jaxft.load(FIXTURES / "openai-tiny")
    assert config.to_hparams()["n_layer"] == 2
    jaxft.export(config, params, tmp_path / "again", "openai-tf")
    for file in ("model.ckpt.index", DATA):  # float32 in, float32 out: the same bytes as TF wrote
        assert (tmp_path / "again" / file).read_bytes() == (FIXTURES / "openai-tiny" / file).read_bytes()


def test_make_tf_fixtures_loads_tf_bundle_without_jax(tmp_path):
    """scripts/make_tf_fixtures.py runs in a TensorFlow environment without jax: the bundle
    modules it loads must import, write and read with jax unimportable."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tf_fixtures.py"
    prefix = tmp_path / "model.ckpt"
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np
        sys.modules["jax"] = None  # any import of jax now raises ImportError
        spec = importlib.util.spec_from_file_location("make_tf_fixtures", {str(script)!r})
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        tb = script.load_tf_bundle()
        tb.write_bundle({str(prefix)!r}, {{"a": np.arange(3.0)}})
        assert tb.read_bundle({str(prefix)!r})["a"].tolist() == [0.0, 1.0, 2.0]
        assert tb.crc32c(b"123456789") == 0xE3069283
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
