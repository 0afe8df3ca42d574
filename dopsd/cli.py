"""`dopsd` command line: one subcommand per module, imported only when used (keeps `--help` fast)."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from dopsd.commands import COMMANDS

# Errors of the machine, not of dopsd or the input: a full disk, a read-only or forbidden folder.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def build_parser(name: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"dopsd {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DOPSD_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: dopsd COMMAND [options]   (dopsd COMMAND --help for a command's options)\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        print("\n--debug (or DOPSD_DEBUG=1) shows the full traceback of an error.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndopsd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    from dopsd.errors import DopsdError

    try:
        parser = build_parser(name)
        try:  # config overrides may follow flags: `dopsd sample mini --steps 8 model.pretrained=base`
            args = parser.parse_intermixed_args(argv[1:])
        except TypeError:  # subcommands (`dopsd mini recipe`): argparse cannot intermix those, and needs not to
            args = parser.parse_args(argv[1:])
        return int(importlib.import_module(COMMANDS[name][0]).main(args) or 0)
    except DopsdError as err:  # bad input or a refused action: the message says what to do
        if debug:
            raise
        print(f"dopsd {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"dopsd {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the machine's limits are named; anything else is a bug in dopsd
        if debug:
            raise
        from dopsd.errors import EXIT_MACHINE
        from dopsd.files import disk_full

        if disk_full(err) and not (isinstance(err, OSError) and err.filename):  # e.g. a library's wrapped ENOSPC
            print(f"dopsd {name}: no space left on a device ({err}); free space and run again", file=sys.stderr)
            return EXIT_MACHINE
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            where = f" ({err.filename})" if err.filename else ""
            print(
                f"dopsd {name}: {err.strerror}{where}; free space or fix permissions there and run again",
                file=sys.stderr,
            )
            return EXIT_MACHINE
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's is a RuntimeError
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(
                f"dopsd {name}: out of memory ({first[:200]}); lower train.batch_size or model.height/width, turn "
                "on train.gradient_checkpointing or a lower model.dtype, or use a device with more memory",
                file=sys.stderr,
            )
            return EXIT_MACHINE
        print(
            f"dopsd {name}: internal error: {type(err).__name__}: {err}\n"
            "This is a bug in dopsd, not a problem with your input; please report it with the output of the "
            "same command run with --debug (or DOPSD_DEBUG=1), which shows the traceback.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
