"""Secrets and TLS: an API key never shows anywhere; certificates are verified by default.

The faulty server answers errors whose bodies quote the request headers (Authorization
included), as careless proxies do; sglrun must still not write the key to the output file,
stdout, stderr, its -v log, error messages or ``sglrun config show``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .faulty_server import Faults, FaultyServer
from .helpers import Run, clean_env, read_records, run_cli, write_program, write_rows

SECRET = "sk-test-SECRET-4242"
FRAGMENTS = (SECRET, "SECRET-4242", "sk-test-SECRET")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for fragment in FRAGMENTS:
            position = text.find(fragment)
            assert position < 0, f"the key leaked: ...{text[max(0, position - 120):position + 40]}"


def no_leak(run: Run, *files: Path) -> None:
    assert_no_secret(run.stdout, run.stderr, *(f.read_text() for f in files if f.exists()))


def key_reached_server(server: FaultyServer) -> bool:
    return any(
        headers.get("Authorization") == f"Bearer {SECRET}" for headers in server.headers_seen
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_program(tmp_path)
    write_rows(tmp_path / "rows.jsonl", 60)
    (tmp_path / "sglrun.yaml").write_text("timeout: 2\nretries: 1\n")
    return tmp_path


LEAKY = Faults(error_rate=0.5, echo_headers=True, fail_rows=frozenset(f"r{i}" for i in range(10)))


@pytest.mark.parametrize(
    "key_env, extra",
    [
        ({"SGLRUN_API_KEY": SECRET, "OPENAI_API_KEY": SECRET}, []),
        ({"MY_SERVER_TOKEN": SECRET}, ["--api-key-env", "MY_SERVER_TOKEN"]),
    ],
    ids=["SGLRUN_API_KEY", "api-key-env"],
)
def test_key_never_leaks_from_a_failing_batch(work, key_env, extra):
    output = work / "out.jsonl"
    with FaultyServer(LEAKY, seed=5, max_lifetime=60) as server:
        args = [
            "batch", "prog.py", "rows.jsonl", "-o", str(output), "--backend", "sglang",
            "--url", server.url, "--id-field", "id", "-v", *extra,
        ]  # fmt: skip
        run = run_cli(args, cwd=work, env=clean_env(**key_env), timeout=90)
        assert key_reached_server(server), "the key was not sent: the test proves nothing"
    assert run.returncode == 1, run.describe()
    errors = [record for record in read_records(output) if record["error"]]
    assert len(errors) >= 10
    quoted = [r for r in errors if "Authorization" in r["error"]["message"]]
    assert quoted, "the server's header echo did not reach the error records"
    assert "retry" in run.stderr  # the -v log ran, with the server's messages in it
    no_leak(run, output)


def test_key_never_leaks_from_sglrun_run(work):
    faults = Faults(error_rate=1.0, echo_headers=True)
    with FaultyServer(faults, max_lifetime=60) as server:
        args = ["run", "prog.py", "--backend", "sglang", "--url", server.url, "-v",
                "--", "--text", "r1"]  # fmt: skip
        run = run_cli(args, cwd=work, env=clean_env(SGLRUN_API_KEY=SECRET), timeout=60)
        assert key_reached_server(server)
    assert run.returncode == 1, run.describe()
    assert "HTTP 50" in run.stderr
    no_leak(run)


def test_key_never_leaks_from_the_openai_backend(work):
    """Every OpenAI route answers 404 with the request headers quoted."""
    output = work / "out.jsonl"
    with FaultyServer(Faults(echo_headers=True), max_lifetime=60) as server:
        args = ["batch", "prog.py", "rows.jsonl", "-o", str(output), "--backend", "openai",
                "--model", "gpt-test", "--url", server.url + "/v1", "--id-field", "id", "-v"]
        run = run_cli(args, cwd=work, env=clean_env(OPENAI_API_KEY=SECRET), timeout=60)
        assert key_reached_server(server)
    assert run.returncode in (1, 2), run.describe()
    no_leak(run, output)


def test_config_show_never_prints_the_key(work):
    env = clean_env(SGLRUN_API_KEY=SECRET, OPENAI_API_KEY=SECRET, SGLRUN_BACKEND="openai")
    for args in (["config", "show"], ["config", "show", "--json"]):
        run = run_cli(args, cwd=work, env=env, timeout=60)
        assert run.returncode == 0, run.describe()
        assert "OPENAI_API_KEY" in run.stdout and "set" in run.stdout
        no_leak(run)
    shown = json.loads(run_cli(["config", "show", "--json"], cwd=work, env=env).stdout)
    assert shown["api_key"] == "set"


@pytest.mark.parametrize(
    "yaml_text, env",
    [
        (f"api_key: {SECRET}\n", {}),  # a key pasted into the file
        (f"api_key_env: {SECRET}\n", {}),  # the key where its variable's name belongs
        (f"profiles:\n  prod:\n    api_key: {SECRET}\n", {}),
        ("backend: openai\n", {"SGLRUN_API_KEY_ENV": SECRET}),
    ],
    ids=["api_key-in-file", "key-as-api_key_env", "key-in-profile", "key-in-env-name"],
)
def test_a_key_in_the_wrong_place_is_refused_without_printing_it(work, yaml_text, env):
    (work / "sglrun.yaml").write_text(yaml_text)
    for args in (["config", "show"], ["batch", "prog.py", "rows.jsonl", "--backend", "fake"]):
        run = run_cli(args, cwd=work, env=clean_env(**env), timeout=60)
        assert run.returncode == 2, run.describe()
        assert run.stderr.startswith("sglrun: error: ")
        no_leak(run)


def test_key_given_as_flag_value_is_not_echoed(work):
    run = run_cli(
        ["batch", "prog.py", "rows.jsonl", "--backend", "fake", "--api-key-env", SECRET],
        cwd=work,
        timeout=60,
    )
    assert run.returncode == 2, run.describe()
    no_leak(run)


# ------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: by ``cryptography`` if installed, else openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    return str(cert), str(key)


def _with_cryptography(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _tls_batch(work: Path, server: FaultyServer, *extra: str, env=None, backend="sglang") -> Run:
    url = server.url + ("/v1" if backend == "openai" else "")
    args = ["batch", "prog.py", "rows.jsonl", "-o", "out.jsonl", "--backend", backend,
            "--url", url, "--id-field", "id", *extra]  # fmt: skip
    if backend == "openai":
        args += ["--model", "gpt-test"]
    return run_cli(args, cwd=work, env=env or clean_env(SGLRUN_API_KEY=SECRET), timeout=60)


def test_tls_is_verified_by_default(work, certificate):
    with FaultyServer(tls=certificate, max_lifetime=60) as server:
        assert server.url.startswith("https://")
        run = _tls_batch(work, server)
        generated = server.since()
        assert server.tls_failures >= 1
    assert run.returncode == 2, run.describe()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "certificate verify failed" in lines[0].lower(), lines
    assert not generated
    assert not (work / "out.jsonl").exists()
    no_leak(run)


@pytest.mark.slow
def test_tls_is_verified_by_default_on_the_openai_backend(work, certificate):
    with FaultyServer(tls=certificate, max_lifetime=60) as server:
        run = _tls_batch(work, server, backend="openai", env=clean_env(OPENAI_API_KEY=SECRET))
        assert server.tls_failures >= 1
        reached = sum(server.other_requests.values())
    assert run.returncode in (1, 2), run.describe()
    assert reached == 0, "a request got through an unverified TLS connection"
    text = run.stderr + ((work / "out.jsonl").read_text() if (work / "out.jsonl").exists() else "")
    assert "certificate verify failed" in text.lower()
    no_leak(run)


def test_insecure_connects(work, certificate):
    with FaultyServer(tls=certificate, max_lifetime=60) as server:
        run = _tls_batch(work, server, "--insecure")
        assert key_reached_server(server)
    assert run.returncode == 0, run.describe()
    warnings = [line for line in run.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "not verified" in warnings[0]  # once, not per request
    records = read_records(work / "out.jsonl")
    assert len(records) == 60 and all(record["error"] is None for record in records)
    no_leak(run, work / "out.jsonl")


def test_a_trusted_certificate_connects_without_insecure(work, certificate):
    """Verification checks the trust store, it does not just refuse TLS: trusting the
    certificate (SSL_CERT_FILE) makes the same run succeed."""
    env = clean_env(SGLRUN_API_KEY=SECRET, SSL_CERT_FILE=certificate[0])
    with FaultyServer(tls=certificate, max_lifetime=60) as server:
        run = _tls_batch(work, server, env=env)
    assert run.returncode == 0, run.describe()
    assert len(read_records(work / "out.jsonl")) == 60
