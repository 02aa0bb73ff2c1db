"""The LRP<->RRP multiplexing protocol (specified in docs/protocol.md).

- :mod:`.frames`: the wire format (header, frame types, encode/decode, limits).
- :mod:`.session`: one session's state machine and CONTROL flow-control windows.
- :mod:`.connection`: the link: HELLO negotiation, session table, ping/RTT,
  liveness, send scheduling (control before GRE; GRE dropped over a watermark).
- :mod:`.protocol`: the thin Twisted protocol and factories.
"""

from routeproxy.mux.connection import MuxConfig, MuxConnection, MuxStats
from routeproxy.mux.frames import FrameError, LinkError, Reason
from routeproxy.mux.protocol import MuxClientFactory, MuxProtocol, MuxServerFactory
from routeproxy.mux.session import ISessionReceiver, LinkDown, Session, SessionNotOpened, SessionRefused

__all__ = [
    "MuxConfig", "MuxConnection", "MuxStats", "FrameError", "LinkError", "Reason",
    "MuxClientFactory", "MuxProtocol", "MuxServerFactory", "ISessionReceiver", "Session",
    "SessionRefused", "SessionNotOpened", "LinkDown",
]
