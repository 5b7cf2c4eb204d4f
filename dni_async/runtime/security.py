"""CURVE for runs across hosts: every process proves who it is, every byte is encrypted.

    dni-async keys KEYS_DIR --stages N      # KEYS_DIR/public/*.key, KEYS_DIR/private/*.key_secret

Each process loads its own secret key and every public key. Sockets that bind are CURVE
servers behind a ZAP authenticator that admits only the run's public keys; sockets that
connect are CURVE clients that know the public key of the process they connect to. A peer
without a listed key can neither complete a handshake nor send a single message.
Local runs (ipc, loopback) need none of this; copy `private/<name>.key_secret` only to the
host that runs <name>.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

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


class Curve:
    """One process's keys and the run's public keys, applied to its sockets."""

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
        self.auth = None

    def start(self, ctx: zmq.Context) -> None:
        """The ZAP handler: only the run's own public keys may connect."""
        self.auth = ThreadAuthenticator(ctx)
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
