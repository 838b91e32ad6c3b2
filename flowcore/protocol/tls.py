"""Optional TLS for every flowcore connection: the settings and the contexts.

A cluster either runs every link under TLS or none.  A TLS setting is three
PEM files, always together:

* ``cert`` / ``key``: this process's certificate and private key.  It is
  presented as the server certificate by listening processes (the head, a
  node's object and worker server) and as the client certificate when the
  process connects to another one, so the certificate must be usable for
  both (no extended key usage, or ``serverAuth, clientAuth``).
* ``ca``: the certificate authority of the cluster.  Servers require a
  client certificate signed by it (mutual TLS); clients require the same of
  the server.

Hostnames are not checked: peers are verified against the CA only.  Cluster
addresses are IP addresses that change as machines come and go, and every
certificate the cluster's CA signed is a member of the cluster.  So use a CA
made for the cluster alone, never a public one or one shared with other
services.  The token challenge still runs inside the TLS channel.

Settings come from ``init(tls={...})`` / ``LocalCluster(tls=...)``, the
``--tls-cert/--tls-key/--tls-ca`` flags, or the environment variables
``FLOWCORE_TLS_CERT``, ``FLOWCORE_TLS_KEY`` and ``FLOWCORE_TLS_CA`` (which is
also how a node hands them to its worker processes).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # ssl loads when TLS is configured (a process without it never needs it)
    import ssl

ENV_VARS = ("FLOWCORE_TLS_CERT", "FLOWCORE_TLS_KEY", "FLOWCORE_TLS_CA")
FIELDS = ("cert", "key", "ca")
FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


class TLSConfig:
    """Three PEM files, checked when the object is made (readable, a valid
    certificate with its key, a valid CA).  Build it with ``load``,
    ``from_env`` or ``resolve``."""

    def __init__(self, cert: str, key: str, ca: str, names: tuple[str, str, str] = FLAGS):
        self.cert = os.path.abspath(cert)
        self.key = os.path.abspath(key)
        self.ca = os.path.abspath(ca)
        for name, path in zip(names, (self.cert, self.key, self.ca)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"cannot read {name} {path}: {e.strerror or e}") from None
        import ssl
        self._server = self._make(ssl.PROTOCOL_TLS_SERVER, names)
        self._client = self._make(ssl.PROTOCOL_TLS_CLIENT, names)

    def _make(self, protocol: int, names: tuple[str, str, str]) -> ssl.SSLContext:
        import ssl
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            raise ValueError(f"{names[0]} {self.cert} with {names[1]} {self.key}: not a PEM "
                             f"certificate and its matching private key ({_reason(e)})"
                             ) from None
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as e:
            raise ValueError(f"{names[2]} {self.ca}: not a PEM CA certificate "
                             f"({_reason(e)})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if protocol == ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = False  # verified against the cluster's CA only
        else:
            # no session tickets after the handshake: a blocking reader must
            # never wake up for a record that holds no message
            ctx.num_tickets = 0
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._server

    def client_context(self) -> ssl.SSLContext:
        return self._client

    def env(self) -> dict[str, str]:
        """The environment variables that give a child process these settings."""
        return dict(zip(ENV_VARS, (self.cert, self.key, self.ca)))

    def cli_args(self) -> list[str]:
        out: list[str] = []
        for flag, path in zip(FLAGS, (self.cert, self.key, self.ca)):
            out += [flag, path]
        return out

    def __repr__(self) -> str:
        return f"TLSConfig(cert={self.cert!r}, key={self.key!r}, ca={self.ca!r})"


def load(cert: str | None, key: str | None, ca: str | None,
         names: tuple[str, str, str] = FLAGS) -> TLSConfig | None:
    """None when none of the three is given; an error naming what is missing
    when only some are."""
    given = [v for v in (cert, key, ca) if v]
    if not given:
        return None
    if not (cert and key and ca):
        missing = [n for n, v in zip(names, (cert, key, ca)) if not v]
        raise ValueError(f"TLS needs {', '.join(names[:2])} and {names[2]} together: missing "
                         f"{' and '.join(missing)}")
    return TLSConfig(cert, key, ca, names)


def from_env(environ: Mapping[str, str] | None = None) -> TLSConfig | None:
    env = os.environ if environ is None else environ
    cert, key, ca = (env.get(v) for v in ENV_VARS)
    return load(cert, key, ca, names=ENV_VARS)


def resolve(tls: Any, where: str = "init(tls=...)") -> TLSConfig | None:
    """The settings to use: ``None`` means from the environment, ``False``
    means no TLS, a ``TLSConfig`` is used as it is, and a dict needs the keys
    ``cert``, ``key`` and ``ca``."""
    if tls is None:
        return from_env()
    if tls is False:
        return None
    if isinstance(tls, TLSConfig):
        return tls
    if isinstance(tls, Mapping):
        unknown = sorted(set(tls) - set(FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected 'cert', 'key' "
                             f"and 'ca' (paths to PEM files)")
        names = ("tls['cert']", "tls['key']", "tls['ca']")  # FIELDS
        try:
            cert, key, ca = (_path(tls.get(k), where) for k in FIELDS)
            cfg = load(cert, key, ca, names=names)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if cfg is None:
            raise ValueError(f"{where}: expected 'cert', 'key' and 'ca' (paths to PEM files)")
        return cfg
    raise TypeError(f"{where}: expected a dict with 'cert', 'key' and 'ca', False or None, got "
                    f"{type(tls).__name__}")


def _path(v: Any, where: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"{where}: paths must be strings, got {type(v).__name__}")


def _reason(e: ssl.SSLError) -> str:
    text = e.reason or (e.args[1] if len(e.args) > 1 else str(e))
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(text)).replace("[SSL] ", "")


def add_flags(parser: Any) -> None:
    """``--tls-cert``, ``--tls-key`` and ``--tls-ca`` on an argparse parser."""
    parser.add_argument("--tls-cert", default=None, metavar="PATH",
                        help="PEM certificate of this process, presented to peers (TLS on every "
                             "link; needs --tls-key and --tls-ca; default $FLOWCORE_TLS_CERT)")
    parser.add_argument("--tls-key", default=None, metavar="PATH",
                        help="PEM private key of --tls-cert (default $FLOWCORE_TLS_KEY)")
    parser.add_argument("--tls-ca", default=None, metavar="PATH",
                        help="PEM certificate of the cluster's CA: peers must present a "
                             "certificate it signed (default $FLOWCORE_TLS_CA)")


def from_flags(args: Any) -> TLSConfig | None:
    """The flags when any is given, else the environment variables."""
    if args.tls_cert or args.tls_key or args.tls_ca:
        return load(args.tls_cert, args.tls_key, args.tls_ca)
    return from_env()


def strip_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without TLS variables (a child gets exactly what it is given)."""
    for v in ENV_VARS:
        env.pop(v, None)
    return env


def describe_failure(exc: BaseException, address: str) -> str:
    """Plain words for a failed TLS handshake seen by a client."""
    reason = getattr(exc, "reason", None) or ""
    text = str(exc)
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG") \
            or "wrong version number" in text or "record layer failure" in text:
        return (f"TLS handshake with {address} failed: it does not speak TLS. Is it started "
                f"without --tls-cert/--tls-key/--tls-ca? Either use TLS on every process of "
                f"the cluster or on none")
    if reason == "CERTIFICATE_VERIFY_FAILED" or "certificate verify failed" in text:
        return (f"TLS: the certificate of {address} is not signed by this process's CA "
                f"({getattr(exc, 'verify_message', '') or text}); check --tls-ca / "
                f"FLOWCORE_TLS_CA")
    if "alert" in text.lower() or "ALERT" in reason:
        return (f"TLS: {address} refused this process's certificate ({reason or text}): it "
                f"must be signed by the CA the cluster uses (--tls-ca)")
    return f"TLS handshake with {address} failed: {text}"
