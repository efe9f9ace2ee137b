"""`python -m mlx_gw.gateway.cli`: the same program as the `mlx-gw` script."""

import sys

from mlx_gw.gateway.cli.main import main

sys.exit(main())
