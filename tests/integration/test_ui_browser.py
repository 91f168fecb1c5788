"""The MLflow UI over a store written by a real sweep, looked at in a real (headless) browser.

A real `bdo tune` writes the store; orchestrator.ui starts `mlflow server` over it (started while the sweep runs,
since importing MLflow takes a while); Debian's chromium, driven through chromedriver by Selenium, then checks
what a person would see: the sweep run and, expanded, its trials on the experiment page; a trial's metric chart;
its PNG artifacts rendered. Screenshots are kept in test-output/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from orchestrator.cli import main
from orchestrator.ui import runs_page, start_server, stop_server
from tests.integration.conftest import runs

ROOT = Path(__file__).resolve().parents[2]
SEARCH_SPACES = ROOT / "search_spaces"
OUTPUT = ROOT / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 150  # the UI is a React SPA served by one worker; on a loaded 2-core machine a page takes tens of seconds
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)

# MLflow 3 opens a new visitor on its GenAI view; bdo's runs belong to its "Model training" view.
ML_VIEW = "?workflowType=machine_learning"
ASSISTANT_CLOSE = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'  # MLflow 3's chat side panel
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]


def _binary(preferred: str, name: str) -> str | None:
    if Path(preferred).is_file():
        return preferred
    return shutil.which(name)


@pytest.fixture(scope="session")
def browser_binaries() -> tuple[str, str]:
    """Skip (loudly) before anything expensive starts when the browser or its driver is missing."""
    chromium, chromedriver = _binary(CHROMIUM, "chromium"), _binary(CHROMEDRIVER, "chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", chromedriver)) if path is None]
    if missing:
        pytest.skip(
            f"BROWSER TEST SKIPPED: Debian package(s) {', '.join(missing)} not installed "
            f"(looked for {CHROMIUM} and {CHROMEDRIVER}); install them with scripts/browser-deps.sh as root "
            f"(apt-get install chromium chromium-driver). The MLflow UI was NOT checked."
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(
            "BROWSER TEST SKIPPED: selenium is not installed (pip install -e '.[test]'); the MLflow UI was NOT checked."
        )
    return chromium, chromedriver


@pytest.fixture
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    for stale in OUTPUT.glob("ui-*"):  # no screenshot of an earlier run may pass for this one's
        stale.unlink()
    return OUTPUT


@pytest.fixture
def ui_server(workdir, output_dir):
    """Start `mlflow server` over ./mlflow.db in the background; the test collects (process, url) when it needs
    them. Whatever happens, the server's process group is ended at teardown."""
    log = open(output_dir / "ui-mlflow-server.log", "w")
    pool = ThreadPoolExecutor(max_workers=1)
    starting = pool.submit(
        start_server, f"sqlite:///{workdir / 'mlflow.db'}", "127.0.0.1", None, output=log, cwd=workdir
    )
    yield starting
    try:
        process, _ = starting.result()
    except Exception:  # it never came up; start_server has already cleaned up after itself
        process = None
    if process is not None:
        stop_server(process)
        assert process.poll() is not None, "the mlflow server is still running after stop_server"
    pool.shutdown()
    log.close()


@pytest.fixture
def browser(browser_binaries, tmp_path, output_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(chromedriver, log_output=str(output_dir / "ui-chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _png_size(run, path: str) -> tuple[int, int]:
    """Pixel size of one of the run's artifacts, read from the store's own file (bdo logs under file:// URIs)."""
    from PIL import Image

    root = urlparse(run.info.artifact_uri)
    assert root.scheme == "file", f"expected a local artifact store, got {run.info.artifact_uri}"
    with Image.open(Path(unquote(root.path)) / path) as image:
        return image.size


def _rendered_size(driver, path: str) -> list[int] | None:
    """[naturalWidth, naturalHeight] of the artifact viewer's loaded <img> for `path`; None until it has pixels."""
    return driver.execute_script(
        "const img = document.querySelector(`img[alt='${arguments[0]}']`);"
        "return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;",
        path,
    )


def test_mlflow_ui_shows_sweep_trials_metrics_and_artifacts(
    browser_binaries, ray_session, workdir, ui_server, browser, output_dir
):
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.perf_counter()
    assert main(["tune", str(SEARCH_SPACES / "badnets.yaml"), "--quick", "--num-samples", "2"]) == 0
    swept = time.perf_counter()
    client, sweeps = runs(workdir, query="tags.role = 'sweep'")
    assert [s.info.run_name for s in sweeps] == ["sweep-badnets"]
    sweep = sweeps[0]
    exp_id = sweep.info.experiment_id
    _, trials = runs(workdir, query=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    trials = sorted(trials, key=lambda t: t.info.run_name)
    assert len(trials) == 2 and all(t.data.tags.get("role") == "trial" for t in trials)
    trial = trials[0]
    epochs = [m.step for m in client.get_metric_history(trial.info.run_id, "val_acc")]
    assert epochs, "the trial logged no val_acc history"

    _, url = ui_server.result()
    served = time.perf_counter()
    driver = browser
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.5)

    def run_link(run) -> tuple[str, str]:
        return By.CSS_SELECTOR, f'a[href="#/experiments/{exp_id}/runs/{run.info.run_id}"]'

    try:
        # 1. The page `bdo ui` hands out: the runs table (not MLflow's GenAI overview) with the sweep, then,
        # expanded, its two trials, each naming its datasets and its logged model.
        driver.get(runs_page(url, exp_id))
        sweep_link = wait.until(EC.visibility_of_element_located(run_link(sweep)))
        for close in driver.find_elements(By.CSS_SELECTOR, ASSISTANT_CLOSE):  # more room for the runs table
            close.click()
        assert sweep_link.text.strip() == "sweep-badnets"
        assert not driver.find_elements(By.XPATH, "//*[normalize-space(text())='Token Usage']"), "GenAI overview"
        assert not driver.find_elements(*run_link(trial)), "trials must be nested under the sweep, not listed flat"
        expand = sweep_link.find_element(By.XPATH, "./ancestor::div[@role='gridcell'][1]//button")
        expand.click()
        for child in trials:
            link = wait.until(EC.visibility_of_element_located(run_link(child)))
            assert link.text.strip() == child.info.run_name
            # the grid draws a run's row in several containers (pinned name column, the rest): read them all
            row = f"//div[@role='row'][@row-id='{child.info.run_id}']"
            wait.until(
                lambda d, row=row: (
                    "digits-train-badnets" in (text := " ".join(e.text for e in d.find_elements(By.XPATH, row)))
                    and "model" in text.split()
                )
            )
        driver.save_screenshot(str(output_dir / "ui-experiment.png"))

        # 2. A trial's metric charts: the val_acc card draws a line through one point per epoch.
        driver.get(f"{url}/#/experiments/{exp_id}/runs/{trial.info.run_id}/model-metrics{ML_VIEW}")
        wait.until(
            EC.visibility_of_element_located((By.XPATH, f"//*[normalize-space(text())='{trial.info.run_name}']"))
        )
        # the page draws only the charts in view, and a run has a dozen metrics: filter to the one checked here
        search = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "input[placeholder='Search metric charts']")))
        search.send_keys("val_acc")
        card_xpath = "//div[@data-testid='experiment-view-compare-runs-card'][.//h4[@title='val_acc']]"
        card = wait.until(EC.presence_of_element_located((By.XPATH, card_xpath)))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", card)
        wait.until(
            lambda d: d.find_element(By.XPATH, card_xpath).find_elements(
                By.CSS_SELECTOR, ".js-plotly-plot g.scatterlayer path.js-line"
            )
        )
        card = driver.find_element(By.XPATH, card_xpath)
        drawn = card.find_elements(By.CSS_SELECTOR, "g.scatterlayer path.js-line")
        lines = [p.get_attribute("d") or "" for p in drawn]
        assert any(d.startswith("M") and "L" in d for d in lines), f"no drawn line in the val_acc chart: {lines}"
        points = card.find_elements(By.CSS_SELECTOR, "g.scatterlayer path.point")
        assert len(points) >= len(epochs), f"{len(points)} points drawn for {len(epochs)} epochs of val_acc"
        assert f"{trial.info.run_name} (val_acc)" in card.text, "the chart's legend names the trial"
        driver.save_screenshot(str(output_dir / "ui-run-metrics.png"))

        # 3. Its PNG artifacts render in the artifact viewer, at the size of the files in the store.
        driver.get(f"{url}/#/experiments/{exp_id}/runs/{trial.info.run_id}/artifacts{ML_VIEW}")
        opened: set[str] = set()
        for folders, name, shot in (
            (["plots"], "curves.png", "ui-artifact.png"),
            (["plots"], "confusion.png", "ui-artifact-confusion.png"),
            ([], "trigger.png", "ui-artifact-trigger.png"),
        ):
            path = "/".join([*folders, name])
            for node in [*(f for f in folders if f not in opened), name]:  # a second click would fold it again
                opened.update(folders)
                wait.until(
                    EC.element_to_be_clickable(
                        (By.CSS_SELECTOR, f'[data-testid="artifact-tree-node"][artifact-name="{node}"]')
                    )
                ).click()
            expected = list(_png_size(trial, path))
            # The viewer reuses its <img> while the next file loads: wait for the file's own pixel size.
            try:
                wait.until(lambda d, path=path, expected=expected: _rendered_size(d, path) == expected)
            except TimeoutException:
                shown = _rendered_size(driver, path)
                raise AssertionError(f"{path} is not shown at its size {expected}; the page shows {shown}") from None
            driver.save_screenshot(str(output_dir / shot))
    except (WebDriverException, AssertionError):  # TimeoutException is a WebDriverException
        driver.save_screenshot(str(output_dir / "ui-failure.png"))
        (output_dir / "ui-failure.html").write_text(driver.page_source)
        raise
    print(
        f"sweep {swept - started:.0f} s, server ready {served - swept:.0f} s later, "
        f"browser checks {time.perf_counter() - served:.0f} s; screenshots in {output_dir}"
    )
