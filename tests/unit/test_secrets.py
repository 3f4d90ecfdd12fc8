"""Secrets: the storage-option rule (allow-list per backend, anything secret-looking refused,
values never echoed) and redaction of everything a run writes (``pipelines/store/secrets.py``,
``pipelines/store/storage.py``, ``jobs/common.py``)."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import BaseModel, ConfigDict, Field

from jobs import common
from pipelines.store import storage
from pipelines.store.secrets import MASK, looks_secret, redact, redact_text, redact_url

SENTINEL = "SENTINEL-9f3c"

# --- the storage-option rule ---------------------------------------------------------------

ALLOWED = {
    "s3://bucket/x": ["AWS_REGION", "aws_region", "AWS_ENDPOINT_URL", "aws_endpoint", "AWS_ALLOW_HTTP",
                      "aws_s3_allow_unsafe_rename", "aws_s3_locking_provider", "aws_virtual_hosted_style_request",
                      "aws_conditional_put", "aws_profile", "aws_default_region", "aws_sse_kms_key_id",
                      "aws_skip_signature", "region", "endpoint_url", "timeout", "connect_timeout", "allow_http",
                      "proxy_url", "allow_invalid_certificates"],
    "gs://bucket/x": ["google_bucket", "GOOGLE_SKIP_SIGNATURE", "timeout", "proxy_ca_certificate"],
    "az://container/x": ["azure_storage_account_name", "account_name", "AZURE_STORAGE_USE_EMULATOR",
                         "azure_storage_endpoint", "use_emulator", "azure_client_id", "azure_tenant_id",
                         "azure_authority_id", "timeout"],
    "abfss://fs@acct.dfs.core.windows.net/x": ["azure_container_name", "use_fabric_endpoint"],
}


@pytest.mark.parametrize(("uri", "key"), [(u, k) for u, keys in ALLOWED.items() for k in keys])
def test_a_backends_non_secret_settings_pass_for_it_and_when_the_backend_is_unknown(uri, key):
    storage.check_storage_options({key: "v"}, uri)
    storage.check_storage_options({key: "v"})  # no URI (a config field): any backend's settings


SECRET_KEYS = [
    "aws_access_key_id", "AWS_SECRET_ACCESS_KEY", "aws_session_token", "aws_token", "token", "password",
    "aws_secert_access_key", "secret_key", "azure_storage_account_key", "account_key", "access_key",
    "azure_storage_master_key", "client_secret", "AZURE_CLIENT_SECRET", "azure_storage_sas_key", "sas_token",
    "sas_key", "bearer_token", "azure_storage_token", "azure_federated_token_file", "google_service_account_key",
    "service_account_key", "google_application_credentials", "google_service_account",
    "aws_sse_customer_key_base64", "aws_web_identity_token_file", "aws_container_credentials_full_uri",
    "apiKey", "api-key", "private_key", "ssh_private_key", "passwd", "db_pwd", "auth_header", "authorization",
    "x-amz-signature", "sig", "session", "client_cert", "refresh_token", "oauth_token", "my_secret",
]


@pytest.mark.parametrize("uri", [None, "s3://bucket/x", "gs://bucket/x", "az://container/x", "/local/path"])
@pytest.mark.parametrize("key", SECRET_KEYS)
def test_every_secret_looking_key_is_refused_as_a_credential_without_its_value(key, uri):
    with pytest.raises(ValueError) as exc:
        storage.check_storage_options({"timeout": "30s", key: SENTINEL}, uri)
    message = str(exc.value)
    assert f"storage_options.{key} is a credential" in message and "environment" in message
    assert SENTINEL not in message and "\n" not in message


@pytest.mark.parametrize(("key", "uri", "env"), [
    ("aws_secert_access_key", "s3://b/x", "AWS_SECRET_ACCESS_KEY"),  # a misspelling: the nearest one's
    ("azure_storage_account_key", None, "AZURE_STORAGE_ACCOUNT_KEY"),
    ("client_secret", "az://c/x", "AZURE_CLIENT_SECRET"),
    ("google_service_account_key", "gs://b/x", "GOOGLE_SERVICE_ACCOUNT_KEY"),
    ("token", "s3://b/x", "AWS_SESSION_TOKEN"),
    ("token", "az://c/x", "AZURE_STORAGE_TOKEN"),
])
def test_the_fix_names_the_variable_to_export(key, uri, env):
    with pytest.raises(ValueError, match=f"export {env} instead"):
        storage.check_storage_option(key, SENTINEL, uri)


def test_an_unknown_non_secret_key_is_refused_with_the_nearest_name_and_the_allowed_list():
    with pytest.raises(ValueError) as exc:
        storage.check_storage_option("aws_regoin", SENTINEL, "s3://bucket/x")
    message = str(exc.value)
    assert "storage_options.aws_regoin is not a known s3 setting (did you mean aws_region?)" in message
    assert "aws_endpoint_url" in message and "aws_allow_http" in message and "azure_" not in message
    assert SENTINEL not in message
    with pytest.raises(ValueError, match="is not a known object-store setting") as exc:
        storage.check_storage_option("colour", SENTINEL)
    assert "azure_storage_account_name" in str(exc.value) and "google_bucket" in str(exc.value)


def test_another_backends_setting_is_unknown_for_this_one():
    storage.check_storage_option("azure_storage_account_name", "acct", "az://c/x")
    with pytest.raises(ValueError, match="not a known s3 setting"):
        storage.check_storage_option("azure_storage_account_name", "acct", "s3://bucket/x")


@pytest.mark.parametrize("value", [f"http://minio:{SENTINEL}@127.0.0.1:9000",
                                   f"https://127.0.0.1:9000/?X-Amz-Signature={SENTINEL}"])
def test_an_allowed_key_holding_a_url_with_credentials_is_refused_without_its_value(value):
    with pytest.raises(ValueError) as exc:
        storage.check_storage_option("AWS_ENDPOINT_URL", value, "s3://bucket/x")
    assert "URL with credentials" in str(exc.value) and SENTINEL not in str(exc.value)
    storage.check_storage_option("AWS_ENDPOINT_URL", "http://127.0.0.1:9000", "s3://bucket/x")


def test_the_config_field_type_refuses_secrets_and_the_error_does_not_echo_them():
    class Cfg(BaseModel):
        model_config = ConfigDict(extra="forbid")
        storage_options: storage.StorageOptions = Field(default_factory=dict)

    assert Cfg(storage_options={"AWS_REGION": "x"}).storage_options == {"AWS_REGION": "x"}
    with pytest.raises(SystemExit) as exc:
        common.load_config(Cfg, None, [f"storage_options.client_secret={SENTINEL}"], {})
    message = str(exc.value)
    assert "storage_options.client_secret is a credential" in message and "value not shown" in message
    assert SENTINEL not in message


# --- which names are secret ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["password", "client_secret", "X-Amz-Signature", "X-Amz-Credential",
                                  "X-Amz-Security-Token", "AWSAccessKeyId", "aws_access_key_id", "sig", "apiKey",
                                  "access_token", "Authorization", "sas_token", "aws_secert_access_key",
                                  "db_passwords", "private_key", "session"])
def test_secret_names(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["tokenizer", "max_tokens", "pad_token_id", "key_type", "aws_sse_kms_key_id",
                                  "root", "doc_id", "storage_options", "monkey", "keyword", "authority_id",
                                  "role_session_name", "signed", "se", "sv"])
def test_names_that_are_not_secret(name):
    assert not looks_secret(name)


# --- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "redacted"), [
    ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
    ("https://user@host.example/a?b=1", "https://***@host.example/a?b=1"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&x=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("https://a.blob.core.windows.net/c/b?sv=2022&se=2030&sig=abc%3D", "https://a.blob.core.windows.net/c/b?sv=2022&se=2030&sig=***"),
    ("https://app.example/cb#access_token=xyz&state=1", "https://app.example/cb#access_token=***&state=1"),
    ("https://host.example:8443/plain/path?page=2", "https://host.example:8443/plain/path?page=2"),
    ("/local/path/with@sign", "/local/path/with@sign"),
    ("not a url", "not a url"),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_redact_text_finds_urls_inside_a_line():
    line = f"GET https://u:{SENTINEL}@h.example/x.jpg failed; retry s3://b/k?token={SENTINEL} later"
    out = redact_text(line)
    assert SENTINEL not in out and "https://***@h.example/x.jpg failed" in out and "s3://b/k?token=***" in out


def test_redact_walks_nested_configs_and_leaves_the_input_alone():
    cfg = {
        "output": {"root": f"s3://AK:{SENTINEL}@bucket/data", "storage_options": {"AWS_REGION": "eu-west-1",
                                                                                   "aws_skip_signature": "true"}},
        "source": {"kind": "manifest", "client_secret": SENTINEL, "api": {"apiKey": SENTINEL, "timeout": 3}},
        "variants": [{"name": "ciea", "password": 1234}, f"https://x.example/?sig={SENTINEL}"],
        "model": {"tokenizer": "bert", "pad_token_id": 0, "use_auth": False, "auth_token": None},
    }
    before = json.dumps(cfg, sort_keys=True)
    out = redact(cfg)
    assert json.dumps(cfg, sort_keys=True) == before
    assert SENTINEL not in json.dumps(out)
    assert out["output"]["root"] == "s3://***@bucket/data"
    assert out["output"]["storage_options"] == {"AWS_REGION": "eu-west-1", "aws_skip_signature": "true"}
    assert out["source"] == {"kind": "manifest", "client_secret": MASK, "api": {"apiKey": MASK, "timeout": 3}}
    assert out["variants"] == [{"name": "ciea", "password": MASK}, f"https://x.example/?sig={MASK}"]
    assert out["model"] == cfg["model"]  # not secrets, or no value to hide


def test_write_json_redacts_what_it_writes(tmp_path):
    path = tmp_path / "run" / "summary.json"
    common.write_json(path, {"root": tmp_path, "source": f"https://u:{SENTINEL}@h.example/m.jsonl",
                             "headers": {"Authorization": f"Bearer {SENTINEL}"}, "rows": 3})
    text = path.read_text()
    assert SENTINEL not in text
    assert json.loads(text) == {"root": str(tmp_path), "source": "https://***@h.example/m.jsonl",
                                "headers": {"Authorization": MASK}, "rows": 3}


def test_run_log_lines_have_url_credentials_masked(tmp_path):
    log = common.log_to_file(tmp_path / "ciea.log")
    try:
        logging.getLogger("pipelines.test").warning("cannot read %s", f"s3://AK:{SENTINEL}@bucket/a.tar")
    finally:
        for h in list(logging.getLogger().handlers):
            if getattr(h, "_ciea_run_log", False):
                logging.getLogger().removeHandler(h)
                h.close()
    text = log.read_text()
    assert "cannot read s3://***@bucket/a.tar" in text and SENTINEL not in text


# --- the job shell: refused before parsing, one line, no value ------------------------------


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class Out(BaseModel):
        model_config = ConfigDict(extra="forbid")
        root: str = "data"
        storage_options: storage.StorageOptions = Field(default_factory=dict)

    output: Out = Field(default_factory=Out)
    api_token: int = 0


@pytest.mark.parametrize(("overrides", "named"), [
    ([f"output.storage_options.aws_secert_access_key={SENTINEL}"], "output.storage_options.aws_secert_access_key"),
    ([f"output.client_secret={SENTINEL}"], "output.client_secret"),
    ([f"output.root=s3://AK:{SENTINEL}@bucket/data"], "output.root"),
    ([f"output.root=https://h.example/d?X-Amz-Signature={SENTINEL}"], "output.root"),
    ([f"output.storage_options.regoin={SENTINEL}"], "output.storage_options.regoin"),
])
def test_refuse_secrets_names_the_key_in_one_line(overrides, named):
    with pytest.raises(SystemExit) as exc:
        common.refuse_secrets("ciea x", None, overrides, "output.storage_options")
    message = str(exc.value)
    assert message.startswith(f"ciea x: {named} ") and "\n" not in message and SENTINEL not in message


def test_refuse_secrets_reads_the_config_file_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output:\n  storage_options:\n    sas_token: {SENTINEL}\n")
    with pytest.raises(SystemExit, match="export AZURE_STORAGE_SAS_KEY") as exc:
        common.refuse_secrets("ciea x", str(config), [], None)
    assert SENTINEL not in str(exc.value)
    common.refuse_secrets("ciea x", None, ["output.root=s3://bucket/data", "output.storage_options.AWS_REGION=x"],
                          "output.storage_options")


def test_a_config_file_that_is_not_yaml_is_refused_without_quoting_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {{storage_options: {{sas_token: {SENTINEL}\n")
    with pytest.raises(SystemExit) as exc:
        common.refuse_secrets("ciea x", str(config), [], None)
    assert str(exc.value).startswith(f"ciea x: --config {config}: cannot read it as YAML")
    assert SENTINEL not in str(exc.value)
    with pytest.raises(SystemExit, match="cannot read it as YAML"):
        common.refuse_secrets("ciea x", str(tmp_path / "missing.yaml"), [], None)


def test_a_validation_error_on_a_secret_looking_field_hides_the_value():
    with pytest.raises(SystemExit) as exc:
        common.load_config(_Job, None, [f"api_token=not-a-number-{SENTINEL}"], {})
    assert "api_token" in str(exc.value) and "value not shown" in str(exc.value) and SENTINEL not in str(exc.value)
    with pytest.raises(SystemExit) as exc:  # any other field: the value, its URL credentials masked
        common.load_config(_Job, None, [f"output.roots=https://u:{SENTINEL}@h.example/x"], {})
    assert "got 'https://***@h.example/x'" in str(exc.value) and SENTINEL not in str(exc.value)
