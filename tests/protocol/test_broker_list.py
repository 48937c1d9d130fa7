"""MQTT_HOST as a list of brokers (protocol/settings.py ``parse_brokers``): pure parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import BrokerAddress, mqtt_settings_from


def addresses(text: str, **env: str) -> tuple[BrokerAddress, ...]:
    settings = mqtt_settings_from({"MQTT_HOST": text, **env}, "edge")
    assert settings is not None
    return settings.addresses


def test_one_host_is_the_old_setting() -> None:
    settings = mqtt_settings_from({"MQTT_HOST": "broker", "MQTT_PORT": "1884"}, "edge")
    assert settings is not None
    assert (settings.host, settings.port) == ("broker", 1884)
    assert settings.addresses == (BrokerAddress("broker", 1884),)


def test_a_list_in_order_with_mqtt_port_as_the_default() -> None:
    assert addresses(" a , b:1885,[::1]:1886, ::2,c.example.com", MQTT_PORT="1884") == (
        BrokerAddress("a", 1884), BrokerAddress("b", 1885), BrokerAddress("::1", 1886),
        BrokerAddress("::2", 1884), BrokerAddress("c.example.com", 1884))
    assert addresses("a,b", MQTT_TLS="true")[1] == BrokerAddress("b", 8883)
    settings = mqtt_settings_from({"MQTT_HOST": "a:1,b:2"}, "edge")
    assert settings is not None and (settings.host, settings.port) == ("a", 1)
    assert settings.where == "a:1, b:2"
    assert str(BrokerAddress("::1", 5)) == "[::1]:5"


@pytest.mark.parametrize("text", [
    "a,,b", "a,", ",a", "a:", "a:0", "a:65536", "a:x", "a:-1", "a b", "a:1 2", "[::1", "[::1]x",
    "[a.b]:1", "a,a", "a:1883,a", "h\u00e9", "a/b", ",".join("abcdefghijklmnopq"),
])
def test_a_bad_list_says_mqtt_host(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^MQTT_HOST: "):
        addresses(text)


HOST_CHARS = st.sampled_from("abcxyz019-._")


@given(st.text(max_size=60))
def test_any_text_parses_or_names_mqtt_host(text: str) -> None:
    """Untrusted input: a list of addresses, or a ConfigError naming MQTT_HOST."""
    try:
        found = addresses(text) if text.strip() else ()
    except ConfigError as exc:
        assert str(exc).startswith("MQTT_HOST: ")
        return
    for address in found:
        assert address.host and 1 <= address.port <= 65535
        assert "," not in address.host and " " not in address.host


@given(st.lists(st.tuples(st.text(HOST_CHARS, min_size=1, max_size=20).filter(
    lambda h: h[0].isalnum()), st.none() | st.integers(1, 65535)), min_size=1, max_size=16,
    unique_by=lambda entry: entry[0]))
def test_written_lists_read_back(entries: list[tuple[str, int | None]]) -> None:
    text = ",".join(host if port is None else f"{host}:{port}" for host, port in entries)
    assert addresses(text) == tuple(BrokerAddress(h, 1883 if p is None else p)
                                    for h, p in entries)
