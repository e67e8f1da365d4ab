"""Small shared runtime for every crosschannel entry point.

One place for: typed configs (flat YAML + ``--set key=value``), device selection, torchrun/DDP set-up,
atomic checkpoints, RNG state, and logs (human-readable + JSONL). ``linear_probe`` and ``transfer`` import
it; models and losses never do (no distributed calls inside them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import yaml

log = logging.getLogger("crosschannel")


class UserError(Exception):
    """An error caused by the user's input: the CLI prints it as one line, without a traceback."""


# --------------------------------------------------------------------------------------------- config
def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config key '{key}': cannot convert {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else str
        out = [_convert(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dict_type(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge: float | None = None,
          gt: float | None = None, le: float | None = None, lt: float | None = None,
          choices: Iterable[Any] | None = None) -> Any:
    """A config field with declared limits, checked by :func:`build_config` before anything runs::

        size: int = param(176, ge=32, le=4096)
        amp: str = param("auto", choices=("auto", "bf16", "fp16", "none"))

    Bounds apply to numbers and to every element of a list/tuple of numbers; a bounded float must be finite.
    ``choices`` lists the allowed values (of the value, or of each element of a list)."""
    check = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if choices is not None:
        check["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"check": check})


def _check_value(key: str, value: Any, check: dict) -> None:
    if value is None or not check:
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(key, v, check)
        return
    choices = check.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"config key '{key}': must be one of {', '.join(map(str, choices))}; got {value!r}")
    bounds = {k: check[k] for k in ("ge", "gt", "le", "lt") if k in check}
    if not bounds or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}': must be a finite number, got {value!r}")
    ops = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
           "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}
    for name, bound in bounds.items():
        ok, sym = ops[name]
        if not ok(value, bound):
            raise UserError(f"config key '{key}': must be {sym} {bound}, got {value!r}")


def validate_config(cfg) -> Any:
    """Check every field's declared limits (:func:`param`), then the config's own ``validate()`` (combinations of
    keys), if it has one. Raises :class:`UserError` naming the key; returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        _check_value(f.name, getattr(cfg, f.name), f.metadata.get("check", {}))
    extra = getattr(cfg, "validate", None)
    if callable(extra):
        extra()
    return cfg


def _unknown_key(key: str, cls) -> UserError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(names)}")


def build_config(cls, values: dict[str, Any]):
    """Build the dataclass ``cls`` from a flat dict, type-checking every value and checking its limits
    (:func:`validate_config`)."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, cls)
        kwargs[key] = _convert(value, fields[key], key)
    return validate_config(cls(**kwargs))


def load_config(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()):
    """Load a flat YAML config into the dataclass ``cls`` and apply ``key=value`` overrides.

    Raises :class:`UserError` naming the file / key for a missing file, bad YAML, a nested mapping, an unknown
    key or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: a config must be a flat mapping of key: value")
        fields = _fields(cls)
        for k, v in loaded.items():
            if isinstance(v, dict) and k in fields and not _is_dict_type(fields[k]):
                raise UserError(f"{p}: config key '{k}' is nested; configs are flat (key: value)")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        k = k.strip()
        if "." in k:  # --set model_kwargs.fc_dim=64 sets one entry of a mapping-typed key
            head, sub = k.split(".", 1)
            fields = _fields(cls)
            if head not in fields:
                raise _unknown_key(head, cls)
            if not _is_dict_type(fields[head]):
                raise UserError(f"--set {k}: '{head}' is not a mapping")
            base = values.get(head)
            if base is None:
                base = getattr(cls(), head, None) if _has_defaults(cls) else None
            merged = dict(base or {})
            merged[sub] = yaml.safe_load(v)
            values[head] = merged
        else:
            values[k] = v
    try:
        return build_config(cls, values)
    except UserError as e:
        raise UserError(f"{path}: {e}" if path is not None else str(e)) from None


def config_to_dict(cfg) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_args(cls, args: argparse.Namespace):
    """Config for an entry point from ``--config`` and ``--set`` (see :func:`add_config_args`)."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", []) or [])


def save_config(cfg, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config as flat YAML into the run directory (atomically)."""
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", "-c", default=None, help="flat YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable)")
    return parser


# --------------------------------------------------------------------------------------------- device
def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA (the local rank's GPU under torchrun), then MPS, then CPU."""
    if name in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank or 0)
    return dev


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Map the config's ``amp`` value to an autocast dtype; AMP only on CUDA ('auto' = bf16 if supported)."""
    if device.type != "cuda" or name in ("none", "off", "false", "fp32"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp16", "float16"):
        return torch.float16
    raise UserError(f"amp must be one of auto, bf16, fp16, none; got '{name}'")


# --------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment; start a process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world, local)
    device = select_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (no-op without a process group); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------------- files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temporary file in the target folder, fsync, then rename over ``path``: a crash
    never leaves a truncated file behind, only the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`). A failed write (disk full, quota, read-only folder) is an
    ``OSError`` naming the checkpoint and saying that the previous one is kept (``torch.save`` reports a failed
    write of its zip stream as a ``RuntimeError``; the ``OSError`` behind it is recovered)."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise _checkpoint_write_error(e, path) from e
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise _checkpoint_write_error(cause, path) from e


def _checkpoint_write_error(e: OSError, path) -> OSError:
    why = e.strerror or str(e)
    return OSError(e.errno, f"cannot write the checkpoint ({why}); the previous checkpoint, if any, is kept",
                   str(path))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = False) -> dict:
    """``torch.load`` of a dict, with one-line errors for a missing or unreadable file (``weights_only``: tensors and
    plain containers only, for third-party weight files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any unpickling error is a bad file for the user
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a crosschannel checkpoint (expected a dict)")
    return obj


# --------------------------------------------------------------------------------------------- run folders
class RunLock:
    """An exclusive lock on a run folder, so that two runs never write one ``out_dir`` at once.

    ``fcntl.flock`` on ``run_dir/.lock``: the kernel releases it when the holder exits or dies, so a lock left by a
    killed process is never stale. The file records the holder (pid, host, start time, command) for the error the
    second run gets. Take it in the main process only (rank 0 under DDP)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        _make_run_dir(self.run_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserError(f"{self.run_dir} is in use by another run ({self._holder()}); wait for it to finish "
                            "or choose another out_dir") from None
        holder = dict(pid=os.getpid(), host=socket.gethostname(),
                      started=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its record just after taking the lock: wait up to 1 s for it
            try:
                h = json.loads(self.path.read_text())
                return f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` with one-line errors for the usual mistakes (a file in the way, no permission)."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"out_dir {run_dir}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"out_dir {run_dir}: not writable")


def remove_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left (``.<name>.<random>.tmp``) in
    ``run_dir`` and its direct subfolders. Call it while holding the run's :class:`RunLock` (no live writer)."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob(".*.tmp"), *run_dir.glob("*/.*.tmp")]
    for f in found:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    if found:
        log.info("removed %d temporary file(s) of interrupted writes in %s", len(found), run_dir)
    return found


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class GracefulStop:
    """Turn SIGTERM (SLURM, Kubernetes), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal=USR1@90`` warning) into a
    request to stop: the trainer finishes its step, all ranks agree, a checkpoint is written, and the process exits
    with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), as schedulers expect. A second
    Ctrl-C stops at once. Use as a context manager around the training loop (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not logging: a signal handler may run while the logging lock is held
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
                    "(Ctrl-C again to stop at once)\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """``worker_init_fn`` for DataLoader workers: a terminal's Ctrl-C and a scheduler's SIGTERM reach the whole
    process group; the workers ignore them and are shut down by the main process after its checkpoint."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _normalise(v: Any) -> Any:
    return [_normalise(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between two config dicts (lists and tuples compare equal)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if _normalise(old.get(k)) != _normalise(new.get(k))}


def check_resume_config(old: dict, new: dict, guarded: Iterable[str], allow: bool, run_dir: str | os.PathLike,
                        step: int) -> dict[str, tuple[Any, Any]]:
    """On resume, compare the checkpoint's config with the new one. Changes to ``guarded`` keys (data, model,
    target, batch, schedule: what makes it another experiment) are refused unless ``allow``; every change that
    goes ahead is appended to ``run_dir/config_history.jsonl`` with the step, so ``config.yaml`` never silently
    rewrites the record of the steps before."""
    changes = config_changes(old, new)
    guarded_changes = [k for k in changes if k in set(guarded)]
    if guarded_changes and not allow:
        what = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in guarded_changes)
        raise UserError(f"resuming with a changed config ({what}); pass --allow-config-change to continue anyway "
                        "(recorded in config_history.jsonl)")
    if changes:
        JsonlLogger(Path(run_dir) / "config_history.jsonl").log(
            step=step, changes={k: {"old": _normalise(a), "new": _normalise(b)} for k, (a, b) in changes.items()})
        log.warning("resumed with config changes at step %d: %s", step, ", ".join(changes))
    return changes


# --------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- logging
def setup_logging(run_dir: str | os.PathLike | None = None, is_main: bool = True, verbose: bool = False) -> None:
    """Human-readable log to stderr (main process only) and ``run_dir/log.txt``."""
    level = logging.DEBUG if verbose else logging.INFO
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    log.addHandler(h)
    if run_dir is not None and is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)


class JsonlLogger:
    """Append one JSON object per line (machine-parseable); a no-op on non-main processes."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL log. A torn last line (a process killed mid-write) is dropped with a warning; a broken
    line elsewhere is an error naming the file and line."""
    out = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i:]):
                raise UserError(f"{path}: line {i} is not valid JSON") from None
            log.warning("%s: dropped a torn last line (a write was interrupted)", path)
    return out


def truncate_jsonl(path: str | os.PathLike, max_step: int, key: str = "step") -> int:
    """On resume: keep only the records up to the checkpoint's step (and those without ``key``), so that the
    steps the resumed run redoes are not logged twice; a torn last line goes too. Returns the number dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    recs = read_jsonl(path)
    keep = [r for r in recs if not isinstance(r.get(key), (int, float)) or r[key] <= max_step]
    dropped = len(recs) - len(keep)
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in keep)
    if dropped or text != path.read_text():
        atomic_write_text(path, text)
    return dropped


class HeldLogs(logging.Handler):
    """Holds the log records of the checks a run makes before its folder exists (see :func:`held_logs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs():
    """Hold the ``crosschannel`` logger's records while the block runs: a refused run prints its one error line
    alone; an accepted one replays ``held.records`` (``log.handle``) once its folder and ``log.txt`` exist."""
    held = HeldLogs()
    handlers = log.handlers[:]
    log.handlers = [held]
    try:
        yield held
    finally:
        log.handlers = handlers


def open_run_dir(run_dir: str | os.PathLike, held: HeldLogs | None = None, lock: RunLock | None = None) -> RunLock:
    """Main process, once the checks have passed: lock ``run_dir`` (unless ``lock`` already holds it), start its
    ``log.txt``, replay the records :func:`held_logs` held, and remove the temporary files of killed writes."""
    lock = lock or RunLock(run_dir).acquire()
    setup_logging(run_dir, True)
    for record in (held.records if held is not None else ()):
        log.handle(record)
    remove_stale_tmp(run_dir)
    return lock


# --------------------------------------------------------------------------------------------- entry points
def run_entry(main, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and call ``main(args)``; a :class:`UserError` becomes one line on stderr and exit code 2.

    ``main`` may return an int exit code (e.g. 1 when some inputs failed)."""
    args = parser.parse_args(argv)
    try:
        rc = main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only folder, ...: one line naming the file (CROSSCHANNEL_DEBUG=1: traceback)
        if os.environ.get("CROSSCHANNEL_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{parser.prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return int(rc or 0)


def add_resume_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trainers' ``--resume [CHECKPOINT]``, ``--force`` and ``--allow-config-change`` (see
    :func:`resolve_resume` and :func:`check_resume_config`)."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from out_dir/checkpoint.pth (or the given checkpoint)")
    parser.add_argument("--force", action="store_true",
                        help="with --resume CHECKPOINT: replace out_dir's own checkpoint of another run")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="on resume, accept changes to data, model, target, batch or schedule (recorded)")
    return parser


def resume_command(argv: list[str] | None = None) -> str:
    """This process's command line to continue the run (for the line printed after a stop signal), quoted for a
    shell: ``python -m pkg.module`` when started as a module, torchrun's own command line under torchrun (read from
    the parent process), the console script otherwise; ``--resume [CHECKPOINT]``, ``--force`` and ``--allow-config-change`` are replaced
    by a plain ``--resume`` (the checkpoint in out_dir now holds the config in force)."""
    import shlex

    launcher = None
    if argv is None and os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        try:  # under torchrun: its own command line (nodes, rendezvous, ...), from the parent process
            launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1] or None
        except OSError:
            pass
    argv = list(launcher or (sys.argv if argv is None else argv))
    script, rest = Path(argv[0]), argv[1:]
    args, skip = [], False
    for i, a in enumerate(rest):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(rest) and not rest[i + 1].startswith("-")
            continue
        if a.startswith("--resume=") or a in ("--force", "--allow-config-change"):
            continue
        args.append(a)
    if launcher is not None:
        return shlex.join([*_program(argv[0]), *args, "--resume"])
    if script.suffix == ".py" and (script.parent / "__init__.py").is_file():
        module = f"{script.parent.name}.{script.stem}"
        if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
            head = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", "-m", module]
        else:
            head = [*_program(sys.executable), "-m", module]
    elif script.suffix == ".py":
        head = [*_program(sys.executable), str(script)]
    else:
        head = [script.name]
    return shlex.join([*head, *args, "--resume"])


def _program(exe: str) -> list[str]:
    """How to name the program ``exe`` in a command to copy: ``python`` (or its own name) where the PATH finds that
    very file, else its full path. Not resolving symlinks: a venv's python is not the system's."""
    import shutil

    for name in ("python", Path(exe).name):
        which = shutil.which(name)
        if which is not None and os.path.abspath(which) == os.path.abspath(exe):
            return [name]
    return [exe]


def resolve_resume(resume: str | None, latest: str | os.PathLike, force: bool = False) -> str | None:
    """``--resume`` semantics shared by the trainers: 'auto' means ``latest`` if it exists (else start fresh);
    no ``--resume`` while ``latest`` exists is an error, so that a finished or crashed run is never overwritten;
    ``--resume OTHER.pth`` into a folder that holds its own checkpoint is refused unless ``force``."""
    latest = Path(latest)
    if resume == "auto":
        if latest.is_file():
            return str(latest)
        log.info("--resume: no checkpoint at %s, starting fresh", latest)
        return None
    if resume is None and latest.is_file():
        raise UserError(f"{latest} exists: pass --resume to continue that run, or choose another out_dir")
    if resume is not None and latest.is_file() and not force and Path(resume).resolve() != latest.resolve():
        raise UserError(f"{latest} holds another run's checkpoint; resuming from {resume} would overwrite it "
                        "(pass --force to replace it, or choose another out_dir)")
    return resume


def all_gather_objects(obj: Any) -> list:
    """Every process's ``obj`` (a list of one without a process group)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag: true if it is true on any process (one all-reduce for all of them). Decisions that end a
    loop must agree across processes, or the others hang in their next collective."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]
    return [bool(f) for f in flags]
