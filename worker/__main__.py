"""Worker process entry: `python -m mlx_gw.worker --rx ADDR --tx ADDR --parent-pid PID`.

The gateway spawns this; it binds `--rx` (requests in), connects `--tx` (outputs out), says
Hello once MLX is imported, then waits for the Load message naming its model.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlx_gw.worker.loop import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_gw.worker")
    p.add_argument("--rx", required=True, help="ZeroMQ address to bind for gateway->worker")
    p.add_argument("--tx", required=True, help="ZeroMQ address to connect for worker->gateway")
    p.add_argument("--parent-pid", type=int, required=True, help="exit when this process dies")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [worker] %(message)s",
    )
    return run(rx_addr=args.rx, tx_addr=args.tx, parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
