"""The writer lease: one pipeline run writes a dataset root at a time.

The pipeline commits in DatasetWriter mode "append": it skips the images it knows are
committed as of its own start and assumes that no other writer commits the same images
meanwhile. Two runs on one root at once would both write the images their inputs share (two
rows per image, two image ids under one image_key). So a run first takes the root's lease,
a small JSON record beside the tables (dataset.storage.WRITER_LEASE: run_id, host, pid,
pid_namespace, started, heartbeat, token), and a second run is refused with LeaseHeld (an
InputError: the jobs print one line and exit 2) naming the holder.

Local roots: the file is created with O_EXCL and held under flock(2) for the run's life.
The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a
lease whose lock is free is a dead run's and the next run takes it over at once.

S3 roots have no locks, so liveness is a heartbeat. The object is created by a conditional
put (If-None-Match: *) and rewritten every HEARTBEAT_S by a thread of the driver with
If-Match on its own last ETag. A lease whose last write is STALE_S old by the store's clock
(or at once, one naming a process of this host and pid namespace that is gone) is taken over
by a put If-Match on its ETag, so of several takers exactly one wins. A run whose heartbeat
finds its lease taken stops at its next batch (LeaseLost).

Fencing. The driver's check stops the run, but batches already handed to the writer actors
would still commit after another run took the lease over and read what the tables hold. So
each acquisition writes a fresh random token into the record, and every commit of a
pipeline run (pipeline.graph: its writer actors' and its driver's, through DatasetWriter's
fence; pipeline.rebuild: a rebuild's own deletes, listing record and vacuums too) first
calls confirm(): the record must still name this run and this token, else the commit is
refused with LeaseLost (the driver's message) and its batch is dropped; the driver, seeing
a writer fail, confirms too and ends the run with that one line (a rebuild stops before
the refused delete or vacuum, with the same line). A takeover always writes the taker's
token (on S3 by its put If-Match; on a local root once the holder's process, and with it
its flock, is gone), so from then on every writer of the old run is refused. That matters
on local roots too: a dead driver's writer actors outlive it until Ray reaps its job (in our
trials about a second when its embedded Ray died with it, a few milliseconds on a joined
cluster).

What is left open: confirm() and the Delta commit are two steps, not one atomic one (no
store makes a Delta commit conditional on another object). A commit whose confirm() passed
just before a takeover still lands after it, as late as that commit takes to finish (its
Parquet upload and log entry: normally seconds, longer if the store stalls it). The taker
may then miss those images in what it read as committed and write them again (two rows
for one image_id, which dataset.validation reports as duplicate_image). Nothing committed
is lost either way. Likewise a rebuild's vacuum of one table whose confirm() passed just
before a takeover runs to its end, and with a short --retention-hours may delete Parquet
files the taker has uploaded but not yet committed; the taker's version then names files
that are gone (dataset.maintenance.missing_files finds them; after repair, a rerun of
the taker writes those images again).

The jobs call check_free before they start or join Ray: the same liveness test, read-only,
so that a run bound to be refused is refused at once rather than after Ray's start. It is
advisory; acquire() still decides, and a run that slips in between is refused there.

Interactive writers (the annotation service, imports) commit with MERGE, which is safe
beside any writer, and take no lease.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from dataset.storage import WRITER_LEASE, is_s3

from .sources import InputError, s3_filesystem

HEARTBEAT_S = 20.0  # seconds between the holder's rewrites of its record
STALE_S = 90.0  # an S3 lease not rewritten for this long is a dead run's


class LeaseHeld(InputError):
    """Another run holds the root's lease; holder: its record (None when unreadable)."""

    def __init__(self, message: str, holder: dict | None):
        super().__init__(message)
        self.holder = holder


class LeaseLost(InputError):
    """Another run took this run's lease over (its heartbeat stalled past STALE_S)."""


class WriterLease:
    """The lease of the dataset root `root`, held by this process from acquire() to release();
    as a context manager, held inside the `with`. run_id names the run in the record (set or
    changed later with name_run)."""

    def __init__(self, root: str, endpoint_url: str | None = None, *, run_id: str | None = None, log=print):
        self.root, self.endpoint_url, self.log = str(root), endpoint_url, log
        self.record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_namespace": _pid_namespace(), "started": _now(), "heartbeat": None,
                       "token": uuid.uuid4().hex}
        self.store = _S3Lease(self.root, endpoint_url) if is_s3(self.root) else _LocalLease(self.root)
        self.lost: str | None = None  # why the lease is no longer ours
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> WriterLease:
        """Take the lease, or raise LeaseHeld naming the live run that holds it."""
        self.record["heartbeat"] = _now()
        try:
            previous = self.store.acquire(self._text())
        except _Held as held:
            raise LeaseHeld(self._refusal(held.holder, held.age), held.holder) from None
        if previous is not None:
            self.log(f"took over the writer lease of {self.root} from {_describe(previous)}, which is no "
                     "longer running")
        self._thread = threading.Thread(target=self._heartbeat, name="writer-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def name_run(self, run_id: str) -> None:
        """Name the run holding the lease (a rebuild takes it before its run has an id)."""
        if self.record["run_id"] != run_id:
            self.record["run_id"] = run_id
            self.beat()

    @property
    def token(self) -> str:
        """This acquisition's fencing token: what a process committing for the run passes to
        confirm() (with the root and the run id)."""
        return self.record["token"]

    def check(self) -> None:
        """LeaseLost when this run's heartbeat has found the lease taken over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def confirm(self) -> None:
        """LeaseLost unless the store's record is still this run's: check(), then a read."""
        self.check()
        try:
            confirm(self.root, self.endpoint_url, self.record["run_id"], self.token)
        except LeaseLost as e:
            with self._lock:  # no more heartbeats, and release() leaves the record alone
                self.lost = self.lost or str(e)
            raise

    def beat(self) -> None:
        """Rewrite the record with a new heartbeat; a lease found taken sets self.lost."""
        with self._lock:
            if self.lost:
                return
            self.record["heartbeat"] = _now()
            try:
                self.store.write(self._text())
            except _Held as held:
                self.lost = _lost(self.root, held.holder)
            except Exception as e:  # a store hiccup: the next beat tries again
                self.log(f"warning: writer lease heartbeat of {self.root} failed: {type(e).__name__}: {e}")

    def release(self) -> None:
        """Stop the heartbeat and remove the record (unless another run has taken it over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if not self.lost:
                self.store.release()

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.beat()

    def _text(self) -> str:
        return json.dumps(self.record, sort_keys=True)

    def _refusal(self, holder: dict | None, age: float | None) -> str:
        ago = f" ({age:.0f} s ago by the store's clock)" if age is not None else ""
        if isinstance(self.store, _LocalLease):
            dead = (f"If that run hangs, stop it (pid {_field(holder, 'pid')} on {_field(holder, 'host')}): "
                    f"its lease ({self.store.path}) is free the moment its process exits")
        else:
            dead = (f"If that run is dead, the next run takes its lease ({self.store.uri}) over once its last "
                    f"heartbeat is {STALE_S:.0f} s old (at once on host {_field(holder, 'host')} when pid "
                    f"{_field(holder, 'pid')} is gone)")
        return (f"output {self.root} is being written by another pipeline run: {_describe(holder)}, started "
                f"{_field(holder, 'started')}, last heartbeat {_field(holder, 'heartbeat')}{ago}. One pipeline "
                f"run writes a dataset at a time: wait for that run to finish, or write to another --output. "
                f"{dead}")


def check_free(root: str, endpoint_url: str | None = None) -> None:
    """LeaseHeld, with acquire()'s message, when a live run holds root's lease; reads only
    (no root, no lease, or a dead run's lease: returns)."""
    lease = WriterLease(root, endpoint_url)
    live = lease.store.live_holder()
    if live is not None:
        raise LeaseHeld(lease._refusal(*live), live[0])


def confirm(root: str, endpoint_url: str | None, run_id: str | None, token: str) -> None:
    """LeaseLost, with the driver's message, unless root's lease is still the one that run
    run_id took with token (WriterLease.token); one read of the record. The fence before each
    commit of a pipeline run: see the module's docstring for what it leaves open."""
    holder = read_lease(root, endpoint_url)
    if not holder or holder.get("token") != token or holder.get("run_id") != run_id:
        raise LeaseLost(_lost(root, holder))


def read_lease(root: str, endpoint_url: str | None = None) -> dict | None:
    """The record of the lease of root, or None when no run holds one (or it is unreadable)."""
    if is_s3(root):
        try:
            return _S3Lease(root, endpoint_url).get()[0]
        except FileNotFoundError:
            return None
    try:
        with open(_LocalLease(root).path, "rb") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


class _Held(Exception):
    def __init__(self, holder: dict | None, age: float | None = None):
        self.holder, self.age = holder, age


class _LocalLease:
    def __init__(self, root: str):
        self.path = os.path.join(os.path.abspath(root.removeprefix("file://")), WRITER_LEASE)
        self.fd: int | None = None

    def acquire(self, text: str) -> dict | None:
        """Hold the file's lock and write text; returns the record of the dead run taken over."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                _lock_exclusive(fd)
            except BlockingIOError:
                holder = _read_settled(fd)
                os.close(fd)
                raise _Held(holder) from None
            except OSError as e:  # a filesystem without flock(2) (some FUSE mounts)
                os.close(fd)
                raise InputError(f"output {os.path.dirname(self.path)}: cannot lock {self.path}: {e}") from e
            if not _same_file(fd, self.path):  # released (unlinked) between our open and lock
                os.close(fd)
                continue
            previous = None if created else _parse(os.pread(fd, 1 << 16, 0))
            self.fd = fd
            self.write(text)
            return previous

    def live_holder(self) -> tuple[dict | None, None] | None:
        """(record, None) while a live process holds the lease, else None. A shared lock is
        free exactly when no process holds the exclusive one."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_settled(fd), None
        except OSError:  # no flock(2) here: acquire() says so
            return None
        finally:
            os.close(fd)  # drops our shared lock, if taken
        return None

    def write(self, text: str) -> None:
        """One pwrite at offset 0, padded with spaces (valid JSON) so the file never shrinks and
        a reader never sees a truncated tail."""
        data = text.encode()
        size = os.fstat(self.fd).st_size
        os.pwrite(self.fd, data.ljust(size), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        os.unlink(self.path)  # while locked: no one else can hold this file now
        os.close(self.fd)
        self.fd = None


def _lock_exclusive(fd: int, wait_s: float = 0.25) -> None:
    """flock(LOCK_EX) without blocking on a holder; BlockingIOError when the file stays
    locked. A check_free elsewhere holds a shared lock for moments only, so a lock that is
    busy is tried again briefly before the lease counts as held."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_settled(fd: int, wait_s: float = 1.0) -> dict | None:
    """The holder's record; a holder that has only just created the file writes it within moments."""
    deadline = time.monotonic() + wait_s
    while True:
        record = _parse(os.pread(fd, 1 << 16, 0))
        if record is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


class _S3Lease:
    def __init__(self, root: str, endpoint_url: str | None):
        self.fs = s3_filesystem(endpoint_url)
        scheme, path = root.split("://", 1)
        self.bucket, _, prefix = path.partition("/")
        self.key = f"{prefix.strip('/')}/{WRITER_LEASE}".lstrip("/")
        self.uri = f"{scheme}://{self.bucket}/{self.key}"
        self.etag: str | None = None

    def acquire(self, text: str) -> dict | None:
        holder, age = None, None
        for _ in range(5):
            try:
                self.etag = self._put(text, IfNoneMatch="*")
                return None
            except OSError as e:
                if not _precondition_failed(e):
                    raise
            try:
                holder, etag, age = self.get()
            except FileNotFoundError:  # released meanwhile
                continue
            if _live(holder, age):
                raise _Held(holder, age)
            try:
                self.etag = self._put(text, IfMatch=etag)
                return holder or {}
            except OSError as e:  # another run took it over first: look again
                if not _precondition_failed(e):
                    raise
        raise _Held(holder, age)

    def live_holder(self) -> tuple[dict | None, float] | None:
        """(record, age) while the lease is a live run's, else None."""
        try:
            holder, _, age = self.get()
        except FileNotFoundError:
            return None
        return (holder, age) if _live(holder, age) else None

    def write(self, text: str) -> None:
        try:
            self.etag = self._put(text, IfMatch=self.etag)
        except OSError as e:
            if not _precondition_failed(e):
                raise
            try:
                holder = self.get()[0]
            except FileNotFoundError:
                holder = None
            raise _Held(holder) from None

    def release(self) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except FileNotFoundError:
            pass
        except OSError as e:
            if _precondition_failed(e):  # not ours any more
                return
            # A store without conditional deletes: delete it if it is still ours.
            try:
                if self.get()[1] == self.etag:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                pass

    def get(self) -> tuple[dict | None, str, float]:
        """(record, ETag, seconds since it was written by the store's clock); FileNotFoundError
        when there is none."""
        from fsspec.asyn import sync

        async def get_object():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = response["Body"]
            try:
                return response, await body.read()
            finally:
                body.close()

        response, data = sync(self.fs.loop, get_object)
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return _parse(data), response["ETag"], (now - response["LastModified"]).total_seconds()

    def _put(self, text: str, **condition: str) -> str:
        response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=text.encode(),
                                   ContentType="application/json", **condition)
        return response["ETag"]


def _precondition_failed(error: OSError) -> bool:
    """Whether an s3fs error is a failed If-Match / If-None-Match (412), or AWS's 409 for a
    conditional write racing another."""
    if isinstance(error, FileExistsError):
        return True
    cause = getattr(error.__cause__, "response", None) or {}
    return cause.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


def _live(holder: dict | None, age: float) -> bool:
    """Whether an S3 lease last written age seconds ago is a live run's: renewed within
    STALE_S, and not naming a process of this host that is gone."""
    return not (age > STALE_S or _dead_here(holder))


def _dead_here(holder: dict | None) -> bool:
    """Whether holder names a process of this host and pid namespace that no longer exists."""
    if not holder or holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    if holder.get("pid_namespace") is None or holder.get("pid_namespace") != _pid_namespace():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so that two containers sharing a host name never
    judge each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _lost(root: str, holder: dict | None) -> str:
    """Why a run's lease is no longer its own, in one line: holder is the record there now."""
    if holder is None:
        return (f"lost the writer lease of {root}: its record is gone or unreadable (removed, or this run ended "
                "and released it). What this run committed is kept; rerun the same command")
    why = f"this run did not renew it for over {STALE_S:.0f} s" if is_s3(root) else "this run's driver process ended"
    return (f"lost the writer lease of {root} to {_describe(holder)}: {why}, so that run took it over. What this "
            "run committed is kept; rerun the same command once that run has finished")


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a run whose record is not readable yet"
    return f"run {holder.get('run_id') or '(run id not set yet)'} on host {_field(holder, 'host')}, pid " \
           f"{_field(holder, 'pid')}"


def _field(holder: dict | None, name: str) -> str:
    return str((holder or {}).get(name) or "?")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
