"""The exact argv a profile starts with: swapd's own flags, then the profile's.

Apart from :mod:`swapd.config.flags` because it needs the model (:class:`Config`,
:class:`Profile`) while the model's readers need the flag vocabulary: one way only.
"""

from __future__ import annotations

from swapd.config.flags import flag_argv, sets_flag
from swapd.config.model import Config, Profile


def build_argv(config: Config, profile: Profile, port: int) -> list[str]:
    """The exact argv that starts ``profile`` on ``port``.

    swapd passes ``--model``, ``--host`` and ``--port`` itself, and ``--alias`` with the
    profile's name so that llama-server's ``/v1/models`` and ``/props`` name the profile
    rather than the model path; a profile that sets ``alias`` in its flags keeps its own.
    """
    server = config.llama_server
    argv = [*server.command, "--model", str(profile.model),
            "--host", server.host, "--port", str(port)]
    if not sets_flag(profile.flags, "alias"):
        argv += ["--alias", profile.name]
    return argv + flag_argv(profile.flags)
