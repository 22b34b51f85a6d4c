"""Parsing the ``dtlab`` command line: one-line parse errors, and ``dtlab train``'s saved
defaults (``train_defaults``: --preset, --config, --resume with the run's own settings).

tyro reports a mistyped flag or a missing one in a box of 8-32 lines that lists every
subcommand's options. :func:`parse` runs ``tyro.cli`` with a parse-error hook that turns the
common failures (an unknown option or command, a missing required option, a value tyro cannot
convert or that is not among the choices) into one ConfigError line naming the flag, with a
"did you mean" from ``difflib.get_close_matches`` over that subcommand's own flags; the CLI prints
it and exits 2. Failures the hook does not know fall through to tyro's own message.

The flags and subcommand names are read from tyro's ``--help`` output for the subcommand (what
the user sees), so they always match tyro's naming. The hook is ``tyro._errors.on_parse_error``,
tyro's experimental interface (1.0.17); with a tyro that lacks it, tyro's own messages are shown.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
from pathlib import Path
from typing import Any, Sequence

import tyro

from dtlab.config import TrainConfig
from dtlab.errors import ConfigError

# ``usage: dtlab data [-h] {info,validate,convert}``: the subcommand choices of a help text.
_SUBCOMMANDS = re.compile(r"^usage: .*\{([\w,-]+)\}", re.MULTILINE)
# An option row of tyro's help: ``│ --sweep, --no-sweep   Evaluate ...`` (in a box on a terminal,
# indented by two spaces otherwise; continuation rows are indented further). The flag column ends
# at two spaces.
_OPTION_ROW = re.compile(r"^[│| ] (-\S.*?)(?: {2}|\s*[│|]?\s*$)", re.MULTILINE)
_FLAG = re.compile(r"--[A-Za-z0-9][\w.-]*")


def _help_text(command: Any, words: Sequence[str], prog: str, config: tuple) -> str:
    """The ``--help`` text of subcommand ``words`` (e.g. ``["data", "info"]``), as tyro prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        tyro.cli(command, args=[*words, "--help"], prog=prog, config=config)
    return out.getvalue()


def _subcommand_path(command: Any, args: Sequence[str], prog: str,
                     config: tuple) -> tuple[list[str], str]:
    """The subcommand words that ``args`` selects (as far as they are valid) and that
    subcommand's help text."""
    words: list[str] = []
    text = _help_text(command, words, prog, config)
    for arg in args:
        match = _SUBCOMMANDS.search(text)
        if match is None or arg not in match.group(1).split(","):
            break
        words.append(arg)
        text = _help_text(command, words, prog, config)
    return words, text


def flags_of(help_text: str) -> list[str]:
    """Every ``--flag`` listed in the options of a tyro help text (``--x, --no-x`` both)."""
    return [flag for row in _OPTION_ROW.findall(help_text) for flag in _FLAG.findall(row)
            if flag != "--help"]


def _closest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1)
    return close[0] if close else None


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = _closest(word, choices)
    return f"; did you mean {close}?" if close else ""


class _Hook:
    """The parse-error hook: raises one ConfigError line for the events it knows."""

    def __init__(self, command: Any, args: Sequence[str], prog: str, config: tuple,
                 extra_flags: dict[str, Sequence[str]]):
        self.command, self.args, self.prog = command, args, prog
        self.config, self.extra_flags = config, extra_flags

    def path(self) -> tuple[list[str], str]:
        return _subcommand_path(self.command, self.args, self.prog, self.config)

    def __call__(self, event: Any) -> None:
        from tyro import _errors

        if isinstance(event, _errors.UnrecognizedArgs):
            self.unrecognized(event.tokens)
        elif isinstance(event, _errors.MissingArgs):
            if event.unrecognized_tokens:  # a mistyped flag explains the missing one best
                self.unrecognized(event.unrecognized_tokens)
            names = [a.arg.lowered.metavar if a.arg.is_positional() else a.arg.display_name()
                     for a in event.missing_arguments]
            words, _ = self.path()
            raise ConfigError(f"missing required {'arguments' if len(names) > 1 else 'argument'} "
                              f"{', '.join(names)} for {' '.join([self.prog, *words])}")
        elif isinstance(event, _errors.MissingSubcommand):
            words, text = self.path()
            match = _SUBCOMMANDS.search(text)
            choices = match.group(1).replace(",", ", ") if match else "see --help"
            raise ConfigError(f"{' '.join([self.prog, *words])} needs a command: {choices}")
        elif isinstance(event, _errors.InvalidChoice):
            raise ConfigError(f"invalid value {event.value!r} for {event.argument.display_name()}: "
                              f"expected one of {', '.join(event.choices)}"
                              f"{_did_you_mean(event.value, event.choices)}")
        elif isinstance(event, _errors.BadValue):
            name = event.argument.display_name()
            raise ConfigError(f"{name} takes no value ({event.offending_value!r} given)"
                              if event.reason == "fixed" else f"{name} is missing its value(s)")
        elif isinstance(event, _errors.InstantiationFailure) and event.argument is not None:
            metavar = getattr(getattr(event.argument, "lowered", None), "metavar", None)
            # tyro lists each member's failure for a union (float | None): its first line says it
            first = (event.message.strip().splitlines() or [""])[0].rstrip(".")
            expected = (f" (expected {metavar})" if isinstance(metavar, str) and metavar
                        and metavar not in first else "")
            raise ConfigError(f"invalid value for {event.argument.display_name()}: "
                              f"{first}{expected}")

    def unrecognized(self, tokens: Sequence[str]) -> None:
        words, text = self.path()
        where = " ".join([self.prog, *words])
        options = [t.split("=", 1)[0] for t in tokens if t.startswith("-")]
        if not options:  # a stray word: a mistyped subcommand, or a value with no flag
            match = _SUBCOMMANDS.search(text)
            choices = match.group(1).split(",") if match else []
            what = "command" if choices else "argument"
            raise ConfigError(f"unrecognized {what} {tokens[0]} for {where}"
                              f"{_did_you_mean(tokens[0], choices)}")
        flags = flags_of(text) + list(self.extra_flags.get(" ".join(words), ()))
        if len(options) == 1:
            raise ConfigError(f"unrecognized option {options[0]} for {where}"
                              f"{_did_you_mean(options[0], flags)}")
        parts = [f"{option} (did you mean {close}?)" if (close := _closest(option, flags)) else option
                 for option in options]
        raise ConfigError(f"unrecognized options {', '.join(parts)} for {where}")


def parse(command: Any, args: Sequence[str], *, prog: str, description: str,
          config: tuple = (), extra_flags: dict[str, Sequence[str]] | None = None,
          **kwargs: Any) -> Any:
    """``tyro.cli(command, args=args, ...)`` with one-line parse errors: ConfigError for an
    unknown option or command (with the closest of that subcommand's flags, or of
    ``extra_flags[subcommand words]``: options the CLI handles before tyro), a missing required
    option, or a value that is not accepted. ``--help`` prints and exits as tyro does."""
    try:
        from tyro import _errors
    except ImportError:  # a tyro without the hook: its own messages
        return tyro.cli(command, args=args, prog=prog, description=description, config=config,
                        **kwargs)
    hook = _Hook(command, args, prog, config, extra_flags or {})
    with _errors.on_parse_error(hook):
        return tyro.cli(command, args=args, prog=prog, description=description, config=config,
                        **kwargs)


def _flag_value(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``) in ``args`` and ``args`` without it."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def _check_saved_dataset(dataset: str | None, config_file: Path) -> None:
    """ConfigError when the dataset file (or replay directory) a run's settings name is not
    there (moved, or named relative to another directory, as runs before absolute paths were):
    --dataset says where."""
    from dtlab.data.formats import missing_file

    if dataset is None or (missing := missing_file(dataset)) is None:
        return
    raise ConfigError(f"{config_file}: the run's dataset {missing} is not there; pass "
                      "--dataset PATH where it is now (--resume checks that its content is the "
                      "run's)")


def train_defaults(args: list[str]) -> tuple[list[str], TrainConfig | None]:
    """``dtlab train``'s defaults that the other flags override: ``--preset NAME``
    (``dtlab.config.train_preset``), ``--config FILE`` (a train_config.json or a run directory:
    a new run from its settings, with ``--resume`` off and precision ``auto`` again), or with
    ``--resume`` the run's own train_config.json in ``--out`` (so ``--resume`` needs no other
    flag). Returns the arguments without ``--preset``/``--config`` and the defaults (None:
    parse as usual; also for a run saved in the flat format of dtlab before issue 9, resumed by
    giving its flags). ConfigError for an unreadable file, or ``--resume`` on a directory
    without a run and no ``--dataset``."""
    import dataclasses

    from dtlab.config import train_preset
    from dtlab.errors import ConfigError
    from dtlab.rundir import TRAIN_CONFIG_FILE, RunDirectory, read_train_config

    preset, args = _flag_value(args, "--preset")
    file, args = _flag_value(args, "--config")
    given_dataset = any(a == "--dataset" or a.startswith("--dataset=") for a in args)
    if preset is not None and (file is not None or "--resume" in args):
        raise ConfigError("--preset starts a new run: give it without --config and --resume")
    if preset is not None:
        return args, train_preset(preset)
    if file is not None:
        path = Path(file) / TRAIN_CONFIG_FILE if Path(file).is_dir() else Path(file)
        saved = read_train_config(path, flag="--config")
        return args, dataclasses.replace(
            saved, run=dataclasses.replace(saved.run, resume=False),
            optim=dataclasses.replace(saved.optim, precision="auto"))
    if "--resume" not in args:
        return args, None
    out = _flag_value(args, "--out")[0] or "runs/dt"
    run = RunDirectory(out)
    if run.is_run():
        if given_dataset and not isinstance(run.saved_config_json().get("optim"), dict):
            return args, None  # the flat format of older runs: resumed from the flags given
        saved = run.saved_config()
        if not given_dataset:
            _check_saved_dataset(saved.data.dataset, run.config_file)
        return args, saved
    if not given_dataset:
        raise ConfigError(f"{out}: --resume found no run here (no {TRAIN_CONFIG_FILE}); give the "
                          "--out of a run, or --dataset and --env to start one")
    return args, None
