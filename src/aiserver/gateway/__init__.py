"""The HTTP shim: AI Server's REST surface and the contract's HTTP annotations, as gRPC calls.

``Gateway(target, host=, port=, settings=)`` embeds in a running event loop
(``await start()`` -> bound port, ``await stop()``); ``main(argv)`` runs it standalone.
"""

from aiserver.gateway.app import Gateway, build_app
from aiserver.gateway.backend import GatewaySettings
from aiserver.gateway.cli import main

__all__ = ["Gateway", "GatewaySettings", "build_app", "main"]
