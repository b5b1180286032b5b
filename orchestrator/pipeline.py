"""Pure pipeline logic: argv placeholders, retry backoff, and what a run's result does to an item.

Nothing here does I/O or awaits; the workers call it and the store records the result.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from orchestrator.runner import Outcome
from orchestrator.store.records import ItemState, Transition

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from orchestrator.config import StageConfig
    from orchestrator.runner import RunResult
    from orchestrator.store.records import Item

__all__ = [
    "AWK",
    "PLACEHOLDERS",
    "SHELLS",
    "backoff_delay",
    "code_argument",
    "decide",
    "expand_argv",
    "find_code",
    "placeholder_lookalikes",
    "uses_placeholder",
]

#: The names a command template may use as ``{name}``; each also reaches the command as an
#: ``ORCH_<NAME>`` environment variable.
PLACEHOLDERS = ("path", "name", "item", "stage", "attempt", "workdir", "payload")

_NAMES = "|".join(PLACEHOLDERS)
#: A placeholder, or one written with doubled braces: ``{{path}}`` is the text ``{path}``.
#: In tripled braces, the value in braces: ``{{{name}}}`` is ``{`` + the value + ``}``.
_PLACEHOLDER = re.compile(
    r"\{\{\{(" + _NAMES + r")\}\}\}|\{\{(" + _NAMES + r")\}\}|\{(" + _NAMES + r")\}"
)


def expand_argv(
    template: tuple[str, ...], values: Mapping[str, str], *, verbatim: int | None = None
) -> tuple[str, ...]:
    """Substitute placeholders inside each argument; every argument stays exactly one argument.

    Substitution is a single pass, so a value that itself contains ``{item}`` is never expanded
    again. A placeholder in doubled braces is passed as the placeholder's text: ``{{path}}``
    becomes ``{path}`` (for a program with templates of its own). The argument at index
    ``verbatim`` (`code_argument`: the script of ``sh -c``) is passed as written: a value put
    into code would run as code.
    """

    def fill(match: re.Match[str]) -> str:
        braced, literal, name = match.groups()
        if braced is not None:
            return "{" + values[braced] + "}"
        return "{" + literal + "}" if literal is not None else values[name]

    return tuple(
        arg if index == verbatim or "{" not in arg else _PLACEHOLDER.sub(fill, arg)
        for index, arg in enumerate(template)
    )


#: Shells: a short option group holding ``c`` (``-c``, ``-ec``, ``-ce``, ``-xc``) makes the first
#: operand the script.
SHELLS = frozenset(("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish"))
#: Interpreters: (letters that end a short option group before the code, long options before
#: the code, options that take a value, options after which the rest is not code).
_INTERPRETERS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "python": ("c", (), ("-W", "-X"), ("-m",)),
    "perl": ("eE", (), (), ()),
    "ruby": ("e", (), (), ()),
    "node": ("ep", ("--eval", "--print"), ("-r", "--require"), ()),
    "php": ("r", (), (), ()),
    "lua": ("e", (), (), ()),
    "Rscript": ("e", (), (), ()),
}
_PYTHON_NAME = re.compile(r"(?:python|pypy)[0-9.]*")
AWK = frozenset(("awk", "gawk", "mawk", "nawk"))
_SHELL_OPTION_VALUE = frozenset(("-o", "+o", "-O", "+O"))


def code_argument(template: tuple[str, ...]) -> int | None:
    """The index of the argument of ``template`` that is code, or None: the script of ``sh -c
    SCRIPT`` (``bash -ec``, ``sh -ce``, ``busybox sh -c``), the code of ``python3 -c``,
    ``perl -e``, ``ruby -e``, ``node -e``/``-p``, ``php -r``, an awk program, the command of
    ``flock LOCK -c`` and ``su -c``.

    Placeholders are not substituted there (`expand_argv`): ``sh -c 'echo ${name}'`` must not
    turn a file called ``$(touch PWNED)`` into a command. The values reach the code as
    arguments after it (``"$1"``, ``sys.argv[1]``, ``awk -v``) or as ``ORCH_*`` variables.

    The program is the command's first word or, behind a known wrapper (``timeout 10 sh -c``,
    ``flock LOCK env sh -c``, ``nice``, ``xargs``, ``find -exec``), the command it runs
    (`find_code`).
    """
    found = find_code(template)
    return None if found is None else found[0]


def find_code(template: tuple[str, ...], *, joined: bool = False) -> tuple[int, str] | None:
    """``(index, program)`` of the code argument of ``template`` (`code_argument`), or None.

    ``joined``: also the first of the words a program joins and hands to a shell of its own --
    ``ssh HOST CMD ARG…`` (the shell on the other host), ``watch CMD ARG…`` (``sh -c``, unless
    ``-x``). Those are only warned about (`plan.config_warnings`): their placeholders are filled
    in as always, since such a command has no other way to get a value.

    The program is the command's first word, or the command a known wrapper runs (``timeout
    10 sh -c``, ``flock LOCK env A=1 bash -ec``, ``nice``, ``xargs``, ``find -exec``): a
    wrapper's own options and operands are skipped by its syntax, so a word that merely names
    a program further on (``grep -c awk {path}``, ``flock LOCK gzip -c {path}``) is data, as it
    was before wrappers were looked into (found by an acceptance tester, session 16).
    """
    index = 0
    while index < len(template):
        program = template[index].rsplit("/", 1)[-1]
        if _PYTHON_NAME.fullmatch(program):
            program = "python"
        found: int | None = None
        if program in SHELLS:
            found = _shell_script(template, index + 1)
        elif program in _INTERPRETERS:
            found = _interpreter_code(template, index + 1, *_INTERPRETERS[program])
        elif program in AWK:
            found = _awk_program(template, index + 1)
        elif program in ("su", "runuser"):  # `su [-] [USER] -c CMD`: a -c anywhere is the shell's
            found = next((i + 1 for i in range(index + 1, len(template) - 1)
                          if template[i] in ("-c", "--command")), None)  # fmt: skip
        elif program == "script":  # `script [options] [file]`: -c among its options
            found = _interpreter_code(template, index + 1, "c", ("--command",), (), ())
        elif program == "flock":  # `flock [options] LOCK -c CMD` or `flock [options] LOCK CMD…`
            after_lock = _after_options(template, index + 1, _FLOCK_VALUES) + 1
            if template[after_lock : after_lock + 1] not in (("-c",), ("--command",)):
                index = after_lock
                continue
            found = after_lock + 1
        elif joined and program == "ssh":  # `ssh [options] DESTINATION COMMAND…`
            found = _after_options(template, index + 1, _SSH_VALUES) + 1
        elif joined and program == "watch":  # `watch [options] COMMAND…`, without -x
            found = _after_options(template, index + 1, _WATCH_VALUES)
            if any(a == "--exec" or _short_group(a, "x") for a in template[index + 1 : found]):
                return None
        elif program == "find":  # the command after -exec (-execdir, -ok, -okdir)
            index = next((i + 1 for i in range(index + 1, len(template))
                          if template[i] in ("-exec", "-execdir", "-ok", "-okdir")),
                         len(template))  # fmt: skip
            continue
        elif program in _WRAPPERS:
            values, operands = _WRAPPERS[program]
            index = _after_options(template, index + 1, values, assignments=program == "env")
            index += operands
            continue
        if found is None or found >= len(template):
            return None
        return found, program
    return None


#: Programs that run a command given after their own options and operands: the options that
#: take a value, and how many operands come before the command.
_WRAPPERS: dict[str, tuple[frozenset[str], int]] = {
    "timeout": (frozenset(("-s", "--signal", "-k", "--kill-after")), 1),
    "nice": (frozenset(("-n", "--adjustment")), 0),
    "env": (frozenset(("-u", "--unset", "-C", "--chdir")), 0),
    "stdbuf": (frozenset(("-i", "-o", "-e", "--input", "--output", "--error")), 0),
    "ionice": (frozenset(("-c", "-n", "-p", "-P", "-u", "--class", "--classdata")), 0),
    "setsid": (frozenset(), 0),
    "nohup": (frozenset(), 0),
    "chrt": (frozenset(("-T", "-P", "-D")), 1),
    "taskset": (frozenset(), 1),
    "sudo": (frozenset(("-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U")), 0),
    "doas": (frozenset(("-u", "-C")), 0),
    "xargs": (
        frozenset(
            (
                "-a",
                "-d",
                "-E",
                "-I",
                "-L",
                "-n",
                "-P",
                "-s",
                "--arg-file",
                "--delimiter",
                "--max-args",
                "--max-procs",
                "--max-chars",
            )
        ),
        0,
    ),
    "time": (frozenset(("-f", "-o", "--format", "--output")), 0),
    "busybox": (frozenset(), 0),
    "exec": (frozenset(("-a",)), 0),
    "unbuffer": (frozenset(), 0),
}
_FLOCK_VALUES = frozenset(("-w", "--timeout", "-E", "--conflict-exit-code"))
#: ssh's options that take a value (the next argument).
_SSH_VALUES = frozenset(f"-{c}" for c in "BbcDEeFIiJLlmOoPpQRSWw")
_WATCH_VALUES = frozenset(("-n", "--interval"))


def _after_options(
    template: tuple[str, ...], index: int, values: frozenset[str], *, assignments: bool = False
) -> int:
    """The index of the first operand from ``index`` on: options (``-x``, ``-n 5``, ``-n5``,
    ``--signal=KILL``; ``values`` take the next argument), ``--``, and for ``env`` its
    ``NAME=value`` assignments are skipped."""
    while index < len(template):
        arg = template[index]
        if arg == "--":
            return index + 1
        if arg in values:
            index += 2
        elif (arg.startswith("-") and arg != "-") or (assignments and "=" in arg):
            index += 1
        else:
            return index
    return index


def _short_group(arg: str, letters: str) -> bool:
    """Whether ``arg`` is a group of short options (``-ec``) holding one of ``letters``."""
    return len(arg) > 1 and arg[0] == "-" and arg[1:].isalpha() and any(c in arg for c in letters)


def _shell_script(template: tuple[str, ...], index: int) -> int | None:
    """The script of a shell whose options start at ``index``: the first operand after them
    when a group holds ``c``."""
    has_c = False
    while index < len(template):
        arg = template[index]
        if arg in _SHELL_OPTION_VALUE:  # an option and its name: `bash -o pipefail`
            index += 2
            continue
        if arg == "--":
            index += 1
            break
        if not arg.startswith(("-", "+")) or arg in ("-", "+"):
            break  # the first operand: the script with -c, else a script's file
        has_c = has_c or _short_group(arg, "c")
        index += 1
    return index if has_c and index < len(template) else None


def _interpreter_code(
    template: tuple[str, ...], index: int, letters: str, long: tuple[str, ...],
    with_value: tuple[str, ...], ending: tuple[str, ...],
) -> int | None:  # fmt: skip
    """The code after an interpreter's ``-c``/``-e`` (``-Sc``, ``-le``, ``--eval``)."""
    while index < len(template) - 1:
        arg = template[index]
        if arg in with_value:
            index += 2
            continue
        if arg == "--" or arg in ending or not arg.startswith("-") or arg == "-":
            return None  # options end here: the rest are a script's file and its arguments
        if arg in long or (arg[1:].isalpha() and arg[-1] in letters):
            return index + 1
        index += 1
    return None


def _awk_program(template: tuple[str, ...], index: int) -> int | None:
    """The program argument of awk, its options from ``index`` (None: it reads ``-f FILE``)."""
    while index < len(template):
        arg = template[index]
        if arg == "--":
            return index + 1 if index + 1 < len(template) else None
        if arg in ("-f", "--file") or arg.startswith(("--file=", "-f")):
            return None
        if arg in ("-e", "--source"):  # gawk: program text in an option
            return index + 1 if index + 1 < len(template) else None
        if arg in ("-F", "-v", "--assign", "--field-separator"):
            index += 2
            continue
        if arg.startswith("-") and arg != "-":
            index += 1
            continue
        return index
    return None


_BRACED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholder_lookalikes(template: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """``(argument index, "{word}", "{placeholder}")`` for each ``{word}`` of ``template`` that
    is not a placeholder but looks like one misspelt (``{pathh}``, ``{Path}``, ``{items}``).

    Such a word is passed to the command as it is written (braces are the commands' own too:
    ``awk '{print}'``), so it cannot be an error; ``check`` and the service's start warn about it.
    """
    import difflib

    found = []
    for index, arg in enumerate(template):
        for match in _BRACED.finditer(arg):
            word = match.group(1)
            if word in PLACEHOLDERS:
                continue
            close = difflib.get_close_matches(word.lower(), PLACEHOLDERS, n=1, cutoff=0.75)
            if close:
                found.append((index, match.group(0), "{" + close[0] + "}"))
    return found


def uses_placeholder(template: tuple[str, ...], name: str) -> bool:
    """Whether any argument of ``template`` mentions ``{name}`` (not ``{{name}}``, its text)."""
    return any(
        name in (match.group(1), match.group(3))
        for arg in template
        for match in _PLACEHOLDER.finditer(arg)
    )


def backoff_delay(
    stage: StageConfig, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based): full jitter.

    The cap grows as ``backoff * 2**(attempt-1)`` up to ``backoff_max``; the delay is drawn
    uniformly below the cap, so retries of many items spread out instead of stampeding.
    """
    # 2.0 ** 1024 overflows; any backoff doubled 1,000 times is past every backoff_max anyway.
    cap = min(stage.backoff_max, stage.backoff * 2.0 ** min(attempt - 1, 1000))
    return float(rand() * cap)


def decide(
    item: Item,
    stage: StageConfig,
    result: RunResult,
    *,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Transition:
    """The transition a run's result causes for ``item`` (which holds the attempt just made).

    - ``ok`` moves the item to the next stage of its route, or to ``done`` after the last.
    - ``cancelled`` (shutdown) re-queues it at the same stage and gives the attempt back.
    - any other outcome retries after a backoff while ``retries`` allow, unless the exit code is
      in ``fatal_exit_codes`` (or a Python stage raised ``Fatal``); otherwise the item is
      ``dead`` with the reason.
    """
    if result.outcome is Outcome.OK:
        nxt = item.stage_index + 1
        state = ItemState.DONE if nxt >= len(item.route) else ItemState.QUEUED
        return Transition(state=state, stage_index=nxt, attempts=0)
    if result.outcome is Outcome.CANCELLED:
        return Transition(
            state=ItemState.QUEUED, stage_index=item.stage_index,
            attempts=max(item.attempts - 1, 0), reason=result.reason, interruption=True,
        )  # fmt: skip
    attempt = item.attempts
    why = f"{stage.name}: {result.reason}"
    if result.exit_code is not None and result.exit_code in stage.fatal_exit_codes:
        return Transition(
            state=ItemState.DEAD, stage_index=item.stage_index, attempts=attempt,
            reason=f"{why} (a fatal exit code; not retried)",
        )  # fmt: skip
    if result.fatal:
        return Transition(
            state=ItemState.DEAD, stage_index=item.stage_index, attempts=attempt,
            reason=f"{why} (fatal; not retried)",
        )  # fmt: skip
    if attempt <= stage.retries:
        delay = backoff_delay(stage, attempt, rand)
        return Transition(
            state=ItemState.RETRY_WAIT, stage_index=item.stage_index, attempts=attempt,
            not_before=now + delay, reason=why,
        )  # fmt: skip
    return Transition(
        state=ItemState.DEAD, stage_index=item.stage_index, attempts=attempt,
        reason=f"{why} (after {attempt} attempt{'s' if attempt != 1 else ''})",
    )  # fmt: skip
