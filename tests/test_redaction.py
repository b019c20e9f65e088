"""Redaction of every URI the harness writes down or prints (pure, no store)."""

from __future__ import annotations

from harness.redaction import redact, redact_config


def test_redact_masks_the_password_of_a_uri_and_keeps_the_user():
    assert redact("postgresql://user:secret@127.0.0.1/db") == "postgresql://user:***@127.0.0.1/db"
    assert redact("postgresql+psycopg://u:pa/ss@[::1]:5432/db") == "postgresql+psycopg://u:***@[::1]:5432/db"
    assert redact("https://bob:p%40ss@mlflow.example.com/") == "https://bob:***@mlflow.example.com/"
    assert redact("https://bob:p@ss@mlflow.example.com/") == "https://bob:***@mlflow.example.com/"  # split at the last @
    assert redact("mysql://root:@db/x") == "mysql://root:***@db/x"


def test_redact_masks_password_like_query_parameters_whatever_their_case():
    assert redact("postgresql://u@h/db?sslmode=require&password=s3") == "postgresql://u@h/db?sslmode=require&password=***"
    assert (
        redact("postgresql://u@h/db?PassWord=a&sslpassword=b&passwd=c&PWD=d&application_name=x")
        == "postgresql://u@h/db?PassWord=***&sslpassword=***&passwd=***&PWD=***&application_name=x"
    )
    assert (
        redact("https://h/x?Token=a&api_key=b&client_secret=c&X-Amz-Signature=d&page=2#top")
        == "https://h/x?Token=***&api_key=***&client_secret=***&X-Amz-Signature=***&page=2#top"
    )


def test_redact_leaves_uris_without_secrets_paths_and_plain_text_unchanged():
    for text in (
        "postgresql://harness@127.0.0.1:5432/harness",
        "http://127.0.0.1:5000",
        "https://h:8443/a/@me?page=2",
        "sqlite:////tmp/a:b@c/optuna.db",
        "sqlite:///results/mlflow.db",
        "results/demo/optuna.db",
        "file:///tmp/artifacts",
        "models:/demo/3",
        "lr password=1 key: 2",
        "",
    ):
        assert redact(text) == text


def test_redact_masks_every_uri_inside_a_line_of_text():
    line = "sharing the study through postgresql://u:pw1@db/s, logging to 'https://a:pw2@mlflow/' now"
    assert redact(line) == "sharing the study through postgresql://u:***@db/s, logging to 'https://a:***@mlflow/' now"


def test_redact_config_masks_every_uri_in_a_nested_config_and_copies_it():
    config = {
        "study": {"storage": "postgresql://u:pw@db/x", "n_trials": 3},
        "tracking": {"uri": "https://u:pw@mlflow/", "experiment": None},
        "quadrants": {"targets": [{"data": {"path": "s3://b/x?token=pw"}}]},
        "search": {"lr": [0.1, 0.2]},
    }
    safe = redact_config(config)
    assert safe == {
        "study": {"storage": "postgresql://u:***@db/x", "n_trials": 3},
        "tracking": {"uri": "https://u:***@mlflow/", "experiment": None},
        "quadrants": {"targets": [{"data": {"path": "s3://b/x?token=***"}}]},
        "search": {"lr": [0.1, 0.2]},
    }
    assert config["study"]["storage"] == "postgresql://u:pw@db/x"  # the caller's config is left as it was
