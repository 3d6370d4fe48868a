"""Settings: defaults < TOML file < flags; bad input is a clear error."""

from __future__ import annotations

import subprocess

import pytest

from migrated.daemon.config import (DEFAULT_CONTROL, DEFAULT_PORT, ConfigError,
                                    load_config, parse_hostport, parse_size)

from .conftest import PY, ROOT, control_request


def write(tmp_path, text: str) -> str:
    p = tmp_path / "migrated.toml"
    p.write_text(text)
    return str(p)


def test_defaults_with_empty_file():
    cfg = load_config(["--config", "/dev/null", "--insecure"])
    assert cfg.listen_port == DEFAULT_PORT and cfg.listen_host == "0.0.0.0"
    assert cfg.control == DEFAULT_CONTROL
    assert cfg.state_dir == "/var/lib/migrated"
    assert cfg.log_format == "kv" and cfg.max_migrations == 4
    assert cfg.node  # the hostname


def test_file_then_flags_override(tmp_path):
    ca = tmp_path / "ca.pem"
    for n in ("ca.pem", "n.pem", "n.key"):
        (tmp_path / n).write_text("x")
    path = write(tmp_path, f"""
listen = "10.1.2.3:9000"
state-dir = "/srv/m"
tls_cert = "{tmp_path}/n.pem"
tls-key = "{tmp_path}/n.key"
tls-ca = "{ca}"
allow-peer = ["b", "c"]
max-migrations = 7
log-format = "json"
node = "from-file"
image-quota = "2G"
""")
    cfg = load_config(["--config", path])
    assert (cfg.listen_host, cfg.listen_port) == ("10.1.2.3", 9000)
    assert cfg.state_dir == "/srv/m" and cfg.allow_peer == ["b", "c"]
    assert cfg.max_migrations == 7 and cfg.log_format == "json" and cfg.node == "from-file"
    assert cfg.image_quota == 2 << 30 and not cfg.insecure
    cfg = load_config(["--config", path, "--listen", "[::1]:7000", "--max-migrations", "2",
                       "--node", "flag", "--allow-peer", "z", "--log-format", "kv"])
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 7000)
    assert cfg.max_migrations == 2 and cfg.node == "flag" and cfg.log_format == "kv"
    assert cfg.allow_peer == ["z"]          # flags replace, not extend
    assert cfg.state_dir == "/srv/m"        # untouched keys keep the file's value


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.toml"), "--insecure"])


def test_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lisen'"):
        load_config(["--config", write(tmp_path, 'lisen = "x:1"\n'), "--insecure"])
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(["--config", write(tmp_path, 'max-migrations = "4"\n'), "--insecure"])
    with pytest.raises(ConfigError, match="TOML|Expected|Invalid|config file"):
        load_config(["--config", write(tmp_path, 'listen = \n'), "--insecure"])


def test_tls_required_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key, --tls-ca are not set"):
        load_config(["--config", "/dev/null"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", "/dev/null", "--tls-cert", "/nope", "--tls-key", "/nope",
                     "--tls-ca", "/nope"])
    # --thaw-journal needs no TLS
    assert load_config(["--config", "/dev/null", "--thaw-journal"]).thaw_journal


def test_bad_values():
    with pytest.raises(ConfigError, match="max-migrations"):
        load_config(["--config", "/dev/null", "--insecure", "--max-migrations", "0"])
    with pytest.raises(ConfigError, match="control group"):
        load_config(["--config", "/dev/null", "--insecure", "--control-group", "no-such-grp-x"])


def test_hostport_and_sizes():
    assert parse_hostport("h") == ("h", DEFAULT_PORT)
    assert parse_hostport("h:1") == ("h", 1)
    assert parse_hostport("[fe80::1]:5") == ("fe80::1", 5)
    assert parse_hostport("::1") == ("::1", DEFAULT_PORT)
    for bad in ("h:x", "h:70000", ":5", "[::1"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)
    assert parse_size("10M") == 10 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("500K") == 500 << 10 and parse_size("4096") == 4096
    assert parse_size("2MiB/s") == 2 << 20
    for bad in ("0", "-5", "M", "ten"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_peer_timeouts_from_file_and_flags(tmp_path):
    cfg = load_config(["--config", "/dev/null", "--insecure"])
    assert (cfg.peer_timeout, cfg.handshake_timeout, cfg.commit_timeout) == (None, None, None)
    path = write(tmp_path, "peer-timeout = 90\nhandshake_timeout = 20.5\ncommit-timeout = 600\n")
    cfg = load_config(["--config", path, "--insecure"])
    assert (cfg.peer_timeout, cfg.handshake_timeout, cfg.commit_timeout) == (90.0, 20.5, 600.0)
    cfg = load_config(["--config", path, "--insecure", "--peer-timeout", "5"])
    assert cfg.peer_timeout == 5.0 and cfg.commit_timeout == 600.0


@pytest.mark.parametrize("flag,value", [("--peer-timeout", "0"), ("--peer-timeout", "1e9"),
                                        ("--handshake-timeout", "-1"),
                                        ("--commit-timeout", "nan")])
def test_peer_timeouts_are_bounded(flag, value):
    with pytest.raises(ConfigError, match=flag.lstrip("-")):
        load_config(["--config", "/dev/null", "--insecure", flag, value])


def test_peer_timeout_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match="wrong type|boolean"):
        load_config(["--config", write(tmp_path, 'peer-timeout = "30s"\n'), "--insecure"])
    with pytest.raises(ConfigError, match="boolean"):
        load_config(["--config", write(tmp_path, "commit-timeout = true\n"), "--insecure"])


def test_no_insecure_overrides_the_file(tmp_path, certdir):
    path = write(tmp_path, "insecure = true\n")
    assert load_config(["--config", path]).insecure
    tls = ["--tls-ca", f"{certdir}/ca.pem", "--tls-cert", f"{certdir}/a.pem",
           "--tls-key", f"{certdir}/a.key"]
    assert not load_config(["--config", path, "--no-insecure", *tls]).insecure
    with pytest.raises(ConfigError, match="TLS is required"):
        load_config(["--config", path, "--no-insecure"])
    assert load_config(["--config", "/dev/null", "--insecure"]).insecure


def test_no_insecure_makes_a_real_daemon_use_tls(tmp_path, certdir, daemons):
    """The reviewer's F8 repro: insecure = true in the file, TLS flags and
    --no-insecure on the command line -> the daemon runs mutual TLS."""
    path = write(tmp_path, "insecure = true\n")
    d = daemons("a", certdir, ["--config", path, "--no-insecure"])
    info = control_request(d.control, {"op": "status"})["result"]
    assert info["tls"] is True
    assert "event=insecure" not in d.log()


def test_no_control_group_and_no_image_quota(tmp_path):
    path = write(tmp_path, 'control-group = "root"\nimage-quota = "1G"\n')
    cfg = load_config(["--config", path, "--insecure"])
    assert cfg.control_group == "root" and cfg.image_quota == 1 << 30
    cfg = load_config(["--config", path, "--insecure", "--no-control-group",
                       "--no-image-quota"])
    assert cfg.control_group is None and cfg.image_quota is None
    assert cfg.control_gid() is None
    with pytest.raises(ConfigError, match="contradict"):
        load_config(["--config", path, "--insecure", "--no-image-quota",
                     "--image-quota", "2G"])


@pytest.mark.parametrize("value,why", [("127.0.0.1:abc", "bad port"), ("", "empty address"),
                                       ("h:99999", "out of range")])
def test_bad_listen_names_the_key_and_where_it_came_from(tmp_path, value, why):
    path = write(tmp_path, f'insecure = true\nlisten = "{value}"\n')
    with pytest.raises(ConfigError, match=f"^listen \\(in config file {path}\\): .*{why}"):
        load_config(["--config", path])
    with pytest.raises(ConfigError, match=f"^listen \\(from --listen\\): .*{why}"):
        load_config(["--config", "/dev/null", "--insecure", "--listen", value])
    with pytest.raises(ConfigError, match=f"image-quota \\(in config file {path}\\)"):
        load_config(["--config", write(tmp_path, 'image-quota = "lots"\n'), "--insecure"])


@pytest.mark.parametrize("key", ["state-dir", "control"])
def test_empty_paths_are_rejected(tmp_path, key):
    path = write(tmp_path, f'insecure = true\n{key} = ""\n')
    with pytest.raises(ConfigError, match=f"^{key} is empty \\(in config file {path}\\)"):
        load_config(["--config", path])
    with pytest.raises(ConfigError, match=f"^{key} is empty \\(from --{key}\\)"):
        load_config(["--config", "/dev/null", "--insecure", f"--{key}", " "])
    with pytest.raises(ConfigError, match="allow-peer has an empty name"):
        load_config(["--config", "/dev/null", "--insecure", "--allow-peer", ""])


def test_empty_state_dir_stops_a_real_daemon_with_a_clear_message(tmp_path):
    path = write(tmp_path, f'insecure = true\nlisten = "127.0.0.1:0"\nstate-dir = ""\n'
                           f'control = "{tmp_path}/c.sock"\n')
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--config", path],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r
    assert "state-dir is empty" in r.stderr and path in r.stderr
    assert "No such file or directory: ''" not in r.stderr + r.stdout
