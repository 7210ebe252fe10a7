"""The ``swapd`` command line: the daemon, its config check, and a client for operators.

``serve`` runs the daemon. ``check`` finds at config time what would otherwise fail at
swap time: it loads the config, prints every profile's exact argv, reports missing model
files and, when the llama-server binary is present, every flag name that binary's
``--help`` does not list (flags differ between builds; SPEC §7).

``status``, ``load``, ``unload``, ``logs`` and ``events`` talk to a running swapd over
its ``/swapd/*`` operations API (``--url``, default ``$SWAPD_URL`` or
``http://127.0.0.1:9001``; ``--key``/``$SWAPD_ADMIN_KEY`` sent as a Bearer token).
``load`` follows ``/swapd/events`` while it waits, so the operator sees the swap happen:
what is stopped, the load's percentage against that profile's last load time, and how
long it took.

The modules: :mod:`.main` (parser and dispatch), :mod:`.check`, :mod:`.commands`
(the client's commands), :mod:`.remote` (the connection), :mod:`.view` (what is printed),
:mod:`.migrate` (``swapd import``).

Exit status: 0 all well; 1 a problem (``check`` found some; a load failed; swapd answered
with an error); 2 usage error, swapd unreachable, or the key refused; 130 interrupted.
"""

from swapd.cli.check import check
from swapd.cli.commands import resolve_profile, run_client
from swapd.cli.main import main
from swapd.cli.remote import ClientError, Remote, error_message
from swapd.cli.view import LoadView, format_duration, format_event, format_status

__all__ = [
    "ClientError", "LoadView", "Remote", "check", "error_message", "format_duration",
    "format_event", "format_status", "main", "resolve_profile", "run_client",
]
