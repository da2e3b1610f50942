"""Result records: dataclasses to and from JSON, the machine a run saw, and data folders by
name and checksum (never an absolute path, so committed results name no machine)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

T = typing.TypeVar("T")


def to_json(record) -> typing.Any:
    """A dataclass (or a list / dict of them) as plain JSON values."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_json(x) for x in record]
    if isinstance(record, dict):
        return {str(k): to_json(v) for k, v in record.items()}
    return record


def from_json(kind, data):
    """`data` (JSON values) as `kind`: a dataclass, list[X], tuple[X, ...], dict[K, V], X | None or
    a plain type. Unknown keys are ignored and missing ones take the field's default, so records
    written by an older version of a study still load."""
    if data is None or kind is typing.Any:
        return data
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return from_json(options[0], data) if len(options) == 1 else data
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: from_json(hints[f.name], data[f.name])
                       for f in dataclasses.fields(kind) if f.init and f.name in data})
    if origin is list:
        return [from_json(args[0], x) for x in data]
    if origin is tuple:
        return tuple(from_json(args[0], x) for x in data)
    if origin is dict:
        key = args[0] if args[0] in (int, float) else (lambda k: k)
        return {key(k): from_json(args[1], v) for k, v in data.items()}
    if kind is float and isinstance(data, int):
        return float(data)
    return data


def write_json(path: Path, record) -> None:
    """Write `record` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = Path(f"{path}.part")
    tmp.write_text(json.dumps(to_json(record), indent=1))
    os.replace(tmp, path)


def read_json(path: Path, kind: type[T]) -> T:
    return from_json(kind, json.loads(Path(path).read_text()))


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Machine:
    """What a run saw: versions, cores, load before and after, the command, the wall time."""
    command: str = ""
    torch: str = ""
    python: str = ""
    cpu_count: int | None = None
    processor: str = ""
    loadavg_start: list[float] | None = None
    loadavg_end: list[float] | None = None
    started: str = ""
    elapsed_s: float = 0.0
    gpu_count: int = 0
    gpu_name: str | None = None

    @classmethod
    def now(cls, command: str) -> "Machine":
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        m = cls(command, torch.__version__, platform.python_version(), os.cpu_count(),
                platform.processor() or platform.machine(), loadavg(), None, time.strftime("%Y-%m-%d %H:%M:%S"),
                0.0, gpus, torch.cuda.get_device_name(0) if gpus else None)
        m._t0 = time.monotonic()            # not a field: not recorded
        return m

    def finish(self) -> "Machine":
        self.loadavg_end, self.elapsed_s = loadavg(), time.monotonic() - getattr(self, "_t0", time.monotonic())
        return self

    def load_text(self) -> str:
        return f"load average before/after: {self.loadavg_start} / {self.loadavg_end}"


@dataclass
class DataFolder:
    """A data folder as results record it: its name and a SHA-256 per file (no machine path)."""
    name: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, path) -> "DataFolder | None":
        if not path or not os.path.isdir(path):
            return None
        files = {}
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    files[name] = hashlib.sha256(f.read()).hexdigest()
        return cls(os.path.basename(os.path.normpath(path)), files)


ROOT = Path(__file__).resolve().parents[2]


def portable_path(arg: str) -> str:
    """`arg` with an absolute path made relative to the repository (or cut to .../name outside it)."""
    if not os.path.isabs(arg):
        return arg
    try:
        return os.path.relpath(arg, ROOT) if Path(arg).resolve().is_relative_to(ROOT) else f".../{Path(arg).name}"
    except (OSError, ValueError):
        return f".../{Path(arg).name}"


def command_line(script: str, argv) -> str:
    """The command as a user would type it from the repository root, without machine paths."""
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}"] + [portable_path(str(a)) for a in args])
