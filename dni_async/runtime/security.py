"""CURVE for runs across hosts: every process proves who it is, every byte is encrypted, and a
process speaks only as the one whose key it holds.

    dni-async keys KEYS_DIR --stages N      # KEYS_DIR/public/*.key, KEYS_DIR/private/*.key_secret

Each process loads its own secret key and every public key. Sockets that bind are CURVE
servers behind a ZAP authenticator that admits only the run's public keys; sockets that
connect are CURVE clients that know the public key of the process they connect to. A peer
without a listed key can neither complete a handshake nor send a single message.

Identities are bound to keys. The ZAP handler names each connection after the key it
authenticated with ("coordinator", "stage-K", the key file's name) and ZeroMQ stamps that name
on every frame the connection delivers (its User-Id). A receiver asks `refuses(frame, *names)`
with the names the plan lets send there, so a message is refused whatever it says about its
sender when its key is not theirs:

    socket (owner)             who may send there
    fwd_in (stage 0)           coordinator
    fwd_in (stage K > 0)       stage-(K-1)
    grad_in (stage K)          stage-(K+1)
    results (coordinator)      stage-0 (done), stage-(N-1) (loss, evalres)
    control (coordinator)      stage-K, under the routing name "stage-K" and no other

Connecting sockets need no such check: the handshake itself proves the server holds the secret
key of the peer they were told to expect. So the holder of one stage's keys can say only what
that stage may say, to whom it may say it. Local runs (ipc, loopback) need none of this; copy
`private/<name>.key_secret` only to the host that runs <name>.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dni_async.config import ConfigError


def names(n_stages: int) -> list:
    return ["coordinator", *[f"stage-{k}" for k in range(n_stages)]]


def make_keys(folder: str, n_stages: int) -> list:
    pub, priv = os.path.join(folder, "public"), os.path.join(folder, "private")
    os.makedirs(pub, exist_ok=True)
    os.makedirs(priv, mode=0o700, exist_ok=True)
    made = []
    for name in names(n_stages):
        public, secret = zmq.auth.create_certificates(priv, name)
        os.replace(public, os.path.join(pub, f"{name}.key"))
        os.chmod(secret, 0o600)
        made.append(name)
    return made


class _NamingAuthenticator(ThreadAuthenticator):
    """The ZAP handler, which gives each connection the name of its key as its User-Id."""

    def __init__(self, ctx: zmq.Context, names: dict):
        super().__init__(ctx)
        self.names = names     # z85 public key -> name

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "")


class Curve:
    """One process's keys and the run's public keys, applied to its sockets; who sent a frame."""

    def __init__(self, folder: str, me: str):
        self.folder = folder
        pub = os.path.join(folder, "public")
        try:
            self.public_keys = {}
            for fname in os.listdir(pub):
                if fname.endswith(".key"):
                    key, _ = zmq.auth.load_certificate(os.path.join(pub, fname))
                    self.public_keys[fname[:-4]] = key
            self.public, self.secret = zmq.auth.load_certificate(
                os.path.join(folder, "private", f"{me}.key_secret"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load CURVE keys for {me} from {folder}: {exc}") from None
        self.names = {key: name for name, key in self.public_keys.items()}
        if len(self.names) < len(self.public_keys):
            raise ConfigError(f"two names share one public key in {pub}: each process needs "
                              "its own (dni-async keys makes them)")
        self.auth = None
        self.refused = 0       # messages refused because their key is not their sender's

    def start(self, ctx: zmq.Context) -> None:
        """The ZAP handler: only the run's own public keys may connect, each under its name."""
        self.auth = _NamingAuthenticator(ctx, self.names)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=os.path.join(self.folder, "public"))

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, peer: str) -> None:
        if peer not in self.public_keys:
            raise ConfigError(f"no public key for {peer} in {self.folder}/public")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public_keys[peer]

    def refuses(self, frame: zmq.Frame, *names: str) -> bool:
        """True (and counted) when `frame`, received on a server socket, came over a connection
        whose key is none of `names`. One property read per message."""
        try:
            sender = frame.get("User-Id")
        except zmq.ZMQError:     # no User-Id: not a CURVE connection, so no key at all
            sender = None
        if sender in names:
            return False
        self.refused += 1
        return True
