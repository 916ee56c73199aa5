"""Running generated code, only when the user opts in, each program in a sandboxed subprocess.

Code a model wrote is never run inside lrft's process. Each program gets:
- its own `python -I -B` subprocess (isolated: no user site, no PYTHON* variables, no bytecode written)
  in a fresh temp dir removed afterwards, with an environment of PATH, HOME and TMPDIR (that dir)
  and nothing inherited, so no credential of the caller's reaches it;
- resource limits the child sets on itself before the program runs, soft and hard so it cannot raise
  them: address space (memory), CPU seconds, open files, file size, and processes;
- an audit hook (PEP 578, which Python code cannot remove) that refuses, with PermissionError:
  writing, creating, removing or renaming anything outside its temp dir; starting processes (fork,
  exec, spawn, system, subprocess, and the `_posixsubprocess` module behind it), since root is not
  bound by the process limit; loading native code (ctypes); network connections; signals to others;
- a wall-clock limit, after which its whole process group is killed.

This keeps a wrong, endless or greedy program from harming the machine or the evaluation; it is not
a boundary against code written to escape (run untrusted models in a container for that).

A result is the outcome only (passed, failed with the exception's name, timed out), never the
program's output, so nothing it read is written anywhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lrft.errors import LrftError

ALLOW_ENV = "LRFT_ALLOW_CODE_EXECUTION"


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0  # wall clock (CPU time is limited to the same)
    memory_bytes: int = 2 * 2**30  # address space
    file_bytes: int = 16 * 2**20  # largest file it may write (in its temp dir)
    processes: int = 16
    open_files: int = 64


def execution_allowed(flag: bool) -> bool:
    """Whether the user opted in: --allow-code-execution, or LRFT_ALLOW_CODE_EXECUTION=1."""
    return flag or os.environ.get(ALLOW_ENV, "") == "1"


def require_permission(flag: bool, what: str) -> None:
    if not execution_allowed(flag):
        raise LrftError(
            f"--allow-code-execution: {what} runs the code the model generates; pass --allow-code-execution "
            f"(or set {ALLOW_ENV}=1) to run it, each program in a sandboxed subprocess"
        )


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[str]:
    """The outcome of each program, in order: "passed", "failed: <exception name>" or "timed out"."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on their subprocess
        return list(pool.map(lambda p: run_program(p, limits), programs))


def run_program(program: str, limits: Limits = Limits()) -> str:
    with tempfile.TemporaryDirectory(prefix="lrft-sandbox-") as root:
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        args = [str(v) for v in (limits.seconds, limits.memory_bytes, limits.file_bytes, limits.processes)]
        with open(os.path.join(root, "stderr.txt"), "wb") as stderr:  # a file: its size is limited, a pipe's not
            child = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _GUARD, root, *args, str(limits.open_files)],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: killed whole below
            )
            try:
                child.wait(timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                return "timed out"
            finally:
                _kill_group(child.pid)
                child.wait()
        if child.returncode == 0:
            return "passed"
        with open(os.path.join(root, "stderr.txt"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            name = _exception_name(f.read())
        if name:
            return f"failed: {name}"
        code = child.returncode
        return f"failed: killed by {signal.Signals(-code).name}" if code < 0 else f"failed: exit status {code}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exception_name(stderr: bytes) -> str | None:
    """The name of the exception that ended the program, if its traceback's last line names one; never
    the message, which may quote what the program read."""
    last = [line for line in stderr.decode("utf-8", "replace").splitlines() if line and not line[0].isspace()]
    found = (
        re.fullmatch(r"([A-Za-z_][\w.]{0,80}(?:Error|Exception|Exit|Interrupt|Warning))(?::.*)?", last[-1])
        if last
        else None
    )
    return found.group(1) if found else None


# The child: limits first, then the audit hook, then the program. Its argv: root, seconds, memory,
# file size, processes, open files.
_GUARD = r"""
import os, resource, sys
root = os.path.realpath(sys.argv[1])
seconds, memory, file_size, processes, open_files = sys.argv[2:7]
for limit, value in ((resource.RLIMIT_AS, int(memory)), (resource.RLIMIT_CPU, int(float(seconds)) + 1),
                     (resource.RLIMIT_FSIZE, int(file_size)), (resource.RLIMIT_NPROC, int(processes)),
                     (resource.RLIMIT_NOFILE, int(open_files)), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
    source = f.read()

NEVER = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
         "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.connect", "socket.bind",
         "socket.sendto", "socket.sendmsg", "resource.setrlimit", "resource.prlimit", "sys.addaudithook"}
NO_IMPORT = {"_posixsubprocess", "_ctypes", "ctypes"}
PATHS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
         "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "shutil.rmtree": 1, "os.chdir": 1}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
    return real == root or real.startswith(root + os.sep)

def guard(event, args):
    if event in NEVER or (event == "import" and args[0] in NO_IMPORT):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing outside {root} is not allowed")
    elif event in PATHS and not all(inside(p) for p in args[: PATHS[event]] if p is not None):
        raise PermissionError(f"sandbox: {event} outside {root} is not allowed")

sys.addaudithook(guard)
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""
