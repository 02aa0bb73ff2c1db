"""``--log-format json``: twisted.logger's JSON observer in place of twistd's text one.

twistd builds its log observer after the plugin's options are parsed, from its own
``--logger`` option (a name it imports); the daemon's ``--log-format json`` fills that in
with :func:`jsonObserver`, which writes one JSON object per line to where ``--logfile``
points (stdout by default): the events twisted.logger records, with ``log_format`` and
its fields (``eventsFromJSONLogFile`` reads them back).
"""
import sys

from twisted.logger import jsonFileLogObserver
from twisted.python.logfile import LogFile

_destination = {}   # twistd's --logfile, noted when --log-format json is parsed


def useFormat(options):
    """Called by a daemon's options: with ``json``, make twistd log through jsonObserver."""
    parent = getattr(options, "parent", None)
    if options["log-format"] != "json" or parent is None:
        return
    if parent.get("logger"):
        from twisted.python import usage
        raise usage.UsageError("--log-format json and twistd's --logger cannot be combined")
    _destination["logfile"] = parent.get("logfile")
    parent["logger"] = f"{__name__}.jsonObserver"


def jsonObserver():
    """twistd's ``--logger`` factory: JSON lines to --logfile (stdout if none or '-')."""
    path = _destination.get("logfile")
    out = sys.stdout if not path or path == "-" else LogFile.fromFullPath(path)
    return jsonFileLogObserver(out, recordSeparator="")
