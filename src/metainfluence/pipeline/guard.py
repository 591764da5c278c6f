"""Guards of a run folder: refuse to overwrite a run by accident, check that it is writable before
any expensive work, keep names inside it, and hold a lock while a process writes into it (two
processes writing one folder would mix their files)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import SettingsError

RUN_MARKERS = ("settings.json", "trained.safetensors", "refined.safetensors", "summary.json")
LOCK_NAME = ".metainfluence.lock"


def check_name(name: str, what: str = "--name") -> str:
    """A file stem that stays inside its folder: no separators, no '..', not empty."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise SettingsError(f"{what} {name!r} must be a plain file name inside --out (no '/', '..' or leading '.'); choose e.g. 'edited'")
    return name


def check_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it writable with a probe file, before any expensive work."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"--out {path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(f"--out {path} is not writable ({exc.strerror}); choose a folder you can write to") from None
    return path


def claim_run_folder(out: str | os.PathLike, *, resume: bool = False, force: bool = False) -> Path:
    """The folder of a NEW run: refused when it already holds one, unless resuming or forced."""
    path = Path(out).expanduser()
    found = [m for m in RUN_MARKERS if (path / m).exists()]
    if found == ["settings.json"] and not any(path.glob("*.safetensors")):
        found = []  # a run interrupted before its first checkpoint: nothing of it to lose, it starts again
    if found and not (resume or force):
        raise SettingsError(f"--out {path} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                            "--force to overwrite it, or choose another --out")
    return check_writable(path)


def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def check_not_replacing(stem: Path, what: str, kinds: tuple[str, ...], wanted: Mapping[str, Any], force: bool = False) -> None:
    """A file ``stem`` (its ``.json``) of another kind than ``kinds``, or holding ``what`` of other settings, is never
    replaced silently: refused unless ``force``. ``wanted``: the keys of the record (dotted paths into its JSON) and the
    values this command would write there; a file that records the same values is the same computation, and writing it
    again loses nothing."""
    record = stem.with_name(stem.name + ".json")
    if force or not record.is_file():
        return
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError):
        kept = None
    kind = kept.get("kind") if isinstance(kept, dict) else None
    if kind not in kinds:
        raise SettingsError(f"{stem} already holds another kind of file ({kind or 'not a metainfluence record'}), not {what}; "
                            "pass --name NEW (or --out) to keep it, or --force to replace it")
    differ = []
    for key, value in wanted.items():
        have: Any = kept
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if _comparable(have) != _comparable(value):  # tuples are written as the lists the file holds
            differ.append(key.rsplit(".", 1)[-1])
    if differ:
        raise SettingsError(f"{stem} already holds {what} of another {', '.join(differ)}; pass --name NEW (or --out) to keep both, "
                            "or --force to replace it")


@contextlib.contextmanager
def removed_if_left_empty(out: str | os.PathLike, bookkeeping: tuple[str, ...] = ()) -> Iterator[None]:
    """A folder this block creates is removed again when the block fails before writing anything into it but
    its own ``bookkeeping`` files (a refused or failed command leaves no empty --out behind; a folder that
    existed is never touched)."""
    path = Path(out).expanduser()
    created = not path.exists()
    try:
        yield
    except BaseException:
        left = list(path.iterdir()) if created and path.is_dir() else None
        if left is not None and all(f.name in bookkeeping and f.is_file() for f in left):
            for f in left:
                f.unlink()
            path.rmdir()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


class RunLock:
    """An exclusive lock file in a run folder, held while writing (a stale lock of a dead process is
    taken over). Usable as a context manager."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise SettingsError(f"another process (pid {pid}) is writing the run in {self.path.parent}; wait for it to finish "
                                        "or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return self
        raise SettingsError(f"could not take the lock {self.path}; remove it if no metainfluence process is running")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
