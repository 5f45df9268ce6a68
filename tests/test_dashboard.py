"""The fleet dashboard in a real browser (issue 19.4): headless Chromium driven by Selenium through Debian's
chromium-driver, against one ``opendps serve``.

Selenium with the system's chromedriver rather than Playwright: Debian ships chromium and chromium-driver built
together, so the driver always matches the browser and nothing is downloaded at install or run time (Playwright's
driver expects a browser build of its own version; selenium is a small pure-Python wheel in the test extra). Without
chromium and chromedriver the test skips with the reason (CI installs them and makes it mandatory).

A device is provisioned the cheapest real way (a symmetric-key group, a registration with a CSR over HTTPS); the
page is opened, signed into with the owner connection string, and must show the device with its certificate's
expiry, count it in the expiry chart, and open its page (twin, certificate history). The browser's network log
must never carry the key. Screenshots are saved as test artifacts (``$OPENDPS_TEST_ARTIFACTS``, default
``test-artifacts/``); ``OPENDPS_UPDATE_SCREENSHOT=1`` also writes docs/dashboard.png, the README's picture.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from tests.conftest import _run_server, database, service_missing
from tests.x509_helpers import p384_csr

from opendps.transport import sas

ROOT = Path(__file__).resolve().parents[1]
PREVIEW = "2025-07-01-preview"
WAIT = 20  # seconds for the page to show what is asked


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    if chromium is None or driver is None:
        service_missing("headless Chromium needs Debian's chromium and chromium-driver (apt-get install chromium "
                        "chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        service_missing("selenium is not installed (pip install -e '.[test]')")
    return chromium, driver


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    return _browser_paths()


@pytest.fixture(scope="module")
def one_server(browser_paths, tmp_path_factory):
    """One server for the module (SQLite: the aggregates run on PostgreSQL in tests/unit/test_fleet.py)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    with database("sqlite", tmp) as url:
        yield from _run_server(url, tmp)


def _service(server) -> httpx.Client:
    conn = sas.parse_connection_string(server.connection_string)
    token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"])
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                        headers={"Authorization": token}, timeout=60)


def _provision(server, group_key: str, rid: str) -> x509.Certificate:
    """A registration with a CSR over HTTPS, as a device makes it: its operational certificate."""
    key = base64.b64encode(__import__("hmac").new(base64.b64decode(group_key), rid.encode(), "sha256").digest()).decode()
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60) as d:
        r = d.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                  json={"registrationId": rid, "csr": base64.b64encode(p384_csr(rid)).decode()},
                  headers={"Authorization": sas.generate(f"{server.id_scope}/registrations/{rid}", key, "registration")})
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    return x509.load_der_x509_certificate(base64.b64decode(r.json()["registrationState"]["issuedCertificateChain"][0]))


@pytest.fixture(scope="module")
def fleet(one_server) -> dict[str, x509.Certificate]:
    """Two namespaces (7- and 30-day leaves), a symmetric-key group on each, four devices provisioned; one device
    registration refused (a wrong key) so the refusals show one."""
    with _service(one_server) as c:
        for ns, policy, days in (("plant-a", "sensors", 7), ("plant-b", "gateways", 30)):
            r = c.put(f"/namespaces/{ns}", json={"properties": {"policyName": policy, "validityPeriodInDays": days}})
            assert r.status_code == 201, r.text
        keys = {}
        for group, policy in (("sensors", "sensors"), ("gateways", "gateways")):
            r = c.put(f"/enrollmentGroups/{group}", json={"attestation": {"type": "symmetricKey"},
                                                          "credentialPolicyName": policy,
                                                          "initialTwin": {"tags": {"site": "plant"}}})
            assert r.status_code == 201, r.text
            keys[group] = r.json()["attestation"]["symmetricKey"]["primaryKey"]
    issued = {rid: _provision(one_server, keys[group], rid) for rid, group in (
        ("sensor-0001", "sensors"), ("sensor-0002", "sensors"), ("sensor-0003", "sensors"), ("gateway-01", "gateways"))}
    with httpx.Client(base_url=one_server.url, verify=ssl.create_default_context(cafile=one_server.ca_file)) as d:
        bad = sas.generate(f"{one_server.id_scope}/registrations/intruder-9", base64.b64encode(b"x" * 32).decode(),
                           "registration")
        r = d.put(f"/{one_server.id_scope}/registrations/intruder-9/register", params={"api-version": PREVIEW},
                  json={"registrationId": "intruder-9"}, headers={"Authorization": bad})
        assert r.status_code == 401
    return issued


@pytest.fixture(scope="module")
def chrome(browser_paths):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1220",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the installation's own server CA is not in the browser's trust store
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _artifacts() -> Path:
    out = Path(os.environ.get("OPENDPS_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _until(driver, check, what: str):
    deadline = time.time() + WAIT
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - an element not there yet, or replaced while read
            pass
        if time.time() > deadline:
            _artifacts().joinpath("dashboard-failure.png").write_bytes(driver.get_screenshot_as_png())
            logs = [e["message"] for e in driver.get_log("browser")]
            pytest.fail(f"the page did not show {what} within {WAIT} s; browser log: {logs[-10:]}; "
                        f"error line: {driver.find_element('id', 'error').text!r}")
        time.sleep(0.1)


def test_the_dashboard_shows_a_just_provisioned_device_and_its_expiry(one_server, fleet, chrome):
    from selenium.webdriver.common.by import By

    leaf = fleet["sensor-0001"]
    expiry_day = leaf.not_valid_after_utc.date().isoformat()
    chrome.get(f"{one_server.url}/ui/")
    _until(chrome, lambda: chrome.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    chrome.find_element(By.ID, "credential").send_keys(one_server.connection_string)
    chrome.find_element(By.ID, "sign-in").click()

    # the device, connected or not, with its current certificate's serial and expiry
    row = _until(chrome, lambda: chrome.find_element(By.CSS_SELECTOR, 'tr[data-device-id="sensor-0001"]'),
                 "the provisioned device")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "sensor-0001" and cells[1] == "enabled" and cells[3] == "never", cells
    assert cells[4].replace(":", "").lower().lstrip("0") == format(leaf.serial_number, "x"), cells
    assert cells[5].startswith(leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M")) and "in 6 d" in cells[5], cells
    assert cells[6] == "plant-a / sensors", cells
    # the expiry chart counts it on its day (three sensors issued seconds apart: one bar of 3)
    bar = _until(chrome, lambda: chrome.find_element(By.CSS_SELECTOR, f'#expiry-chart g[data-date="{expiry_day}"]'),
                 "the expiry chart")
    assert int(bar.get_attribute("data-count")) == 3
    assert "4 certificates expire within 90 days" in chrome.find_element(By.ID, "expiry-total").text
    _until(chrome, lambda: "4 registrations" in chrome.find_element(By.ID, "registrations-total").text,
           "registrations per minute")
    _until(chrome, lambda: "plant-b" in chrome.find_element(By.ID, "namespaces").text, "the namespaces and policies")
    _until(chrome, lambda: "gateways" in chrome.find_element(By.ID, "enrollments").text, "the enrollment groups")
    # with the service summary (GET /status), the top row and the refused registration
    _until(chrome, lambda: chrome.find_elements(By.CSS_SELECTOR, "#tiles .tile") or
           chrome.find_element(By.ID, "tiles-note").is_displayed(), "the service summary or why not")
    if chrome.find_elements(By.CSS_SELECTOR, "#tiles .tile"):
        _until(chrome, lambda: "intruder-9" in chrome.find_element(By.ID, "refusals").text, "the refusal")
    time.sleep(0.5)  # the last requests of the overview settle before the picture
    picture = chrome.get_screenshot_as_png()
    _artifacts().joinpath("dashboard.png").write_bytes(picture)
    if os.environ.get("OPENDPS_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs" / "dashboard.png").write_bytes(picture)
    # the id prefix search pages on the server
    search = chrome.find_element(By.ID, "device-prefix")
    search.send_keys("GATE")
    _until(chrome, lambda: [r.get_attribute("data-device-id") for r in chrome.find_elements(
        By.CSS_SELECTOR, "#devices tbody tr[data-device-id]")] == ["gateway-01"], "the prefix search")
    search.clear()
    search.send_keys(" ")  # an input event: the search is cleared
    _until(chrome, lambda: len(chrome.find_elements(By.CSS_SELECTOR, "#devices tbody tr[data-device-id]")) == 4,
           "every device again")

    # the device page: twin, certificate history
    chrome.find_element(By.CSS_SELECTOR, 'tr[data-device-id="sensor-0001"] a').click()
    _until(chrome, lambda: chrome.find_element(By.ID, "device-title").text == "sensor-0001", "the device page")
    serial = _until(chrome, lambda: chrome.find_element(By.CSS_SELECTOR, "#device-certificates tr[data-serial]"),
                    "the certificate history").get_attribute("data-serial")
    assert serial.replace(":", "").lower().lstrip("0") == format(leaf.serial_number, "x")
    twin = json.loads(_until(chrome, lambda: chrome.find_element(By.ID, "device-twin").text, "the twin"))
    assert twin["tags"] == {"site": "plant"}
    assert "Disconnected" in chrome.find_element(By.ID, "device-state").text
    _artifacts().joinpath("dashboard-device.png").write_bytes(chrome.get_screenshot_as_png())

    # only signed tokens went over the wire: never the key, in any URL, header or body the browser sent
    key = sas.parse_connection_string(one_server.connection_string)["SharedAccessKey"]
    sent = [json.loads(e["message"])["message"] for e in chrome.get_log("performance")]
    requests = [m["params"] for m in sent if m.get("method", "").startswith("Network.requestWillBeSent")]
    assert requests and any("SharedAccessSignature" in json.dumps(r) for r in requests)
    assert not any(key in json.dumps(m) or key.replace("+", "%2B") in json.dumps(m) for m in sent)
    assert datetime.now(UTC) < leaf.not_valid_after_utc


def test_a_policy_without_the_hub_right_stays_signed_in_and_is_told_why(one_server, fleet, chrome):
    """ServiceConfig without being the owner: the overview works, the device page's twin and telemetry (the hub
    service API, owner only) are refused with a 401 — which must say why on the page, not sign the user out."""
    from selenium.webdriver.common.by import By

    with _service(one_server) as c:
        assert c.put("/accessPolicies/dashboard-viewer", json={"rights": "ServiceConfig"}).status_code in (200, 201)
        key = c.get("/accessPolicies/dashboard-viewer/keys").json()["primaryKey"]
    host = sas.parse_connection_string(one_server.connection_string)["HostName"]
    chrome.get(f"{one_server.url}/ui/")
    chrome.execute_script("sessionStorage.clear()")
    chrome.refresh()
    _until(chrome, lambda: chrome.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    chrome.find_element(By.ID, "credential").send_keys(
        f"HostName={host};SharedAccessKeyName=dashboard-viewer;SharedAccessKey={key}")
    chrome.find_element(By.ID, "sign-in").click()
    _until(chrome, lambda: chrome.find_element(By.CSS_SELECTOR, 'tr[data-device-id="sensor-0002"] a'),
           "the devices").click()
    _until(chrome, lambda: chrome.find_element(By.CSS_SELECTOR, "#device-certificates tr[data-serial]"),
           "the certificate history (ServiceConfig)")
    _until(chrome, lambda: "may not use the hub service API" in chrome.find_element(By.ID, "error").text,
           "why the twin is not shown")
    assert not chrome.find_element(By.ID, "login").is_displayed()
    assert chrome.find_element(By.ID, "who").text.startswith("dashboard-viewer @")
    # a hand-made link with a broken %-escape: the overview and why, never the last device's page
    chrome.execute_script("location.hash = '#/device/default/%E0'")
    _until(chrome, lambda: chrome.find_element(By.ID, "overview").is_displayed()
           and "the link names no device" in chrome.find_element(By.ID, "error").text, "the overview and why")
    assert not chrome.find_element(By.ID, "device").is_displayed()


def test_many_namespaces_cost_a_bounded_number_of_requests(one_server, fleet, chrome):
    """The policies table asks one request per namespace: for the first 20 only (the rest are counted)."""
    from selenium.webdriver.common.by import By

    with _service(one_server) as c:
        for n in range(21):
            assert c.put(f"/namespaces/bulk-{n:02}", json={"properties": {"policyName": "p"}}).status_code == 201
    chrome.get(f"{one_server.url}/ui/")
    chrome.execute_script("sessionStorage.clear()")
    chrome.refresh()
    _until(chrome, lambda: chrome.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    # drained once signed out: what follows is this sign-in's (the first load, still signed in from an earlier test,
    # may have logged its own requests late on a slow machine: a CI run counted 40)
    chrome.get_log("performance")
    chrome.find_element(By.ID, "credential").send_keys(one_server.connection_string)
    chrome.find_element(By.ID, "sign-in").click()
    more = _until(chrome, lambda: chrome.find_element(By.ID, "namespaces-more"), "the namespaces not listed")
    assert "and 3 more namespaces" in more.text  # plant-a, plant-b and 21 bulk-NN: 23
    sent = [json.loads(e["message"])["message"] for e in chrome.get_log("performance")]
    asked = [m["params"]["request"]["url"] for m in sent if m.get("method") == "Network.requestWillBeSent"]
    assert sum("/credentials/default/policies" in url for url in asked) == 20, asked


def test_markup_a_device_or_an_operator_chose_is_shown_as_text_and_never_runs(one_server, fleet, chrome):
    """Stored XSS: the refusal log keeps the id a refused device sent, whatever it is, and twin tags hold any
    string; both reach the page. They must show as the text they are: no element made of them, no script of theirs
    run, and no Content-Security-Policy violation in the browser's log (one would mean markup was parsed and only
    the policy stopped it)."""
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    with httpx.Client(base_url=one_server.url, verify=ssl.create_default_context(cafile=one_server.ca_file)) as d:
        r = d.put(f"/{one_server.id_scope}/registrations/{quote(payload, safe='')}/register",
                  params={"api-version": PREVIEW}, json={"registrationId": payload})
        assert r.status_code == 400, r.text  # refused (no such id can exist), and logged as sent
    with _service(one_server) as c:
        assert c.patch("/twins/sensor-0003", json={"tags": {"note": payload}}).status_code == 200
    chrome.get(f"{one_server.url}/ui/")
    chrome.execute_script("sessionStorage.clear()")
    chrome.refresh()
    _until(chrome, lambda: chrome.find_element(By.ID, "login").is_displayed(), "the sign-in form")
    chrome.get_log("browser")  # drained: what follows is this page's
    chrome.find_element(By.CSS_SELECTOR, "#credential").send_keys(one_server.connection_string)
    chrome.find_element(By.ID, "sign-in").click()
    asked = [0.0]

    def refusal_shown() -> bool:  # GET /status is cached a few seconds per process: asked again, once a second
        if payload in chrome.find_element(By.ID, "refusals").text:
            return True
        if time.time() - asked[0] > 1:
            asked[0] = time.time()
            chrome.find_element(By.ID, "refresh").click()
        return False

    _until(chrome, refusal_shown, "the refused id, as text")
    chrome.execute_script("location.hash = '#/device/default/sensor-0003'")
    _until(chrome, lambda: json.dumps(payload) in chrome.find_element(By.ID, "device-twin").text,
           "the tag, as text (in the twin's JSON)")
    assert chrome.execute_script("return window.__xss") is None
    assert not chrome.find_elements(By.CSS_SELECTOR, "main img, main script")
    assert not [e["message"] for e in chrome.get_log("browser") if "Content Security Policy" in e["message"]]
