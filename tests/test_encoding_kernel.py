"""The C kernel of SoftEncoder (pretext/csrc/soft_encode.c via pretext.encoding_kernel): equal to the torch path
(itself checked against brute-force k-NN in test_encoding.py) in every build and threading mode, and a clean
fallback where it cannot be built."""
import copy
import os
import warnings

import pytest
import torch

from pretext import encoding, encoding_kernel
from pretext.encoding import SoftEncoder, load_bins

pytestmark = pytest.mark.skipif(encoding_kernel._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded kernel; restored afterwards."""
    monkeypatch.setenv("CROSSCHANNEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(encoding, "_warned", [])
    encoding_kernel.reset()
    yield tmp_path / "cache"
    encoding_kernel.reset()


def _ab(shape=(2, 2, 40, 37), seed=0, scale=300.0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * scale - scale / 2


def _assert_same_encoding(ours, ref, atol=2e-5):
    """Same bins (random inputs have no exact ties) and weights / distances within float32 rounding."""
    assert ours[0].dtype == torch.int64 and ours[1].dtype == torch.float32
    assert torch.equal(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_kernel_equals_torch_path(k):
    ab = torch.cat([_ab(), _photo_like()])
    nat, ref = SoftEncoder(load_bins(), k=k, backend="native"), SoftEncoder(load_bins(), k=k, backend="torch")
    _assert_same_encoding(nat(ab), ref(ab))
    _assert_same_encoding(nat.knn(ab), ref.knn(ab), atol=4e-3)  # squared distances up to ~1e5: float32 rounding


def _photo_like():
    """Near-neutral colours (grey pixels sit on bisectors through bin (0, 0)) and saturated ones."""
    g = torch.Generator().manual_seed(1)
    grey = torch.randn(1, 2, 40, 37, generator=g) * 1e-4
    sat = torch.randn(1, 2, 40, 37, generator=g) * 30
    return torch.cat([grey, sat])


def test_portable_build_equals_sse_build(monkeypatch, fresh_kernel):
    ab = torch.cat([_ab(), _photo_like()])
    ref = SoftEncoder(load_bins(), k=5, backend="native")(ab)
    monkeypatch.setenv("CROSSCHANNEL_NATIVE_CFLAGS", "-DCC_PORTABLE")
    encoding_kernel.reset()
    portable = SoftEncoder(load_bins(), k=5, backend="native")(ab)
    assert len(list(fresh_kernel.glob("soft_encode-k5-b4-*.so"))) == 2  # two builds, told apart by their flags
    _assert_same_encoding(portable, ref, atol=1e-6)


def test_kernel_is_cached_on_disk(fresh_kernel):
    SoftEncoder(load_bins(), k=5, backend="native")(_ab())
    (so,) = fresh_kernel.glob("soft_encode-k5-b4-*.so")
    mtime = so.stat().st_mtime_ns
    encoding_kernel.reset()
    SoftEncoder(load_bins(), k=5, backend="native")(_ab())
    assert so.stat().st_mtime_ns == mtime and len(list(fresh_kernel.iterdir())) == 1  # reused, no temp files left


def test_two_threads_equal_one():
    ab = _ab((3, 2, 300, 300), seed=2, scale=240.0)  # 270k pixels: split over 2 threads
    enc = SoftEncoder(load_bins(), k=5, backend="native")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = enc(ab)
        torch.set_num_threads(2)
        two = enc(ab)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_odd_shapes_dtypes_and_non_finite_input():
    enc, ref = SoftEncoder(load_bins(), k=5, backend="native"), SoftEncoder(load_bins(), k=5, backend="torch")
    ab = _ab((3, 2, 7, 3))  # blocks shorter than a vector
    _assert_same_encoding(enc(ab.double()), ref(ab))
    wide = _ab((1, 2, 3, 700)).transpose(2, 3)  # not contiguous; rows longer than a block
    _assert_same_encoding(enc(wide), ref(wide.contiguous()))
    idx, w = enc(torch.zeros(0, 2, 4, 4))
    assert idx.shape == (0, 5, 4, 4) and w.shape == (0, 5, 4, 4)
    bad = _ab((1, 2, 4, 4))
    bad[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    idx, w = enc(bad)
    assert int(idx.min()) >= 0 and int(idx.max()) < 313  # garbage in, but never an index out of range
    good = torch.isfinite(bad).all(1, keepdim=True).expand_as(w)
    torch.testing.assert_close(w[good], ref(bad)[1][good], atol=2e-5, rtol=1e-5)


def test_copy_and_pickle_rebuild_the_binding():
    enc = SoftEncoder(load_bins(), k=5, backend="native")
    ab = _ab()
    out = enc(ab)
    clone = copy.deepcopy(enc)
    assert torch.equal(clone(ab)[0], out[0]) and torch.equal(clone(ab)[1], out[1])


@pytest.mark.parametrize("env, reason", [
    ({"CC": "/nonexistent/cc"}, "failed to run"),
    ({"CC": "false"}, "exited with"),
    ({"CROSSCHANNEL_NATIVE": "0"}, "turned off"),
])
def test_fallback_to_torch_with_one_warning(monkeypatch, fresh_kernel, env, reason):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ab = _ab()
    with pytest.warns(RuntimeWarning, match=reason):
        out = SoftEncoder(load_bins(), k=5)(ab)
    _assert_same_encoding(out, SoftEncoder(load_bins(), k=5, backend="torch")(ab), atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per encoder or call
        SoftEncoder(load_bins(), k=5)(ab)
    with pytest.raises(RuntimeError, match=reason):
        SoftEncoder(load_bins(), k=5, backend="native")(ab)
    assert not fresh_kernel.exists() or not any(p.suffix == ".so" for p in fresh_kernel.iterdir())


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend"):
        SoftEncoder(load_bins(), k=5, backend="cuda")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CROSSCHANNEL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert encoding_kernel.cache_dir() == tmp_path / "crosschannel"
    monkeypatch.setenv("CROSSCHANNEL_CACHE_DIR", os.fspath(tmp_path / "x"))
    assert encoding_kernel.cache_dir() == tmp_path / "x"


def test_unwritable_cache_falls_back_to_a_private_temp_folder(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CROSSCHANNEL_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created, even by root
    monkeypatch.setattr(encoding_kernel.tempfile, "tempdir", str(tmp_path))
    encoding_kernel.reset()
    try:
        lib = encoding_kernel.load(5, 4)
        assert not isinstance(lib, str), lib
        private = tmp_path / f"crosschannel-{os.getuid()}"
        assert list(private.glob("soft_encode-k5-b4-*.so")) and private.stat().st_mode & 0o077 == 0
        encoding_kernel.reset()
        private.chmod(0o777)  # a folder others can write is never trusted
        assert "no writable folder" in encoding_kernel.load(5, 4)
    finally:
        encoding_kernel.reset()


def test_nan_input_gives_nan_weights_like_the_torch_path():
    """A NaN in the target must not turn into a confident one-hot target (the trainer stops on a NaN loss)."""
    ab = _ab((1, 2, 2, 3))
    ab[0, :, 0, 0] = float("nan")
    for backend in ("native", "torch"):
        w = SoftEncoder(load_bins(), k=5, backend=backend)(ab)[1]
        assert torch.isnan(w[0, :, 0, 0]).all() and torch.isfinite(w[0, :, 1]).all(), backend
