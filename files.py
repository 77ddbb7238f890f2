"""Files: local paths through os, URLs (gs://, s3://, hdfs://, ram://...) through tf.io.gfile;
outputs checked before the work starts; atomic writes and the temporaries of killed writers.

Local paths keep os: its errors carry errno (a full disk is one line naming the file) and
TensorFlow is imported only for a URL. Every file the scripts read or write goes through these
helpers, so dataset_dir=, models_dir=, results_dir= ... may be any filesystem TensorFlow knows.
"""

import contextlib
import errno
import os
import re
import shutil
import stat
import sys

from cli import UserError, signals_deferred


def is_url(path) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf  # here: only for a URL; a local path never starts TensorFlow

    return tf.io.gfile


def exists(path) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def listdir(path) -> list:
    return [name.rstrip("/") for name in _gfile().listdir(path)] if is_url(path) else os.listdir(path)


def makedirs(path) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path, missing_ok: bool = False) -> None:
    """Remove a file or a folder tree. ``missing_ok`` (clean-up after a failure): a path already
    gone is no error, and a tree is removed as far as it can be."""
    if is_url(path):
        if not missing_ok or _gfile().exists(path):
            (_gfile().rmtree if _gfile().isdir(path) else _gfile().remove)(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=missing_ok)
    elif not missing_ok or os.path.lexists(path):
        os.remove(path)


def rename(source, target) -> None:
    """Rename ``source`` to ``target``, replacing it (atomic on local and RAM filesystems; on
    object stores such as gs:// a copy whose result appears only once complete)."""
    if is_url(source) or is_url(target):
        _gfile().rename(source, target, overwrite=True)
    else:
        os.replace(source, target)


def open_file(path, mode="rb"):
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as handle:
        return handle.read()


def append_text(path, text) -> None:
    """Append to a text file (a log): object stores cannot append, so there the file is
    rewritten whole, atomically."""
    if is_url(path):
        old = read_bytes(path) if exists(path) else b""
        write_file(path, old + text.encode())
    else:
        with open(path, "a") as handle:
            handle.write(text)


# ---------------------------------------------------------------------------------------
# output paths, checked before the work starts

def _first_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable_below(path: str, name: str, given: str, what: str) -> None:
    existing = _first_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f"{name}={given}: cannot {what}, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name}={given}: cannot {what}, {existing} is not writable")


def check_output_dir(path: str, name: str) -> None:
    """UserError unless ``path`` is a folder or can be made one (argument ``name``)."""
    if exists(path) and not isdir(path):
        raise UserError(f"{name}={path}: is a file, not a folder")
    if is_url(path):
        return  # a remote store says whether it can be written only when it is
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{name}={path}: this folder is not writable (permission denied)")
        return
    _check_writable_below(path, name, path, "make this folder")


def check_output_file(path: str, name: str) -> None:
    """UserError unless ``path`` can be written as a file (argument ``name``)."""
    if isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{name}={path}: is a folder, expected a file name")
    if is_url(path):
        return
    _check_writable_below(os.path.dirname(os.path.abspath(path)), name, path, "write there")


# ---------------------------------------------------------------------------------------
# atomic writes

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path``; rename it to ``path`` only if the block succeeds.

    A crash or an error inside the block leaves any existing ``path`` untouched.
    The temporary name keeps the extension, so writers that look at it still work.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        rename(tmp, path)
    except OSError as err:  # a full disk...: said of the file the user asked for
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        if exists(tmp):
            remove(tmp)


# Temporary names of this project's writers, with the writer's process id: atomic_path's
# ".{stem}.tmp{pid}{ext}", the checkpoints' "{prefix}.tmp{pid}.*" and TensorFlow's
# "{prefix}.tmp{pid}_temp/" beside them, the ".building-{pid}/" of make_sample_dataset.py and
# make_dataset.py.
_TEMP_NAME = re.compile(r"^(?:\..+\.tmp(?P<a>\d+)(?:\.\w+)?"
                        r"|pynet_level_\d+_iteration_\d+\.ckpt(?:\.train_state)?\.tmp(?P<b>\d+)(?:\..+|_temp)"
                        r"|\.building-(?P<c>\d+))$")


def temp_owner(name: str):
    """Process id in a temporary name of this project's writers, or None for other names."""
    match = _TEMP_NAME.match(name)
    return int(next(g for g in match.groups() if g)) if match else None


def is_hidden(name: str) -> bool:
    """A dotfile or a writer's temporary file: never taken as an input."""
    return name.startswith(".") or temp_owner(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str) -> list:
    """Remove the temporary files and folders that writers of this project left in ``folder``
    when they were killed (their process is gone); returns the names removed."""
    removed = []
    if is_url(folder) or not os.path.isdir(folder):
        return removed  # on shared storage a writer's process id says nothing: only local folders
    for name in sorted(os.listdir(folder)):
        pid = temp_owner(name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            remove(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted run "
              f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})", file=sys.stderr)
    return removed


def write_file(path: str, data: bytes) -> None:
    """Write encoded bytes to ``path`` atomically, making its folder; encoders run before this,
    in memory, so that a failed write (a full disk) is one OSError naming ``path`` and leaves
    nothing behind (no temporary file, no half-closed handle of a library)."""
    folder = os.path.dirname(path)
    if folder:
        makedirs(folder)
    with atomic_path(path) as tmp:
        with open_file(tmp, "wb") as handle:
            handle.write(data)


def swap_in(work: str, folder: str, names, replaced=()) -> None:
    """Move the entries ``names`` built in ``work`` into ``folder`` and, first, those of
    ``replaced`` that ``folder`` holds out into ``work`` (they go when it is removed). Renames
    only, each atomic, and Ctrl-C or SIGTERM waits until all are done (cli.signals_deferred):
    an interrupted run leaves the old entries or the new ones, not a mix. Local folders."""
    old = os.path.join(work, ".replaced")
    with signals_deferred():
        os.makedirs(old, exist_ok=True)
        for name in replaced:
            if os.path.lexists(os.path.join(folder, name)):
                os.replace(os.path.join(folder, name), os.path.join(old, name))
        for name in names:
            os.replace(os.path.join(work, name), os.path.join(folder, name))


def require_file(path) -> None:
    """UserError naming ``path`` and why it cannot be read as a file: missing, a folder, a link
    to nothing, a loop of links, no permission."""
    if is_url(path):
        if not isfile(path):
            raise UserError(f"{path}: file not found")
        return
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ENOENT and os.path.islink(path):
            raise UserError(f"{path}: a symbolic link to a missing file ({os.readlink(path)})") from None
        if err.errno == errno.ENOENT:
            raise UserError(f"{path}: file not found") from None
        if err.errno == errno.ELOOP:
            raise UserError(f"{path}: a loop of symbolic links (it points back to itself)") from None
        raise UserError(f"{path}: cannot open it ({err.strerror or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: cannot read it (permission denied)")
