"""The CPU kernel behind :class:`pretext.encoding.SoftEncoder`: its lookup fused into one C pass.

The torch path of ``SoftEncoder`` costs ~20 memory-bound passes over (B, k, H, W) tensors; this kernel does the same
arithmetic on the same tables in one pass per pixel block. It is plain C99 (``csrc/soft_encode.c``, shipped with
the package), compiled at first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), cached
under ``$CROSSCHANNEL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/crosschannel``, i.e. ``~/.cache/crosschannel``) and
loaded with ctypes: no Python headers, no build step at install. Where no compiler works, ``SoftEncoder`` falls
back to its torch path with a one-line warning; ``CROSSCHANNEL_NATIVE=0`` turns the kernel off.
``CROSSCHANNEL_NATIVE_CFLAGS`` adds compiler flags (``-DCC_PORTABLE``: the plain C path without SSE2 intrinsics,
which is what non-x86 machines compile).

Large batches are split over ``torch.get_num_threads()`` threads (ctypes releases the GIL during the call).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-trapping-math"]  # the last: lets the exp loop vectorise
MIN_PIXELS_PER_THREAD = 131072  # below, waking a second thread costs more than it saves (measured: bench_encoding)
MAX_BINS = 32767  # bin ids are stored as int16
MAX_SIDE = 4096  # square ids are computed in float32: exact below 2^24


class _Tables(ctypes.Structure):
    """Mirror of ``cc_tables`` in soft_encode.c."""

    _fields_ = [
        ("grid", ctypes.c_void_p), ("n", ctypes.c_int64), ("offset", ctypes.c_float), ("inv_cell", ctypes.c_float),
        ("rec", ctypes.c_void_p), ("pattern", ctypes.c_void_p), ("tup_bin", ctypes.c_void_p),
        ("n_fast", ctypes.c_int64), ("slow_cand", ctypes.c_void_p), ("n_slow", ctypes.c_int64),
        ("width", ctypes.c_int64), ("bins_ab", ctypes.c_void_p), ("Q", ctypes.c_int64),
    ]


_lock = threading.Lock()
_state: dict = {}  # (k, max_bits) -> loaded library or the reason it is unavailable (str)


def cache_dir() -> Path:
    if os.environ.get("CROSSCHANNEL_CACHE_DIR"):
        return Path(os.environ["CROSSCHANNEL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crosschannel"


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _build(k: int, max_bits: int) -> ctypes.CDLL:
    """Compile for (k, max_bits), or reuse the cached build, and load it. Raises RuntimeError with the reason."""
    if os.environ.get("CROSSCHANNEL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("turned off by CROSSCHANNEL_NATIVE")
    if os.name != "posix":
        raise RuntimeError(f"not built on {os.name}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = resources.files("pretext").joinpath("csrc/soft_encode.c").read_bytes()
    flags = FLAGS + shlex.split(os.environ.get("CROSSCHANNEL_NATIVE_CFLAGS", ""))
    flags += [f"-DCC_K={k}", f"-DCC_BITS={max_bits}"]
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + flags).encode(), platform.machine().encode(),
                                     platform.system().encode()])).hexdigest()[:16]
    name = f"soft_encode-k{k}-b{max_bits}-{key}.so"
    # the cache, or a private temporary folder where the cache is not writable (read-only home on a cluster)
    folders = [cache_dir()] + _private_temp_folder()
    target = next((f / name for f in folders if (f / name).exists()), None)
    for folder in folders if target is None else []:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder)
        except OSError:
            continue
        try:
            _compile(cc + flags, source, Path(tmp))
            os.replace(Path(tmp) / "soft_encode.so", folder / name)  # atomic: ranks and workers may race here
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        target = folder / name
        break
    if target is None:
        raise RuntimeError(f"no writable folder for the compiled kernel ({', '.join(map(str, folders))})")
    lib = ctypes.CDLL(str(target))
    fn = lib.cc_soft_encode
    fn.restype = None
    fn.argtypes = [ctypes.POINTER(_Tables), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _private_temp_folder() -> list[Path]:
    """[a folder in the temp dir that only this user can write], or [] if that cannot be had."""
    folder = Path(tempfile.gettempdir()) / f"crosschannel-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.stat()
    except OSError:
        return []
    return [folder] if st.st_uid == os.getuid() and not st.st_mode & 0o022 else []


def _compile(command: list[str], source: bytes, folder: Path) -> None:
    """Compile ``source`` into ``folder/soft_encode.so``; RuntimeError with the compiler's first line on failure."""
    src = folder / "soft_encode.c"
    src.write_bytes(source)
    try:
        proc = subprocess.run(command + ["-o", str(folder / "soft_encode.so"), str(src)], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"compiler {command[0]!r} failed to run: {e}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}: {lines[0]}")


def load(k: int, max_bits: int) -> ctypes.CDLL | str:
    """The kernel compiled for (k, max_bits), or the reason why it cannot be built here."""
    with _lock:
        if (k, max_bits) not in _state:
            try:
                _state[k, max_bits] = _build(k, max_bits)
            except (RuntimeError, OSError) as e:
                _state[k, max_bits] = str(e)
        return _state[k, max_bits]


def reset() -> None:
    """Forget the loaded kernels and their bindings (tests: rebuild under another environment)."""
    with _lock:
        _state.clear()
        _bound.clear()


_bound: dict = {}


def bind(key: tuple, tables: dict[str, torch.Tensor], bins: torch.Tensor, k: int, max_bits: int, n_side: int,
         offset: float, cell: float) -> NativeSoftEncode:
    """The kernel for (k, max_bits) bound to SoftEncoder tables (``key`` names them), once per process.

    Raises RuntimeError (the kernel cannot be built here) or ValueError (tables beyond its limits), with the reason.
    """
    lib = load(k, max_bits)
    if isinstance(lib, str):
        raise RuntimeError(lib)
    with _lock:
        if (key, lib._name) not in _bound:
            _bound[key, lib._name] = NativeSoftEncode(lib, tables, bins, k, n_side, offset, cell)
        return _bound[key, lib._name]


_pool: dict = {}


def _executor(threads: int) -> ThreadPoolExecutor:
    """A thread pool per process (a forked DataLoader worker must not reuse its parent's)."""
    key = (os.getpid(), threads)
    if key not in _pool:
        _pool.clear()
        _pool[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="crosschannel-encode")
    return _pool[key]


def _direct_squares(tables: dict[str, torch.Tensor], n: int, offset: float, cell: float) -> torch.Tensor:
    """The lookup grid with each square resolved where its sign tests cannot change inside it.

    A record's tests are linear in ab, so each has one strict sign over the open square iff its values at the four
    corners share that sign or are zero (and are not all zero). Such squares store their tuple id u >= 0 directly (no tests per pixel); the
    others store -1 - record. Evaluated in float64 on the float32 coefficients the tests use.
    """
    grid, base = tables["grid"].long(), tables["base"].double()
    ca, cb, ch = (tables[name].double() for name in ("coef_a", "coef_b", "coef_h"))
    n_fast, pattern = int(tables["n_fast"]), tables["pattern"].long()
    bits = 2 ** torch.arange(ca.shape[1], dtype=torch.float64)
    out = torch.empty(grid.numel(), dtype=torch.int32)
    for s0 in range(0, grid.numel(), 1 << 17):
        sq = torch.arange(s0, min(s0 + (1 << 17), grid.numel()))
        r = grid[sq]
        lo_a = (sq // n).double() * cell - offset
        lo_b = (sq % n).double() * cell - offset
        corner_a = torch.stack([lo_a, lo_a + cell, lo_a, lo_a + cell], 1).unsqueeze(1)  # (S, 1, 4)
        corner_b = torch.stack([lo_b, lo_b, lo_b + cell, lo_b + cell], 1).unsqueeze(1)
        v = ca[r].unsqueeze(2) * corner_a + cb[r].unsqueeze(2) * corner_b - ch[r].unsqueeze(2)  # (S, bits, 4)
        # one sign over the open square: a bisector through a corner or along an edge leaves it on one side
        # (points on it are ties, where either order is right)
        pos, neg = (v >= 0).all(2) & (v > 0).any(2), (v <= 0).all(2) & (v < 0).any(2)
        code = (base[r] + pos.double() @ bits).long()
        direct = (pos | neg).all(1) & (code < n_fast)
        out[sq] = torch.where(direct, pattern[code.clamp(max=pattern.numel() - 1)], -1 - r).int()
    return out


class NativeSoftEncode:
    """The kernel bound to one SoftEncoder's lookup tables, repacked for it (CPU tensors, kept alive here)."""

    def __init__(self, lib: ctypes.CDLL, tables: dict[str, torch.Tensor], bins: torch.Tensor, k: int,
                 n_side: int, offset: float, cell: float):
        if bins.shape[0] > MAX_BINS or n_side > MAX_SIDE:
            raise ValueError(f"the C kernel takes at most {MAX_BINS} bins and {MAX_SIDE - 2} lookup squares per side, "
                             f"got {bins.shape[0]} and {n_side - 2}")
        self._fn = lib.cc_soft_encode
        self.k = int(k)
        bins = bins.detach().cpu().float()
        # per record, one row: coef_a, coef_b, coef_h (each padded to a multiple of 4 tests with never-true ones:
        # 0 a + 0 b > 1), base, 3 unused
        bits = tables["coef_a"].shape[1]
        pad = -bits % 4
        R = tables["base"].shape[0]
        rec = torch.cat([F.pad(tables["coef_a"], (0, pad)), F.pad(tables["coef_b"], (0, pad)),
                         F.pad(tables["coef_h"], (0, pad), value=1.0), tables["base"].view(-1, 1),
                         torch.zeros(R, 3)], 1)
        tup = tables["tuple"].view(self.k, -1).t()  # (tuples, k), nearest first
        keep = {
            "grid": _direct_squares(tables, n_side, offset, cell), "rec": rec.float().contiguous(),
            "pattern": tables["pattern"].int().contiguous(), "tup_bin": tup.to(torch.int16).contiguous(),
            "slow_cand": tables["slow_cand"].long().contiguous(), "bins_ab": bins.contiguous(),
        }
        self._keep = keep
        scand = keep["slow_cand"]
        self._t = _Tables(
            grid=keep["grid"].data_ptr(), n=int(n_side), offset=float(offset), inv_cell=1.0 / float(cell),
            rec=keep["rec"].data_ptr(), pattern=keep["pattern"].data_ptr(), tup_bin=keep["tup_bin"].data_ptr(),
            n_fast=int(tables["n_fast"]),
            slow_cand=scand.data_ptr() if scand.numel() else None, n_slow=scand.shape[0],
            width=scand.shape[1] if scand.dim() == 2 else 0, bins_ab=keep["bins_ab"].data_ptr(), Q=bins.shape[0])

    def __call__(self, ab: torch.Tensor, sigma: float, want_d2: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """ab (B, 2, H, W) on the CPU -> (idx (B, k, H, W) int64, weights or squared distances (B, k, H, W))."""
        ab = ab.detach().float().contiguous()
        B, _, H, W = ab.shape
        HW, N = H * W, B * H * W
        idx = torch.empty(B, self.k, H, W, dtype=torch.int64)
        out = torch.empty(B, self.k, H, W, dtype=torch.float32)
        args = (ctypes.byref(self._t), ab.data_ptr(), HW)
        tail = (1.0 / (2.0 * sigma * sigma), int(want_d2), idx.data_ptr(), out.data_ptr())
        threads = max(1, min(torch.get_num_threads(), N // MIN_PIXELS_PER_THREAD))
        if threads == 1:
            self._fn(*args, 0, N, *tail)
        else:
            bounds = [N * i // threads for i in range(threads + 1)]
            list(_executor(threads).map(lambda i: self._fn(*args, bounds[i], bounds[i + 1], *tail), range(threads)))
        return idx, out
