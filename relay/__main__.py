"""`python -m relay` is the same program as `invoice-relay`."""

import sys

from relay.cli import main

sys.exit(main())
