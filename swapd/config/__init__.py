"""The manifest: swapd's YAML configuration, read into frozen attrs classes.

This is the package's face; its other public modules are :mod:`.flags` (llama-server's
flags), :mod:`.argv` (a profile's argv) and :mod:`.schema` (the JSON Schema).

:func:`load_config` reads a file, :func:`parse_config` a string. Both either return a
complete, valid :class:`Config` or raise :class:`~swapd.errors.ConfigError` listing
*every* problem found, each naming where it is and, where there is one, the fix::

    unknown key 'flag' @ profiles.qwen — did you mean 'flags'?
    expected a duration like 30s, 500ms or 2m, got 'soon' @ timeouts.start
    profiles.qwen.flags: 'port' is set by swapd; remove it (swapd passes --port itself)
    duplicate name 'qwen' @ profiles.b.aliases — already used by profile 'a'

How it works, and why:

* **YAML** (:mod:`.dialect`) is read with :class:`StrictLoader`: only ``true``/``false``
  are booleans (``flash-attn: on`` stays the text ``"on"``, which llama-server wants),
  ``1:30`` is not the number 90, ``0123`` is not octal 83, dates stay text, and a key
  given twice in one mapping is an error instead of the last one silently winning.
* **Structure** (:mod:`.load`, into :mod:`.model`) comes from a cattrs converter with
  ``forbid_extra_keys``. Fields that need more than a type (durations, sizes, ports,
  bounds) say so with ``Annotated[..., _Reader]`` (:mod:`.readers`) so each rule sits next
  to the field it governs. Readers raise ``_Problem``; cattrs collects all of them with
  the attribute path, and :mod:`.problems` renders that path as ``profiles.qwen.flags`` /
  ``fallbacks[1].base_url``.
* **Names** (profile names, aliases, fallback names) are checked on the raw data, so a
  duplicate or malformed name is reported together with type errors elsewhere.

Relative paths (``model``, ``state_dir``, key files) resolve against the config file's
directory, so a config and its models can move together. Missing model files are not a
load error: a model may sit on a disk mounted later; ``swapd check`` reports them via
:func:`missing_model_files`.
"""

from swapd.config.dialect import StrictLoader, read_yaml
from swapd.config.flags import FlagValue
from swapd.config.load import load_config, missing_model_files, parse_config
from swapd.config.model import (
    AnswerTimeouts,
    Cache,
    Config,
    Cors,
    Fallback,
    Gpu,
    Listen,
    LlamaServer,
    Logs,
    Memory,
    Profile,
    Progress,
    Queue,
    Residency,
    Restart,
    Security,
    Timeouts,
    default_state_dir,
    host_port,
)
from swapd.config.readers import (
    ENV_NAME,
    Bytes,
    Count,
    Env,
    EnvName,
    Flags,
    FrozenDict,
    GpuChoice,
    Names,
    Origins,
    Port,
    PositiveBytes,
    PositiveCount,
    PositiveSeconds,
    Seconds,
    parse_duration,
    parse_size,
)

__all__ = [
    "ENV_NAME", "AnswerTimeouts", "Bytes", "Cache", "Config", "Cors", "Count", "Env",
    "EnvName", "Fallback", "FlagValue", "Flags", "FrozenDict", "Gpu", "GpuChoice", "Listen",
    "LlamaServer", "Logs", "Memory", "Names", "Origins", "Port", "PositiveBytes",
    "PositiveCount", "PositiveSeconds", "Profile", "Progress", "Queue", "Residency",
    "Restart", "Seconds", "Security", "StrictLoader", "Timeouts", "default_state_dir",
    "host_port", "load_config", "missing_model_files", "parse_config", "parse_duration",
    "parse_size", "read_yaml",
]
