"""The command line of every flow: ``python -m flows.<name> [--preset P] [--config FILE] [--set A.B=C ...]``.

:func:`flow_main` is each flow module's ``main``: the options every flow takes (preset, YAML file, dotted
overrides), the flow's own options, its parameter form made from them, one flow run, the result shown.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from flows.params import ConfigParams

__all__ = ["flow_main"]


def flow_main(argv: list[str] | None, prog: str, flow: Any, params: type[ConfigParams], *,
              options: Callable[[argparse.ArgumentParser], None] | None = None,
              fields: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
              show: Callable[[Any], None] | None = print, report_errors: bool = False) -> int:
    """Parse a flow's command line, run ``flow`` on the ``params`` form it gives and ``show`` the result.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        prog: the program named in usage and help (``python -m flows.build``).
        flow: the Prefect flow; its description is the help's.
        params: the flow's parameter form; it gets ``preset``, ``config_file`` and ``overrides`` plus ``fields``.
        options: adds the flow's own options to the parser.
        fields: more form fields from the parsed options.
        show: prints the flow's result (None: nothing).
        report_errors: report a bad form or a failed run as the ``realfake`` command does (one masked line and
            exit 2 for a user error, a bug's traceback and exit 1); otherwise the exception propagates.

    Returns:
        The exit code: 0 when the flow completed (argparse exits 2 on a bad command line itself).
    """
    p = argparse.ArgumentParser(prog=prog, description=flow.description)
    p.add_argument("--preset", default="demo", help="shipped preset (configs/*.yaml)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C",
                   help="dotted override, repeatable (e.g. --set finetune.max_steps=200)")
    if options is not None:
        options(p)
    a = p.parse_args(argv)
    form = params(preset=a.preset, config_file=a.config, overrides=a.overrides, **(fields(a) if fields else {}))
    if report_errors:
        from realfake.cli import report_error
        from realfake.config import ConfigError
        from realfake.redact import install_log_redaction

        install_log_redaction()
        try:
            form.to_config()  # a bad form is one line, before Prefect starts
        except ConfigError as e:
            return report_error(e)
        try:
            result = flow(form)
        except Exception as e:  # noqa: BLE001 - shown as the realfake command shows errors: one line, or a bug's
            return report_error(e)
    else:
        result = flow(form)
    if show is not None:
        show(result)
    return 0
