"""The daemon's settings: defaults < TOML file < command-line flags.

The TOML file uses the flags' long names as keys (``state-dir`` or
``state_dir`` both work); an unknown key is an error so a typo never turns
into a silently ignored setting.  A missing *default* config file is fine;
a missing file the operator named explicitly is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import socket
import tomllib
from dataclasses import dataclass, field

from migrated.errors import MigratedError

DEFAULT_CONFIG = "/etc/migrated/migrated.toml"
DEFAULT_CONTROL = "/run/migrated/control.sock"
DEFAULT_STATE_DIR = "/var/lib/migrated"
# Peers reach us here.  7420 is unassigned by IANA and above 1024, so the
# daemon needs no CAP_NET_BIND_SERVICE.  All interfaces: peers are other
# nodes; mutual TLS decides who gets in.
DEFAULT_PORT = 7420

# Ceiling of the integer send options (--downtime-ms, --max-rounds,
# plateau rounds), checked by migratectl and again by the daemon: 10^7 ms
# is close to three hours of freeze, 10^7 rounds more than any migration
# needs.
OPTION_INT_MAX = 10**7
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
# Concurrent migrations per direction (sending, receiving).  Each one costs
# a thread, a socket, buffers of a few MiB and, on the destination, disk
# bandwidth; four keeps a 2-core node responsive.
DEFAULT_MAX_MIGRATIONS = 4
# Sanity bound on --max-migrations: each migration is a thread with its own
# buffers, so thousands would be a misconfiguration, not a workload.
MAX_MAX_MIGRATIONS = 256
LOG_FORMATS = ("kv", "json")
# Accepted ranges (seconds) of the peer timeouts.
TIMEOUT_BOUNDS = {"peer_timeout": (1.0, 3600.0), "handshake_timeout": (1.0, 600.0),
                  "commit_timeout": (1.0, 3600.0)}


class ConfigError(MigratedError):
    pass


@dataclass
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    control: str = DEFAULT_CONTROL
    state_dir: str = DEFAULT_STATE_DIR
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    allow_peer: list[str] = field(default_factory=list)
    insecure: bool = False
    max_migrations: int = DEFAULT_MAX_MIGRATIONS
    log_format: str = "kv"
    node: str = field(default_factory=socket.gethostname)
    control_group: str | None = None
    image_quota: int | None = None
    min_free: int | None = None
    # Seconds; None = the built-in value (migrated/daemon/timeouts.py).
    peer_timeout: float | None = None
    handshake_timeout: float | None = None
    commit_timeout: float | None = None
    thaw_journal: bool = False
    config_file: str | None = None
    # Where each setting came from ("--flag" or "config file PATH"), for
    # error messages; not a setting itself.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def where(self, key: str) -> str:
        """" (from --state-dir)" / " (in config file F)" / "" for ``key``."""
        origin = self.origins.get(key)
        return f" ({origin})" if origin else ""

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def control_gid(self) -> int | None:
        if self.control_group is None:
            return None
        try:
            return grp.getgrnam(self.control_group).gr_gid
        except KeyError:
            if self.control_group.isdigit():
                return int(self.control_group)
            raise ConfigError(f"control group {self.control_group!r} does not exist "
                              "(check --control-group / control-group in the config)")

    def check_state_dir(self) -> None:
        """An existing state dir (and its journal and in-doubt dirs) must be
        ours alone (durable.check_private_dir), so that a bad one stops the
        daemon here with a clear message, before anything is opened in it.
        The journal and the in-doubt records check again when they open."""
        from migrated.daemon.durable import UnsafeStateDir, check_private_dir
        from migrated.daemon.indoubt import SUBDIR as INDOUBT_SUBDIR
        from migrated.daemon.journal import JOURNAL_SUBDIR
        try:
            if os.path.exists(self.state_dir):
                check_private_dir(self.state_dir)
                for sub in (JOURNAL_SUBDIR, INDOUBT_SUBDIR):
                    path = os.path.join(self.state_dir, sub)
                    if os.path.lexists(path):
                        check_private_dir(path, f"state dir's {sub}/")
        except UnsafeStateDir as e:
            raise ConfigError(f"{e}{self.where('state_dir')}") from None

    def validate(self) -> None:
        for key in ("state_dir", "control"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                if key == "control" and self.thaw_journal:
                    continue
                flag = key.replace("_", "-")
                raise ConfigError(f"{flag} is empty{self.where(key)}: give a path, or leave "
                                  f"{flag} out for the default "
                                  f"{DEFAULT_STATE_DIR if key == 'state_dir' else DEFAULT_CONTROL}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, "
                              f"not {self.log_format!r}{self.where('log_format')}")
        if not 1 <= self.max_migrations <= MAX_MAX_MIGRATIONS:
            raise ConfigError(f"max-migrations must be between 1 and {MAX_MAX_MIGRATIONS}, "
                              f"not {self.max_migrations}{self.where('max_migrations')}")
        if not self.node:
            raise ConfigError("node name is empty (set --node)")
        for name, (lo, hi) in TIMEOUT_BOUNDS.items():
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and lo <= v <= hi):
                raise ConfigError(f"{name.replace('_', '-')} must be between {lo:g} and "
                                  f"{hi:g} seconds, not {v!r}{self.where(name)}")
        if self.thaw_journal:
            return  # only the state dir matters for --thaw-journal
        self.check_state_dir()
        if any(not isinstance(n, str) or not n.strip() for n in self.allow_peer):
            raise ConfigError(f"allow-peer has an empty name{self.where('allow_peer')}")
        if not self.insecure:
            missing = [n for n in ("tls_cert", "tls_key", "tls_ca") if not getattr(self, n)]
            if missing:
                flags = ", ".join("--" + n.replace("_", "-") for n in missing)
                raise ConfigError(
                    f"TLS is required but {flags} {'is' if len(missing) == 1 else 'are'} "
                    "not set; make certificates with `migratectl certs make --dir DIR "
                    "--nodes NAME` or run with --insecure (plaintext, trusted networks only)")
            for n in ("tls_cert", "tls_key", "tls_ca"):
                path = getattr(self, n)
                if not os.path.isfile(path):
                    raise ConfigError(f"--{n.replace('_', '-')} {path}: no such file"
                                      f"{self.where(n)}")
        self.control_gid()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """"10M", "1G", "500K", "1.5G", "4096", "10MiB", "10M/s" -> bytes.
    Suffixes are powers of 1024 (K = KiB)."""
    if isinstance(text, bool):
        raise ConfigError(f"bad {what} {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip().upper().removesuffix("/S")
        for tail in ("IB", "B"):
            if t.endswith(tail) and len(t) > len(tail) and (tail == "B" or t[-3] in "KMGT"):
                t = t[: -len(tail)]
                break
        unit = t[-1] if t and t[-1] in "KMGT" else ""
        num = t[: len(t) - len(unit)]
        try:
            value = float(num) * _SIZE_UNITS[unit]
        except ValueError:
            raise ConfigError(f"bad {what} {text!r}: expected bytes or a number with "
                              "K, M, G or T (powers of 1024), e.g. 500K, 10M, 1G") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"bad {what} {text!r}: must be positive")
    return int(value)


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"host", "host:port", "[v6]:port" or "v6" -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"bad address {text!r}")
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    else:
        host, port_s = text, ""  # plain name, IPv4, or bare IPv6
    if not host:
        raise ConfigError(f"bad address {text!r}: empty host")
    if not port_s:
        return host, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in {text!r}")
    return host, port


def build_arg_parser() -> argparse.ArgumentParser:
    # Every default is None so that we can tell "not given" from "given".
    p = argparse.ArgumentParser(
        prog="migrated",
        description="Live-migration daemon: sends and receives process memory "
                    "over mutual TLS; controlled by migratectl.")
    a = p.add_argument
    a("--config", metavar="FILE", help=f"TOML settings (default {DEFAULT_CONFIG}; "
      "keys are the long flag names; flags override)")
    a("--listen", metavar="HOST:PORT", help=f"where peers connect (default {DEFAULT_LISTEN})")
    a("--control", metavar="PATH", help=f"unix socket for migratectl (default {DEFAULT_CONTROL})")
    a("--state-dir", metavar="DIR", help=f"images and journal (default {DEFAULT_STATE_DIR})")
    a("--tls-cert", metavar="PEM", help="this node's certificate")
    a("--tls-key", metavar="PEM", help="this node's private key")
    a("--tls-ca", metavar="PEM", help="the cluster CA: peers must present a cert it signed")
    a("--allow-peer", metavar="NAME", action="append",
      help="accept / send to only peers whose certificate CN or DNS name is NAME "
           "(case-insensitive; repeatable; default: any peer the CA signed)")
    a("--insecure", action=argparse.BooleanOptionalAction, default=None,
      help="plaintext, no authentication (trusted test networks only); "
           "--no-insecure requires TLS even if the config file says insecure = true")
    a("--max-migrations", metavar="N", type=int,
      help=f"concurrent migrations per direction (default {DEFAULT_MAX_MIGRATIONS}); "
           "more are refused as busy")
    a("--log-format", choices=LOG_FORMATS, help="kv (journald friendly, default) or json")
    a("--node", metavar="NAME", help="this node's name in logs and images (default hostname)")
    a("--control-group", metavar="GROUP",
      help="make the control socket 0660 for this group (default: root only, 0600)")
    a("--no-control-group", action="store_true", default=None,
      help="ignore the config file's control-group: the socket is root only (0600)")
    a("--thaw-journal", action="store_true", default=None,
      help="thaw every process the journal says we froze, then exit (for ExecStopPost)")
    a("--image-quota", metavar="SIZE",
      help="most bytes of images kept in the state dir (e.g. 50G; default unlimited)")
    a("--no-image-quota", action="store_true", default=None,
      help="ignore the config file's image-quota: no quota")
    a("--min-free", metavar="SIZE",
      help="free space to keep on the state dir's filesystem (default: the image store's)")
    a("--peer-timeout", metavar="SECONDS", type=float,
      help="silence tolerated on a migration connection before it is given up "
           "(default 30; raise it for slow or lossy links)")
    a("--handshake-timeout", metavar="SECONDS", type=float,
      help="connect + TLS + protocol handshake with a peer (default 10)")
    a("--commit-timeout", metavar="SECONDS", type=float,
      help="wait for the destination to seal and publish the image (default 120)")
    return p


# TOML key -> (Config attribute, expected python type(s))
_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "listen": ("listen", (str,)),
    "control": ("control", (str,)),
    "state_dir": ("state_dir", (str,)),
    "tls_cert": ("tls_cert", (str,)),
    "tls_key": ("tls_key", (str,)),
    "tls_ca": ("tls_ca", (str,)),
    "allow_peer": ("allow_peer", (list, str)),
    "insecure": ("insecure", (bool,)),
    "max_migrations": ("max_migrations", (int,)),
    "log_format": ("log_format", (str,)),
    "node": ("node", (str,)),
    "control_group": ("control_group", (str, int)),
    "image_quota": ("image_quota", (str, int)),
    "min_free": ("min_free", (str, int)),
    "peer_timeout": ("peer_timeout", (int, float)),
    "handshake_timeout": ("handshake_timeout", (int, float)),
    "commit_timeout": ("commit_timeout", (int, float)),
}


def read_toml(path: str, explicit: bool) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    out = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _KEYS:
            raise ConfigError(f"config file {path}: unknown key {raw_key!r} "
                              f"(known: {', '.join(k.replace('_', '-') for k in _KEYS)})")
        attr, types = _KEYS[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"config file {path}: {raw_key} must not be a boolean")
        if not isinstance(value, types):
            raise ConfigError(f"config file {path}: {raw_key} has the wrong type "
                              f"({type(value).__name__})")
        if key == "allow_peer":
            value = [value] if isinstance(value, str) else value
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config file {path}: allow-peer must be a list of names")
        out[key] = value
    return out


def thaw_only_config(args: argparse.Namespace) -> Config:
    """The settings ``--thaw-journal`` needs when the configuration is
    broken (an unknown key, a bad value, TOML that does not parse): only
    the state dir -- the flag, else the file's ``state-dir`` if that one
    key reads, else the default.  A typo in the config must never keep a
    process frozen: ExecStopPost runs this after every stop of the unit,
    and a daemon that cannot start on that config would not replay its
    journal either."""
    cfg = Config(thaw_journal=True)
    state_dir = getattr(args, "state_dir", None)
    if not state_dir:
        path = args.config if args.config is not None else DEFAULT_CONFIG
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
            v = data.get("state-dir", data.get("state_dir"))
            state_dir = v if isinstance(v, str) and v else None
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            state_dir = None
    cfg.state_dir = state_dir or DEFAULT_STATE_DIR
    return cfg


def load_config(argv: list[str] | None = None) -> Config:
    args = build_arg_parser().parse_args(argv)
    return config_from(args)


# --no-KEY flags: drop KEY's value from the config file (back to the default).
_UNSET_FLAGS = ("control_group", "image_quota")


def config_from(args: argparse.Namespace) -> Config:
    explicit = args.config is not None
    path = args.config if explicit else DEFAULT_CONFIG
    settings = read_toml(path, explicit)
    from_file = bool(settings)
    origins = {key: f"in config file {path}" for key in settings}
    for key in _UNSET_FLAGS:
        flag = "--" + key.replace("_", "-")
        if getattr(args, "no_" + key, None):
            if getattr(args, key, None) is not None:
                raise ConfigError(f"{flag} and --no-{flag[2:]} contradict each other; "
                                  "give one of them")
            settings.pop(key, None)
            origins.pop(key, None)
    # Flags override the file.
    for key in _KEYS:
        v = getattr(args, key, None)
        if v is not None:
            settings[key] = v
            origins[key] = "from --" + key.replace("_", "-")
    cfg = Config(config_file=path if (explicit or from_file) else None, origins=origins)
    for key, value in settings.items():
        name = key.replace("_", "-")
        try:
            if key == "listen":
                cfg.listen_host, cfg.listen_port = parse_hostport(value)
            elif key == "control_group":
                cfg.control_group = str(value)
            elif key in ("image_quota", "min_free"):
                setattr(cfg, key, parse_size(value, name))
            elif key in TIMEOUT_BOUNDS:
                setattr(cfg, key, float(value))
            else:
                setattr(cfg, _KEYS[key][0], value)
        except ConfigError as e:
            raise ConfigError(f"{name}{cfg.where(key)}: {e}") from None
    cfg.thaw_journal = bool(args.thaw_journal)
    cfg.allow_peer = list(dict.fromkeys(cfg.allow_peer))
    cfg.validate()
    return cfg


def as_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
