"""SMTP intake: a sans-IO ESMTP server (protocol), its policy, SASL, TLS and asyncio glue."""

from hato.smtp.auth import Authenticator, AuthThrottle, Credentials, StaticAuthenticator
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, SessionFacts, parse_networks
from hato.smtp.protocol import (
    Authenticate,
    Close,
    Event,
    MessageComplete,
    Rejected,
    Send,
    ServerSession,
    SessionConfig,
    StartTLS,
)
from hato.smtp.server import SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider, load_server_context

__all__ = [
    "AuthThrottle",
    "Authenticate",
    "Authenticator",
    "Close",
    "Credentials",
    "Event",
    "ListenerConfig",
    "ListenerRole",
    "MessageComplete",
    "Policy",
    "Rejected",
    "SMTPListener",
    "Send",
    "ServerSession",
    "SessionConfig",
    "SessionFacts",
    "StartTLS",
    "StaticAuthenticator",
    "TLSContextProvider",
    "load_server_context",
    "parse_networks",
    "start_listener",
]
