"""Exit statuses of every invoice-relay command, in one place (README, "Command line")."""

EXIT_OK = 0
EXIT_PROBLEM = 1   # check-config found a problem; serve hit a failure worth retrying
EXIT_USAGE = 2     # bad arguments
EXIT_CONFIG = 78   # EX_CONFIG: serve refuses a bad config; the systemd unit does not restart
