"""``python -m broker`` is the ``broker`` command."""

import os

# gRPC core reads this once, when grpc is first imported; why NONE: broker/node/logs.py.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from broker.cli.main import main

main()
