"""Which store a router uses: --state-url, then $TOLLWAY_STATE_URL, then state.url; a bad URL is
named and stops the router before it serves."""

from __future__ import annotations

import pytest
import yaml

from router_service.config import RouterConfig
from router_service.proxy import server
from router_service.store.base import STATE_URL_ENV, open_store, state_url
from router_service.store.local import LocalStateStore

BACKEND = {"name": "m", "url": "http://127.0.0.1:9", "profile": "mistralai/mistral-7b-chat"}


def config(**state: object) -> RouterConfig:
    return RouterConfig.model_validate({"backends": [BACKEND], "state": state})


def test_the_flag_wins_over_the_environment_over_the_config(monkeypatch):
    cfg = config(url="redis://from-config:6379/0")
    monkeypatch.delenv(STATE_URL_ENV, raising=False)
    assert state_url(cfg) == "redis://from-config:6379/0"
    monkeypatch.setenv(STATE_URL_ENV, "redis://from-env:6379/0")
    assert state_url(cfg) == "redis://from-env:6379/0"
    assert state_url(cfg, "redis://from-flag:6379/0") == "redis://from-flag:6379/0"
    monkeypatch.delenv(STATE_URL_ENV)
    assert state_url(config()) is None
    assert isinstance(open_store(config()), LocalStateStore)


def test_a_state_url_that_is_not_redis_is_refused_with_its_name(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(STATE_URL_ENV, raising=False)
    with pytest.raises(ValueError, match="expected redis://HOST:PORT/DB"):
        open_store(config(), url="http://redis:6379")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"backends": [BACKEND]}))
    assert server.main(["--config", str(path), "--state-url", "memcached://x:11211"]) == 2
    assert "state URL 'memcached://x:11211'" in capsys.readouterr().err
