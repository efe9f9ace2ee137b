"""Typed keys for what the aiohttp app holds."""

from __future__ import annotations

from aiohttp import web

from mlx_gw.gateway.auth import KeyRing
from mlx_gw.gateway.supervision.supervisor import Supervisor

SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor", Supervisor)
KEYS: web.AppKey[KeyRing] = web.AppKey("keys", KeyRing)
