"""`ArgumentParser`: argparse's parser, refusing a single-valued option given twice (and `BooleanOnce`,
`--x` / `--no-x` given once).

argparse keeps the last value of a repeated option silently, so `train --config base.yaml --config
exp.yaml` trained on exp.yaml alone, and `evaluate --step 100 --step 200` read step 200, without a word.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from nextquill_jax.subcommand import OVERRIDES

# Where `_given_once` records the options given so far; `ArgumentParser.parse_known_args` removes it.
_GIVEN = "_options_given_once"


def _given_once(
    action: argparse.Action,
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    option_string: str | None,
    values: Any,
) -> None:
    """Record that `action`'s option was given (as `option_string`, with `values`); refuse it a second time.

    Raises:
        SystemExit: status 2 with the usage (`parser.error`), naming both times.
    """
    given: dict[str, str] = vars(namespace).setdefault(_GIVEN, {})
    words = shlex.join(map(str, values)) if isinstance(values, list) else values  # nargs: its words
    said = option_string if words is None else f"{option_string} {words}"
    if option_string is not None and action.dest in given:
        takes_overrides = any(a.dest == OVERRIDES for a in parser._get_positional_actions())
        layering = action.dest == "config" and takes_overrides
        parser.error(
            f"{action.option_strings[0]} is given twice ({given[action.dest]}, then {said}); it takes one "
            "value. Fix: give it once"
            + (" (one config file; further settings go on the line as section.key=value)" if layering else "")
            + "."
        )
    given[action.dest] = said


class _Once(argparse.Action):
    """Mixed in before an argparse action: records each time its option is given (`_given_once`, which
    refuses a second), then acts as that action. `shows_value`: whether the messages name the value given
    (a flag such as `--x` / `--no-x` has none)."""

    shows_value = True

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        _given_once(self, parser, namespace, option_string, values if self.shows_value else None)
        super().__call__(parser, namespace, values, option_string)


class _StoreOnce(_Once, argparse._StoreAction):
    """argparse's default action (`store`), refusing a second value for the same option."""


class BooleanOnce(_Once, argparse.BooleanOptionalAction):
    """`argparse.BooleanOptionalAction` (`--x` / `--no-x`), refusing a second of them: `--x --no-x` kept the
    last silently. Pass it as `action=BooleanOnce`; argparse takes an action class as given, not through the
    registry `ArgumentParser` fills."""

    shows_value = False


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose plain options (`action="store"`, the default), its subcommands'
    included (`add_subparsers` builds them of this class), may be given once.

    Raises:
        SystemExit: status 2 with the usage (argparse's `error`), for an option given twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        vars(parsed).pop(_GIVEN, None)
        return parsed, extra
