"""The help formatter every command line of the project uses: argparse's defaults formatter, which appends
"(default: X)" to each option's help, except where there is nothing to show (a flag's False, an unset None whose
meaning the help text already gives)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
