"""One training run per models_dir: an advisory lock on a file in the folder, held for the life
of a run.

The lock is the kernel's (flock), so it goes with the process that holds it: a run that
crashes or is killed leaves no lock behind, at most the file, which the next run takes over.
The file names the holder (process id, host, command line) for the message of a run that
finds the folder taken. Within one process the lock is re-entrant: quickstart.py and the tests
set up several trainers on one folder in one process. Folders on remote stores (gs://, ram://
...) have no such locks: no lock is taken there, and a note says so.
"""

import datetime
import errno
import fcntl
import os
import shlex
import socket
import sys
import time

import files
from cli import UserError

LOCK_NAME = ".training.lock"  # hidden: never taken for a checkpoint or an input
ATTEMPTS = 5  # a lock taken for an instant by a run that then gives up is retried, not reported
RETRY_SECONDS = 0.05
SHOWN_COMMAND = 200  # characters of the holder's command line in a message

_held = {}  # real path of a lock file -> [file descriptor, holders in this process, whether the folder was made]


class FolderInUse(UserError):
    """Another live process trains into the folder."""


def lock_file(folder: str) -> str:
    return os.path.join(folder, LOCK_NAME)


def _holder_text() -> str:
    command = " ".join(["python"] + [shlex.quote(a) for a in sys.argv])
    started = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()}\nhost {socket.gethostname()}\nstarted {started}\ncommand {command}\n"


def describe_holder(path: str) -> str:
    """The holder as its lock file names it: "pid 1234 (python train_model.py ...)", with the host
    when it is another machine's."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        text = ""
    info = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    if "pid" not in info:
        return "a process that has not written its name yet"
    where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
    command = info.get("command", "")
    if len(command) > SHOWN_COMMAND:
        command = command[:SHOWN_COMMAND] + " ..."
    since = f", since {info['started']}" if "started" in info else ""
    return f"pid {info['pid']}{where}{since}" + (f": {command}" if command else "")


class FolderLock:
    """This process's hold on a folder; ``release()`` (idempotent) gives it up, and the last
    holder in the process removes the lock file, and the folder when it was made for the lock
    and stayed empty."""

    def __init__(self, folder: str, path: str):
        self.folder, self.path = folder, path
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1]:
            return
        del _held[self.path]
        fd, _, made_folder = entry
        try:
            # removed while still locked, so that no other run can take the name meanwhile;
            # one that opened it just before locks an unlinked file, which acquire() rejects
            os.ftruncate(fd, 0)
            os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock
        if made_folder:
            _remove_empty(self.folder)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def acquire(folder: str, out=print):
    """Hold ``folder`` for this run (making it if needed), or raise FolderInUse naming the run that
    holds it. Returns a FolderLock, or None where no lock can be taken (a remote store, a file
    system without locks: a note says so)."""
    if files.is_url(folder):
        out(f"note: models_dir={folder} is remote: no lock is taken there, so make sure no other training run "
            f"uses it at the same time")
        return None
    made = not os.path.isdir(folder)
    files.makedirs(folder)
    path = os.path.realpath(lock_file(folder))
    if path in _held:
        _held[path][1] += 1
        return FolderLock(folder, path)
    for _ in range(ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                out(f"note: models_dir={folder}: cannot lock {LOCK_NAME} there ({err.strerror}): make sure no other "
                    f"training run uses this folder at the same time")
                return None
            time.sleep(RETRY_SECONDS)
            continue
        if not _same_file(fd, path):  # its last holder removed it between our open and our lock
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        _held[path] = [fd, 1, made]
        return FolderLock(folder, path)
    if made:
        _remove_empty(folder)
    raise FolderInUse(f"models_dir={folder} is in use by another training run ({describe_holder(path)}): wait for "
                      f"it to end, or train into another models_dir")


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)  # only a folder nothing was written into
    except OSError:
        pass
