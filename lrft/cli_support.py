"""What every `lrft` command shares, beside the commands themselves (lrft.cli): the help's shape, the
`error:` line and exit code of each kind of failure, `--version`, and the result on stdout.

Exit codes: 0 ok, 1 a bug (with its traceback), 2 a user mistake (one clear message, no traceback): an
LrftError, or a command line Click cannot parse (a missing option, a value of the wrong type), both as
one `error:` line; 74 the disk failed under a write (full, over quota, read-only, an I/O error: one
`error:` line too; nothing half-written is left, so the same command reruns once the disk is fixed);
75 a run stopped on request; 130 a second Ctrl-C.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import typer
from typer.core import TyperCommand, TyperGroup

from lrft import console
from lrft.errors import DISK_ERRORS, EXIT_DISK, DiskError, LrftError

# Click's exception classes, taken from Typer's public BadParameter: Typer ships its own copy of Click.
_CLICK = {c.__name__: c for c in typer.BadParameter.__mro__}
UsageError, ClickException = _CLICK["UsageError"], _CLICK["ClickException"]

# OS errors that say what is wrong with a path the user gave (its name, its links, its permissions),
# whichever check first touched it; any other OSError is a bug and keeps its traceback.
PATH_ERRORS = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows; give a shorter path",
    errno.ELOOP: "it goes through a loop of symbolic links; fix the links or give another path",
    errno.EACCES: "permission denied; give a path you may use, or change its permissions",
    errno.EPERM: "operation not permitted; give a path you may use, or change its permissions",
    errno.EROFS: "it is on a read-only file system; give a path on a writable one",
}
EXIT_INTERRUPTED = 130  # a second Ctrl-C: the shell's code for SIGINT


class UsageLine(ClickException):
    """A usage error shown as lrft shows every user mistake: one `error:` line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        console.error(self.message)


@contextmanager
def usage_in_one_line():
    """Click's usage errors (which print a usage block and `Error: ...`) as a UsageLine naming the
    option, the value and where to look; errors that show something else (help) pass unchanged."""
    try:
        yield
    except UsageError as e:
        if type(e).show is not UsageError.show:
            raise
        text = " ".join(e.format_message().split()).rstrip(".")
        # Typer converts values with pydantic, whose error (the cause) holds the value the message leaves out
        errors = e.__cause__.errors() if hasattr(e.__cause__, "errors") else []
        got = f" (got {errors[0]['input']!r})" if errors and "input" in errors[0] else ""
        where = e.ctx.command_path if e.ctx is not None else "lrft"
        raise UsageLine(f"{text[:1].lower()}{text[1:]}{got}; see `{where} --help`") from None


class LrftGroup(TyperGroup):
    """The `lrft` group, parsing its own and its commands' arguments under `usage_in_one_line`."""

    def make_context(self, *args, **kwargs):
        with usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with usage_in_one_line():
            return super().invoke(ctx)


class PlainHelp(TyperCommand):
    """Help that reads like other command lines': `lrft train [OPTIONS] RECIPE [KEY=VALUE]...` and
    arguments by their metavar, where typer writes `{recipe}`, `[overrides]...` and `<list[str]>`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        params = self.get_params(ctx)
        arguments = [(self.argument_name(p), p.help or "") for p in params if p.param_type_name == "argument"]
        options = [record for p in params if p.param_type_name == "option" and (record := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    @staticmethod
    def argument_name(param) -> str:
        return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")


def version(value: bool) -> None:
    """--version: lrft's version and those of the libraries a bug report needs, then exit."""
    if value:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        from lrft import __version__

        def of(package: str) -> str:
            try:
                return installed(package)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(
            f"lrft {__version__} (python {sys.version.split()[0]}, torch {of('torch')}, "
            f"transformers {of('transformers')}, peft {of('peft')})"
        )
        raise typer.Exit()


def user_errors(fn):
    """LrftError, and an OSError about a user's path, → one line on stderr and exit code 2; a disk that
    failed under a write → one line and exit code 74 (EXIT_DISK)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = 2
        try:
            return fn(*args, **kwargs)
        except DiskError as e:
            message, code = str(e), EXIT_DISK
        except LrftError as e:
            message = str(e)
        except OSError as e:
            if e.errno in PATH_ERRORS and e.filename is not None:
                message = f"{e.filename}: {PATH_ERRORS[e.errno]}"
            elif (message := unwrapped_disk_failure(e)) is not None:
                code = EXIT_DISK
            else:
                raise
        except Exception as e:
            if (message := unwrapped_disk_failure(e)) is None:
                raise
            code = EXIT_DISK
        console.error(message)
        raise typer.Exit(code) from None

    return wrapper


def unwrapped_disk_failure(error: Exception) -> str | None:
    """The line for a disk failure that no lrft writer named (a library's own write), else None."""
    from lrft.atomic_files import disk_errno

    code = disk_errno(error)
    if code is None:
        return None
    reason, fix = DISK_ERRORS[code]
    where = getattr(error, "filename", None)
    return (
        f"{where or 'a write'}: {reason} ({type(error).__name__}); {fix} and rerun the same command "
        f"(exit code {EXIT_DISK})"
    )


@contextmanager
def training_stops():
    """A run stopped on request (the trainer says where) → exit code 75: a scheduler requeues on it,
    rerunning resumes; a second Ctrl-C → exit 130."""
    from lrft.training import EXIT_STOPPED, Stopped

    try:
        yield
    except Stopped:  # pre-empted: the trainer said where; a scheduler requeues on this code
        raise typer.Exit(EXIT_STOPPED) from None
    except KeyboardInterrupt:
        console.err.print(
            "interrupted (a second Ctrl-C): stopped at once; rerun the same command to resume from the last checkpoint",
            markup=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def emit(result: dict, json_out: bool, lines: Callable[[dict], Iterable[str]]) -> None:
    """A command's result on stdout: as JSON with `--json`, else as its module's lines for people."""
    if json_out:
        console.emit_json(result)
    else:
        console.emit_lines(lines(result))
