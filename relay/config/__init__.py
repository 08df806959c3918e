"""The main config (relay.toml) and the policy files, parsed once into frozen dataclasses.

Every problem is collected as one line `FILE: KEY: what is wrong` (KEY a dotted path such
as `server.listen[1]` or `destination[2].routes`); `load_config` raises `ConfigError` with
all of them at once, so an operator fixes a file in one round.

Relative paths in the main config are relative to its folder; with no config file, to the
working directory. Paths inside policy files (DKIM keys, S/MIME certificates, webhook
secrets) are relative to the *main config's* folder too, not the policy file's: the
contract writes `key = "keys/s2026.pem"`, and `dkim keygen` writes to `keys/` beside the
config, so both sides agree on one folder.

The modules, each importing only those before it:
  values.py    the value grammar (durations, sizes, rates, domains, networks, paths, ...)
  report.py    reading TOML, ConfigError and the `FILE: KEY: problem` lines
  policies.py  policies/*.toml: destination, sender (DKIM keys, clients), recipient
  main.py      relay.toml's sections and the Config dataclass
  check.py     load_config, check-config and serve's load_or_exit

`SYSTEM_CONFIG` is left out of the names below on purpose: `find_config_file` reads it from
relay.config.check, so that is the module to patch.
"""

from relay.config.check import (
    ENV_CONFIG,
    EX_CONFIG,
    check_config_command,
    find_config_file,
    load_config,
    load_or_exit,
    load_or_report,
    unbindable_sources,
)
from relay.config.main import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_MAX_LIFETIME,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_RETRY_SCHEDULE,
    DEFAULT_TRUSTED,
    DEFAULTS_NAME,
    LOG_FORMATS,
    SPF_MODES,
    ClusterConfig,
    Config,
    DeliveryConfig,
    DnsConfig,
    HttpConfig,
    LogConfig,
    PoliciesConfig,
    QueueConfig,
    ServerConfig,
    SourceAddress,
    Warmup,
)
from relay.config.policies import (
    DKIM_MIN_RSA_BITS,
    ENCRYPTION_MODES,
    ON_REPLY_ACTIONS,
    PRIORITIES,
    TLS_MODES,
    DestinationPolicy,
    DkimKey,
    DomainIndex,
    OnReply,
    RecipientPolicy,
    SenderClients,
    SenderPolicy,
    Webhook,
    dkim_key_algorithm,
)
from relay.config.report import ConfigError
from relay.config.values import (
    DNS_PORT,
    HTTP_PORT,
    SMTP_PORT,
    IPAddress,
    IPNetwork,
    Percent,
    Rate,
    normalize_domain,
    parse_charset,
    parse_domain_pattern,
    parse_duration,
    parse_rate,
    parse_size,
)

__all__ = [
    "DEFAULTS_NAME",
    "DEFAULT_AUTH_FAILURE_LIMIT",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_RETRY_SCHEDULE",
    "DEFAULT_TRUSTED",
    "DKIM_MIN_RSA_BITS",
    "DNS_PORT",
    "ENCRYPTION_MODES",
    "ENV_CONFIG",
    "EX_CONFIG",
    "HTTP_PORT",
    "LOG_FORMATS",
    "ON_REPLY_ACTIONS",
    "PRIORITIES",
    "SMTP_PORT",
    "SPF_MODES",
    "TLS_MODES",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DestinationPolicy",
    "DkimKey",
    "DnsConfig",
    "DomainIndex",
    "HttpConfig",
    "IPAddress",
    "IPNetwork",
    "LogConfig",
    "OnReply",
    "Percent",
    "PoliciesConfig",
    "QueueConfig",
    "Rate",
    "RecipientPolicy",
    "SenderClients",
    "SenderPolicy",
    "ServerConfig",
    "SourceAddress",
    "Warmup",
    "Webhook",
    "check_config_command",
    "dkim_key_algorithm",
    "find_config_file",
    "load_config",
    "load_or_exit",
    "load_or_report",
    "normalize_domain",
    "parse_charset",
    "parse_domain_pattern",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "unbindable_sources",
]
