"""The two UIs as a researcher uses them, in headless Debian chromium (Selenium): start a
pipeline run from the Prefect UI's form with an override and see it complete; open the MLflow
UI's compare view of two runs of a sweep. Screenshots land in .test-artifacts/ui/."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import TINY
from tests.servers import ROOT

SHOTS = ROOT / ".test-artifacts" / "ui"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver;"
    " .ci/run installs them)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    # STACK.md: without the networking flags it floods the closed network with retries.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-dev-shm-usage",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 30):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (StaleElementReferenceException,)
    return WebDriverWait(driver, timeout, 0.25, ignored_exceptions=ignored).until(condition)


def click(driver, element) -> None:
    """Scrolled into view first; a JS click when a toast covers it."""
    from selenium.common.exceptions import WebDriverException

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    try:
        element.click()
    except WebDriverException:
        driver.execute_script("arguments[0].click();", element)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_prefect_ui_starts_a_pipeline_run_with_an_override(browser, served: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from selenium.webdriver.common.by import By

    from tasks.support import tracking

    ui, override = served.removesuffix("/api"), "sae.d_sae=48"
    with temporary_settings({PREFECT_API_URL: served}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("pipeline/saeflow")
    assert deployment.parameters["overrides"] == TINY  # `saeflow serve <TINY>` pre-fills the form
    browser.get(f"{ui}/v2/deployments/deployment/{deployment.id}/run")  # Run -> Custom run
    group_xpath = (
        "//label[normalize-space()='overrides (Optional)']"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' group ')][1]"
    )

    def group():
        return browser.find_element(By.XPATH, group_xpath)

    wait(browser, lambda d: group())
    shot(browser, "01_prefect_run_form")
    click(
        browser,
        wait(
            browser,
            lambda d: group().find_element(By.XPATH, ".//button[normalize-space()='Add item']"),
        ),
    )
    boxes = wait(browser, lambda d: [b for b in group().find_elements(By.TAG_NAME, "textarea")
                                     if b.is_displayed()][len(TINY):] or None)  # fmt: skip
    boxes[-1].send_keys(override)
    wait(
        browser,
        lambda d: (
            group().find_elements(By.TAG_NAME, "textarea")[-1].get_attribute("value") == override
        ),
    )
    shot(browser, "02_prefect_override_added")
    click(
        browser,
        wait(
            browser,
            lambda d: d.find_element(
                By.XPATH, "//button[@type='submit'][normalize-space()='Submit']"
            ),
        ),
    )

    def started():
        with temporary_settings({PREFECT_API_URL: served}), get_client(sync_client=True) as c:
            runs = c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
        return next((r for r in runs if r.parameters.get("overrides", [])[-1:] == [override]), None)

    flow_run = wait(browser, lambda d: started(), timeout=30)
    browser.get(f"{ui}/v2/runs/flow-run/{flow_run.id}")
    final = ("//*[not(self::script)][normalize-space()='Completed' or normalize-space()='Failed'"
             " or normalize-space()='Crashed' or normalize-space()='Cancelled']")  # fmt: skip
    deadline = time.monotonic() + 600
    while not browser.find_elements(By.XPATH, final) and time.monotonic() < deadline:
        time.sleep(2)
        if int(time.monotonic()) % 30 < 2:  # the page updates itself; a reload is a safety net
            browser.refresh()
    shot(browser, "03_prefect_flow_run_final")
    states = {e.text.strip() for e in browser.find_elements(By.XPATH, final)} - {""}
    assert states == {"Completed"}, states

    runs = tracking.client().search_runs(
        [e.experiment_id for e in tracking.client().search_experiments()],
        f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`saeflow.stage` = 'train'",
    )
    assert len(runs) == 1 and runs[0].data.params["sae.d_sae"] == "48"


@pytest.fixture(scope="module")
def ui_sweep(served: str):
    """A sweep of two topk SAEs run from its deployment: (its flow run, its MLflow experiment)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.support import tracking

    params = {"overrides": [*TINY, "sae=topk", "sae.k=2,4"], "experiment": "ui-sweep"}
    with temporary_settings({PREFECT_API_URL: served}):
        flow_run = run_deployment("sweep/saeflow", parameters=params, timeout=600)
    assert flow_run.state.is_completed(), flow_run.state.message
    return flow_run, tracking.client().get_experiment_by_name("ui-sweep")


def test_mlflow_ui_compares_two_runs_of_a_sweep(browser, ui_sweep, mlflow_ui: str) -> None:
    from selenium.webdriver.common.by import By

    from tasks.support import tracking

    _, exp = ui_sweep
    c = tracking.client()
    children = c.search_runs([exp.experiment_id], "tags.`saeflow.stage` = 'train'")
    assert len(children) == 2
    ids = json.dumps([r.info.run_id for r in children], separators=(",", ":"))

    browser.get(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs")
    wait(browser, lambda d: "sweep" in d.find_element(By.TAG_NAME, "body").text, 60)
    shot(browser, "04_mlflow_runs")
    browser.get("about:blank")  # a hash-only change would not remount the compare page
    browser.get(f'{mlflow_ui}/#/compare-runs?runs={ids}&experiments=["{exp.experiment_id}"]')
    row = ("//table[contains(@class,'mlflow-compare-run-table')]"
           "//tr[th[normalize-space()='{}']]/td")  # fmt: skip

    def cells(name: str) -> list[str]:
        return [td.text.strip() for td in browser.find_elements(By.XPATH, row.format(name))]

    wait(browser, lambda d: len(cells("sae.k")) == 2, 60)
    assert sorted(cells("sae.k")) == ["2", "4"]
    shot(browser, "05_mlflow_compare")
    assert "Comparing 2 Runs" in browser.find_element(By.TAG_NAME, "body").text

    def metrics() -> set[str]:  # the metric grid renders rows lazily: read the DOM, not the view
        links = browser.find_elements(By.CSS_SELECTOR, 'a[title="Plot chart"]')
        return {a.get_attribute("textContent").strip() for a in links}

    wait(browser, lambda d: "eval/explained_variance" in metrics(), 30)
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});",
        browser.find_element(By.CSS_SELECTOR, 'a[title="Plot chart"]'),
    )
    shot(browser, "06_mlflow_compare_metrics")
    assert {"eval/explained_variance", "eval/l0", "eval/loss_recovered"} <= metrics(), metrics()


def test_run_pages_show_figures_datasets_names_and_artifacts(
    browser, served: str, ui_sweep, mlflow_ui: str
) -> None:
    """What a researcher looks at, on the pages themselves: an SAE run's dataset and figures
    and a sweep parent's name and fronts in MLflow; a flow run's name and its table, summary and
    progress artifacts in Prefect."""
    from selenium.webdriver.common.by import By

    from tasks.support import tracking

    flow_run, exp = ui_sweep
    c = tracking.client()
    (parent,) = c.search_runs([exp.experiment_id], "tags.`saeflow.stage` = 'sweep'")
    child = c.search_runs([exp.experiment_id], "tags.`saeflow.stage` = 'train'")[0]

    def body() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    browser.get("about:blank")
    browser.get(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
    wait(browser, lambda d: "activations blocks.0.resid_post" in body(), 60)
    shot(browser, "07_mlflow_sae_run_datasets")
    browser.get("about:blank")
    browser.get(
        f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/artifacts/"
        "figures/feature_density.png"
    )
    wait(browser, lambda d: "feature_density.png" in body(), 60)
    time.sleep(2)  # the image preview loads after the tree
    shot(browser, "08_mlflow_sae_run_figure")
    browser.get("about:blank")
    browser.get(
        f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/"
        "figures/front_ev.png"
    )
    wait(browser, lambda d: "sweep sae.k=2,4" in body() and "front_ev.png" in body(), 60)
    time.sleep(2)
    shot(browser, "09_mlflow_sweep_front")

    ui = served.removesuffix("/api")
    browser.get(f"{ui}/v2/runs/flow-run/{flow_run.id}?tab=Artifacts")
    wait(browser, lambda d: "sae-metrics" in body() and "summary" in body(), 60)
    assert "sweep · tiny-gpt2 blocks.0.resid_post topk-64 · sae.k=2,4" in body()
    shot(browser, "10_prefect_flow_run_artifacts")
