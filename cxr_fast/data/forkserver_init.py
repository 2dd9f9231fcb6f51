"""Imported by the torch loader's forkserver at its start (multiprocessing's preload, set in `loaders/loader.py`),
and by nothing else: the forkserver ignores SIGTERM, as CPython's resource tracker does.

It lives in the job's process group. Killed by a SIGTERM sent to the group on preemption, it would take the loader's
workers with it (torch's worker watchdog takes their new parent for a dead main process), while the main process,
which reads their exit codes through the forkserver, would take them for joined and remove the temporary folder
their sockets are in. Ignoring SIGTERM, it still ends with the main process, when the pipe it watches closes; the
workers restore the default. Kept out of `loaders/` so that the preload imports nothing heavy.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
