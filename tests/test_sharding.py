"""jaxft.sharding and jaxft.distributed: meshes, sharding rules, parity of sharded steps with
one device, memory per device, and two processes on 127.0.0.1 against one.

JAX fixes its device count when it starts, so the many-device checks run in subprocesses
(tests/mesh_worker.py) with XLA_FLAGS=--xla_force_host_platform_device_count=N; each
subprocess runs once per session and the tests read its report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import distributed, sharding

WORKER = Path(__file__).with_name("mesh_worker.py")
REL = 1e-5  # per-step losses, relative


def _env(devices: int) -> dict[str, str]:
    """N CPU devices; LLVM's optimizations off: compiling is most of these tests' time, and
    the comparisons are between programs built with the same flags."""
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- in-process (one device)


def test_parse_mesh():
    assert sharding.parse_mesh("data=8") == {"data": 8, "fsdp": 1}
    assert sharding.parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    assert sharding.parse_mesh(" fsdp = 8 ") == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1}
    assert sharding.parse_mesh(None) == {"data": jax.device_count(), "fsdp": 1}
    assert sharding.describe({"data": 4, "fsdp": 2}) == "data=4,fsdp=2"


@pytest.mark.parametrize(
    "spec, text",
    [
        ("model=2", "mesh 'model=2': unknown axis 'model'; the axes are data and fsdp"),
        ("data=0", "mesh 'data=0': the size of 'data' must be a positive integer, not '0'"),
        ("data=-2", "mesh 'data=-2': the size of 'data' must be a positive integer, not '-2'"),
        ("data=4,data=2", "mesh 'data=4,data=2': axis 'data' is given twice"),
        ("data", "mesh 'data': expected axis=size pairs such as data=4,fsdp=2"),
    ],
)
def test_parse_mesh_errors(spec, text):
    with pytest.raises(ValueError) as error:
        sharding.parse_mesh(spec)
    assert str(error.value) == text


def test_leaf_spec_rule():
    P = jax.sharding.PartitionSpec
    assert sharding.leaf_spec((50257, 768), 8) == P(None, "fsdp")  # 50257 is odd: split d
    assert sharding.leaf_spec((50304, 768), 8) == P("fsdp")  # the largest divisible dimension
    assert sharding.leaf_spec((768, 3072), 8) == P(None, "fsdp")
    assert sharding.leaf_spec((768,), 8) == P()  # vectors stay whole
    assert sharding.leaf_spec((), 8) == P()
    assert sharding.leaf_spec((5, 7), 8) == P()  # nothing divisible
    assert sharding.leaf_spec((768, 768), 8) == P("fsdp")  # a tie: the first
    assert sharding.leaf_spec((768, 3072), 1) == P()


def test_tree_shardings_keep_none_leaves():
    mesh = sharding.make_mesh(None)
    tree = {"a": np.zeros((8, 4), np.float32), "b": None, "c": {"d": None, "e": np.zeros(3)}}
    shardings = sharding.tree_shardings(tree, mesh)
    assert shardings["b"] is None and shardings["c"]["d"] is None
    placed = sharding.shard_tree(tree, mesh)
    assert placed["b"] is None and placed["a"].sharding == shardings["a"]
    assert sum(sharding.bytes_per_device(placed).values()) == 8 * 4 * 4 + 3 * 4


def test_one_device_mesh_and_rows():
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    assert sharding.process_rows(6, mesh) == slice(0, 6)
    batch = sharding.global_batch({"x": np.arange(6, dtype=np.int64)}, mesh)
    assert batch["x"].dtype == np.int32 and batch["x"].shape == (6,)


# ----------------------------------------------------------------------------- 8 devices in one process


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mesh") / "single.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "single", str(out)], env=_env(8), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("task", ["lm", "classification"])
@pytest.mark.parametrize("spec", ["data=8", "data=4,fsdp=2", "fsdp=8"])
def test_parity_with_one_device(eight_devices, task, spec):
    runs = eight_devices["parity"][task]
    base, mesh = runs["one device"], runs[spec]
    np.testing.assert_allclose(mesh["losses"], base["losses"], rtol=REL)
    assert mesh["eval"].keys() == base["eval"].keys()
    for key, value in base["eval"].items():
        assert mesh["eval"][key] == pytest.approx(value, rel=REL)
    assert mesh["state_keeps_shardings"]
    assert mesh["rows"] == [0, 16]


def test_fsdp_memory_bound(eight_devices):
    memory = eight_devices["memory"]
    # Each device: 1/8 of every split matrix (parameters, Adam mu and nu) + every vector whole.
    assert memory["per_device"] == [memory["bound"]] * 8
    assert memory["bound"] == (memory["total"] - memory["replicated"]) // 8 + memory["replicated"]
    specs = memory["specs"]
    assert specs["['wte']['embedding']"] == "P('fsdp',)"
    assert specs["['h_0']['mlp']['c_fc']['kernel']"] == "P(None, 'fsdp')"
    assert specs["['h_0']['ln_1']['scale']"] == "P()"


def test_eight_device_errors(eight_devices):
    errors = eight_devices["errors"]
    assert errors["too_many"] == "ValueError: mesh data=4,fsdp=4 needs 16 devices; 8 are available"
    assert errors["too_few"] == "ValueError: mesh data=4 uses 4 of the 8 devices; the axis sizes must multiply to 8"
    expected = "ValueError: batch size 10 is not divisible by the 8 data-parallel devices (data=4 x fsdp=2)"
    assert errors["batch_size"] == errors["global_batch"] == expected
    assert errors["shard_steps"] == expected.replace("10", "12")


# ----------------------------------------------------------------------------- many processes


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> dict:
    """2 processes x 2 CPU devices (gloo on 127.0.0.1) and 1 process x 4 devices, side by side."""
    tmp = tmp_path_factory.mktemp("hosts")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "hosts", str(tmp / "two"), str(i), "2", str(port)],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    procs.append(
        subprocess.Popen(
            [sys.executable, str(WORKER), "hosts", str(tmp / "one"), "0", "1", "0"],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    read = lambda name: json.loads((tmp / name).read_text())
    return {
        "two": [read("two.0.json"), read("two.1.json")],
        "one": read("one.0.json"),
        "two_params": dict(np.load(tmp / "two.npz")),
        "one_params": dict(np.load(tmp / "one.npz")),
    }


def test_two_processes_match_one(two_hosts):
    p0, p1 = two_hosts["two"]
    one = two_hosts["one"]
    assert p0["devices"] == p1["devices"] == [4, 2] and one["devices"] == [4, 4]
    assert p0["main"] and not p1["main"]
    for task in ("lm", "classification"):
        # Each process loaded only its half of every global batch.
        assert p0[task]["rows"] == [0, 8] and p1[task]["rows"] == [8, 16] and one[task]["rows"] == [0, 16]
        assert p0[task]["losses"] == p1[task]["losses"]
        np.testing.assert_allclose(p0[task]["losses"], one[task]["losses"], rtol=1e-6)
    two, single = two_hosts["two_params"], two_hosts["one_params"]
    assert two.keys() == single.keys()
    # Not bitwise: gloo sums the gradients across processes in another order than one
    # process does (~1e-8 apart after 5 steps), and where a gradient is zero in exact
    # arithmetic (the attention key bias) Adam scales that rounding noise up (~1e-6).
    for key in single:
        np.testing.assert_allclose(two[key], single[key], rtol=0, atol=1e-5, err_msg=key)


def test_processes_that_disagree_name_the_keys(two_hosts):
    p0, p1 = two_hosts["two"]
    text = "DistributedError: the processes disagree on settings: lr (process 0: 0.001, process 1: 0.002)"
    assert p0["disagree"] == p1["disagree"] == text


def _initialize_in_subprocess(process_id: int, port: int, timeout_s: float) -> subprocess.CompletedProcess:
    code = (
        "from jaxft import distributed\n"
        "try:\n"
        f"    distributed.initialize('127.0.0.1:{port}', 2, {process_id}, timeout_s={timeout_s})\n"
        "except distributed.DistributedError as error:\n"
        "    print(error)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(1), cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )


def test_unreachable_coordinator_is_one_line():
    port = _free_port()  # nothing listens there
    proc = _initialize_in_subprocess(1, port, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"cannot reach the coordinator 127.0.0.1:{port} within 2 s\n"


def test_missing_peers_is_one_line_not_a_hang():
    port = _free_port()
    proc = _initialize_in_subprocess(0, port, 2)  # process 0 waits for a process 1 that never comes
    assert proc.returncode == 1
    assert proc.stderr == f"error: not every process reached the coordinator 127.0.0.1:{port} within 2 s\n"


def test_single_process_helpers():
    assert distributed.is_main_process()
    distributed.check_same_settings({"anything": object()})  # one process: nothing to compare
    tree = {"a": jax.numpy.ones(3), "b": None}
    gathered = distributed.gather(tree)
    assert isinstance(gathered["a"], np.ndarray) and gathered["b"] is None
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.initialize("localhost", 2, 1)
    with pytest.raises(ValueError, match=r"must be host:port \(port 1 to 65535\)"):  # else a wait for the whole timeout
        distributed.initialize("127.0.0.1:70000", 2, 1)
    with pytest.raises(ValueError, match="process id 2 is outside 0..1"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    # This process has used JAX already: too late to join a cluster, said in one line.
    with pytest.raises(distributed.DistributedError) as error:
        distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 0, timeout_s=5)
    assert str(error.value).startswith("cannot start the distributed runtime: jax.distributed.initialize() must be")
    assert "\n" not in str(error.value) and "--coordinator" not in str(error.value)


def test_process_flags_without_a_coordinator_say_what_is_missing(tmp_path):
    """--num-processes outside a cluster JAX detects: JAX's own words, and what to pass."""
    result = subprocess.run([sys.executable, "-m", "jaxft", "finetune-classifier", "--out", str(tmp_path / "o"), "--num-processes", "2",
                             "--distributed-timeout", "10"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "jaxft finetune-classifier: error: cannot start the distributed runtime: coordinator_address should be defined; "
        "pass --coordinator HOST:PORT, or run under a cluster JAX detects (SLURM, Open MPI, ...)"), result.stderr[-1000:]
    assert not (tmp_path / "o").exists()
