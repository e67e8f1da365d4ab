"""Small shared runtime for every crosschannel entry point.

One place for: typed configs (flat YAML + ``--set key=value``), device selection, torchrun/DDP set-up,
atomic checkpoints, RNG state, and logs (human-readable + JSONL). ``linear_probe`` and ``transfer`` import
it; models and losses never do (no distributed calls inside them).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import logging
import os
import random
import sys
import tempfile
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


def _unknown_key(key: str, cls) -> UserError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(names)}")


def build_config(cls, values: dict[str, Any]):
    """Build the dataclass ``cls`` from a flat dict, type-checking every value."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, cls)
        kwargs[key] = _convert(value, fields[key], key)
    return cls(**kwargs)


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
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


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
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


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
    return int(rc or 0)


def add_resume_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trainers' ``--resume [CHECKPOINT]`` (see :func:`resolve_resume`)."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from out_dir/checkpoint.pth (or the given checkpoint)")
    return parser


def resolve_resume(resume: str | None, latest: str | os.PathLike) -> str | None:
    """``--resume`` semantics shared by the trainers: 'auto' means ``latest`` if it exists (else start fresh);
    no ``--resume`` while ``latest`` exists is an error, so that a finished or crashed run is never overwritten."""
    latest = Path(latest)
    if resume == "auto":
        if latest.is_file():
            return str(latest)
        log.info("--resume: no checkpoint at %s, starting fresh", latest)
        return None
    if resume is None and latest.is_file():
        raise UserError(f"{latest} exists: pass --resume to continue that run, or choose another out_dir")
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
