"""The transport-policy settings reach the MX courier, and bad ones are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from hato.app import build_couriers
from hato.config import Settings
from hato.delivery.mx import MXCourier
from hato.delivery.router import RouteKind
from hato.errors import ConfigError
from hato.tlsrpt_types import CollectingTLSReporter


def mx_settings(tmp_path: Path, **env: str) -> Settings:
    return Settings(  # type: ignore[call-arg]
        **{
            "HATO_DATA_DIR": str(tmp_path),
            "HATO_ROUTE": "mx",
            "HATO_DNS_SERVERS": "127.0.0.1:5353",
            **env,
        }
    )


def test_the_settings_reach_the_courier(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    reporter = CollectingTLSReporter()
    settings = mx_settings(
        tmp_path,
        HATO_MX_TLS_CA_FILE=str(ca_file),
        HATO_MTA_STS_PORT="8443",
        HATO_DNSSEC_RESOLVER="127.0.0.1:53",
    )
    courier = build_couriers(settings, tls_reporter=reporter)[RouteKind.MX]
    assert isinstance(courier, MXCourier)
    assert courier.mta_sts is not None and courier.mta_sts.port == 8443
    assert courier.mta_sts.cache.directory == tmp_path / "mta-sts"
    assert courier.dane is not None and courier.dane.server == "127.0.0.1:53"
    assert courier.tls_reporter is reporter


def test_without_a_dnssec_resolver_there_is_no_dane(tmp_path: Path) -> None:
    courier = build_couriers(mx_settings(tmp_path))[RouteKind.MX]
    assert isinstance(courier, MXCourier)
    assert courier.dane is None and courier.mta_sts is not None
    assert courier.mta_sts.port == 443


@pytest.mark.parametrize("value", ["unbound.local", "127.0.0.1:0", "127.0.0.1:x", "[::1"])
def test_a_dnssec_resolver_must_be_an_address(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match=r"HATO_DNSSEC_RESOLVER(.|\n)*is not IP\[:PORT\]"):
        mx_settings(tmp_path, HATO_DNSSEC_RESOLVER=value)


def test_an_unreadable_mx_ca_file_is_a_config_error(tmp_path: Path) -> None:
    settings = mx_settings(tmp_path, HATO_MX_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="HATO_MX_TLS_CA_FILE"):
        build_couriers(settings)
