"""Stop signals and stalls, watched from a thread, so neither depends on the main thread.

A Python signal handler runs only when the main thread returns to the interpreter; a step stuck
in native code (a oneDNN kernel spinning, a deadlocked collective) never does. So the C-level
handler also writes each signal's number to a socket (`signal.set_wakeup_fd`), and a watcher
thread reads it: a second signal, or a first one the step does not answer within `stop_grace`
seconds, ends the process at once. No signal mask is used: one set with `pthread_sigmask` would
be inherited by DataLoader workers and every child process.

The same thread is the stall watchdog: when no training step, evaluation batch or checkpoint
write has finished for `stall_timeout` seconds, it writes every thread's Python stack to the
command's log file, prints one line and exits with code 3.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

from cifar_cam.errors import TrainingInterrupted  # noqa: F401  (re-exported: the tasks raise it)

log = logging.getLogger("cifar_cam")

STALL_EXIT_CODE = 3
AUTO_STALL_FACTOR = 20       # auto: this many median steps without progress is a stall ...
AUTO_STALL_MINIMUM = 300.0   # ... but never less than 5 minutes (a slow disk, a busy machine)
SECOND_SIGNAL_WAIT = 1.0     # seconds the main thread gets to act on a second signal itself (a clean exit)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resolve_stall_timeout(setting: float | str | None, step_seconds: list[float] | deque[float]) -> float | None:
    """Seconds without progress that count as a stall: a number as given, 'auto' from the median step, None off."""
    if setting is None:
        return None
    if setting != "auto":
        return float(setting)
    if not step_seconds:
        return None
    return max(AUTO_STALL_MINIMUM, AUTO_STALL_FACTOR * statistics.median(step_seconds))


_ACTIVE: list[Supervisor] = []


def _reset_in_child() -> None:
    # A forked child (a DataLoader worker) must not write its signals into the parent's socket:
    # Ctrl-C reaches the whole process group and would count twice.
    if _ACTIVE:
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        _ACTIVE.clear()


os.register_at_fork(after_in_child=_reset_in_child)


class Supervisor:
    """SIGINT / SIGTERM and stalls for one command (`with Supervisor(...) as sup:`).

    While `armed` (training), a first signal asks the loop to stop after the current step
    (`requested()`); unarmed (setup, the final test), a signal stops at once with `unarmed_message`.
    Call `beat()` after every step / batch / checkpoint write: the watchdog measures from the last one.
    """

    def __init__(self, command: str, *, stall_timeout: float | str | None = "auto", stop_grace: float = 30.0,
                 log_file: Path | None = None) -> None:
        self.command = command
        self.stall_setting = stall_timeout
        self.stop_grace = float(stop_grace)
        self.log_file = log_file
        self.signum: int | None = None
        self.armed = False
        self.unarmed_message = "before training started; nothing was saved"
        self.where = "setup"                # what ran last, for the stall line ("epoch 3, step 17")
        self.last_checkpoint = "none"       # the last checkpoint written, for the stall line
        self.resume_hint = ""
        self._steps: deque[float] = deque(maxlen=1000)
        self._last_beat: float | None = None  # None until the first step: warm-up is never a stall
        self._last_step: float | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._pid = os.getpid()
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._signals_seen = 0
        self._deadline: tuple[float, int, str] | None = None  # (monotonic time, exit code, line) of a forced stop

    # -- what the loops call -------------------------------------------------------------------
    def requested(self) -> bool:
        """Whether a signal asked the command to stop."""
        return self.signum is not None

    def beat(self, where: str | None = None, step: bool = False) -> None:
        """Something finished (a training step when `step`); the stall clock restarts."""
        now = time.monotonic()
        with self._lock:
            if step:
                if self._last_step is not None:
                    self._steps.append(now - self._last_step)
                self._last_step = now
            if self._last_step is not None:  # armed from the first step on
                self._last_beat = now
            if where is not None:
                self.where = where

    def stall_timeout(self) -> float | None:
        """The stall timeout in force now (None: off, or auto before two steps were timed)."""
        with self._lock:
            return resolve_stall_timeout(self.stall_setting, list(self._steps))

    # -- signals ---------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker (Ctrl-C reaches the whole group): the main process decides
            return
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise TrainingInterrupted(f"{name} again: stopped at once {self.unarmed_message}", signum)
        if not self.armed:
            raise TrainingInterrupted(f"{name}: stopped {self.unarmed_message}", signum)
        self.signum = signum
        log.warning("%s received: stopping after this step (again to abort)", name)

    def _on_signal_byte(self, signum: int) -> None:
        """The watcher's view of a signal: schedules a forced stop in case the main thread cannot act."""
        if signum not in STOP_SIGNALS:
            return
        self._signals_seen += 1
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._signals_seen >= 2 or not self.armed:
            again = " again" if self._signals_seen >= 2 else ""
            self._deadline = (now + SECOND_SIGNAL_WAIT, 128 + signum,
                              f"{name}{again}: stopped at once {self.unarmed_message}")
        elif self._deadline is None:
            self._deadline = (now + self.stop_grace, 128 + signum,
                              f"{name}: the current step did not finish within trainer.stop_grace="
                              f"{self.stop_grace:g} s; stopped at once {self.unarmed_message}")

    # -- the watcher thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        assert self._sockets is not None
        reader = self._sockets[0]
        reader.settimeout(0.2)
        while not self._closed.is_set():
            try:
                data = reader.recv(64)
            except TimeoutError:
                data = b""
            except OSError:
                return
            for signum in data:
                self._on_signal_byte(signum)
            if self._closed.is_set():
                return
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline[0]:
                self._exit(self._deadline[1], self._deadline[2])
            self._check_stall(now)

    def _check_stall(self, now: float) -> None:
        timeout = self.stall_timeout()
        with self._lock:
            last = self._last_beat
        if timeout is None or last is None or now - last < timeout:
            return
        stalled = now - last
        self._dump_stacks(stalled)
        self._exit(STALL_EXIT_CODE,
                   f"stalled: nothing finished for {stalled:.0f} s (trainer.stall_timeout {timeout:.0f} s) after "
                   f"{self.where}; the Python stack of every thread is in {self.log_file or 'the log'}; "
                   f"last good checkpoint: {self.last_checkpoint}" + (f"; {self.resume_hint}" if self.resume_hint
                                                                      else ""))

    def _dump_stacks(self, stalled: float) -> None:
        if self.log_file is None:
            return
        try:
            with open(self.log_file, "a") as f:
                f.write(f"\n[stall] nothing finished for {stalled:.0f} s after {self.where}; every thread's stack:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass

    def _exit(self, code: int, line: str) -> None:
        """Ends the process now, from the watcher thread: one line on stderr and in the log, then os._exit.

        A stall is an error; a stop that was asked for (a signal: exit 128 + n) is said as one, at warning level.
        """
        stopped = code > 128
        try:
            log.log(logging.WARNING if stopped else logging.ERROR, "%s", line, extra={"file_only": True})
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[?25h\n")  # a live progress bar hid the cursor
                sys.stdout.flush()
            print(f"cifar-cam {self.command}: {'stopped' if stopped else 'error'}: {line}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        main = threading.current_thread() is threading.main_thread()
        if main:  # signal handlers can only be set from the main thread (a launcher's worker thread: watchdog only)
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        self._sockets = socket.socketpair()
        for sock in self._sockets:
            sock.setblocking(False)
        if main:
            self._previous_wakeup = signal.set_wakeup_fd(self._sockets[1].fileno(), warn_on_full_buffer=False)
        _ACTIVE.append(self)
        self._thread = threading.Thread(target=self._watch, name="cifar-cam-supervisor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._previous:
            signal.set_wakeup_fd(self._previous_wakeup)
            for s, handler in self._previous.items():
                signal.signal(s, handler)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sockets is not None:
            for sock in self._sockets:
                sock.close()
