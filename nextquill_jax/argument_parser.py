"""`ArgumentParser`: argparse's parser, refusing a single-valued option given twice.

argparse keeps the last value of a repeated option silently, so `train --config base.yaml --config
exp.yaml` trained on exp.yaml alone, and `evaluate --step 100 --step 200` read step 200, without a word.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from nextquill_jax.subcommand import OVERRIDES

# Where `_StoreOnce` records the options given so far; `ArgumentParser.parse_known_args` removes it.
_GIVEN = "_options_given_once"


class _StoreOnce(argparse._StoreAction):
    """argparse's default action (`store`), refusing a second value for the same option."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given: dict[str, tuple[str | None, Any]] = vars(namespace).setdefault(_GIVEN, {})
        if self.option_strings and self.dest in given:
            first_option, first = given[self.dest]
            takes_overrides = any(a.dest == OVERRIDES for a in parser._get_positional_actions())
            layering = self.dest == "config" and takes_overrides
            said = lambda v: shlex.join(map(str, v)) if isinstance(v, list) else v  # nargs: its words
            parser.error(
                f"{option_string} is given twice ({first_option} {said(first)}, then {option_string} "
                f"{said(values)}); "
                "it takes one value. Fix: give it once"
                + (
                    " (one config file; further settings go on the line as section.key=value)"
                    if layering
                    else ""
                )
                + "."
            )
        given[self.dest] = (option_string, values)
        super().__call__(parser, namespace, values, option_string)


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
