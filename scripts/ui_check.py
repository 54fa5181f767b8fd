"""Check what the MLflow UI shows of srpo runs, in a real browser (headless Chromium).

    python scripts/ui_check.py --out docs/img                       # trains two tiny runs first
    python scripts/ui_check.py --out shots --runs runs/a runs/b     # run folders in one sqlite store

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and selenium
(``pip install -e '.[ui]'``). What it does, each step a check (exit 1 names the one that failed):

1. Unless --runs: two tiny single-process runs (``srpo train``, lr 3e-3 and 1e-2, 4 steps, a gold
   evaluation and images every step) into a fresh sqlite store.
2. ``mlflow ui`` on 127.0.0.1 (a free port, one worker) over that store.
3. The experiment in MLflow's model-training view lists both runs by name -> ``runs.png``.
4. The chart (compare) view: the ``rollout/reward`` chart, enlarged, has a line per run -> ``compare_reward.png``.
5. The ``heldout/0000`` image chart, enlarged: moving its step slider shows the next step's images
   -> ``image_slider.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.checkpoint import read_run  # noqa: E402
from pipeline.tracking import RunReader  # noqa: E402

STEPS = 4
WAIT_S = 60.0  # a page of the UI on a busy 2-core machine


class CheckFailed(RuntimeError):
    pass


def train_two_runs(root: Path) -> list[Path]:
    """``srpo train`` twice on the tiny preset, one store, different learning rates."""
    store = f"sqlite:///{root / 'mlflow.db'}"
    gold = json.dumps([{"kind": "pickscore", "path": ".cache/srpo-tiny/pickscore"}])
    folders = []
    for lr in ("3e-3", "1e-2"):
        out = root / f"lr{lr}"
        cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/tiny.yaml", "learner.num_workers=0",
               f"train.max_steps={STEPS}", "train.batch_size=2", "log.image_every=1", f"eval.gold={gold}",
               "eval.every=1", "eval.num_prompts=1", f"optim.lr={lr}", f"log.tracking_uri={store}",
               f"output.dir={out}"]
        print(f"[ui_check] training {out.name} ...", flush=True)
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        folders.append(out)
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_cli), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: uvicorn forks
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                return proc
        except OSError:
            time.sleep(1)
    stop_ui(proc)
    raise CheckFailed(f"mlflow ui did not answer on 127.0.0.1:{port} within 180 s (log: {log})")


def stop_ui(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    binary = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if Path(binary).exists():
        opts.binary_location = binary
    driver = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
    return webdriver.Chrome(options=opts, service=Service(driver) if Path(driver).exists() else None)


def wait_for(driver, what: str, test, timeout: float = WAIT_S):
    """Poll ``test(driver)`` until it returns something truthy; CheckFailed naming ``what`` after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = test(driver)
            if found:
                return found
        except Exception:  # the page is still rendering: elements come and go
            pass
        time.sleep(0.5)
    raise CheckFailed(f"{what}: not seen within {timeout:.0f} s")


def shot(driver, path: Path) -> Path:
    """A screenshot, stored as a small palette PNG (UI pages have few colours)."""
    from PIL import Image

    driver.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def enlarge_chart(driver, title: str):
    """Click the full-screen button of the chart card titled ``title``; returns the dialog."""
    from selenium.webdriver.common.by import By

    card = wait_for(driver, f"chart card {title}", lambda d: d.find_element(
        By.XPATH, f"//*[normalize-space(text())='{title}']/ancestor::*[.//button][1]"))
    card.find_elements(By.CSS_SELECTOR, "button")[0].click()
    return wait_for(driver, f"enlarged chart {title}", lambda d: d.find_element(By.CSS_SELECTOR, "[role=dialog]"))


def check_runs_page(driver, base: str, experiment_id: str, names: list[str], out: Path) -> Path:
    from selenium.webdriver.common.by import By

    # MLflow 3.17 picks the GenAI or model-training layout from a switch kept in the browser
    # (localStorage "mlflow.workflowType", default GenAI) that this URL parameter sets.
    driver.get(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")
    wait_for(driver, f"runs {names} listed", lambda d: all(n in body_text(d) for n in names))
    for b in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):  # the assistant side panel
        b.click()
    return shot(driver, out / "runs.png")


def check_compare_view(driver, names: list[str], out: Path) -> Path:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    radio = driver.find_element(By.CSS_SELECTOR, "input[name=runs-view-mode][value=CHART]")
    radio.find_element(By.XPATH, "./ancestor::label").click()
    search = wait_for(driver, "chart search box",
                      lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
    search.send_keys("rollout/reward")
    dialog = enlarge_chart(driver, "rollout/reward")
    wait_for(driver, "a rollout/reward line per run",
             lambda d: all(f"{n} (rollout/reward)" in dialog.text for n in names)
             and len(dialog.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace path.js-line")) >= len(names))
    time.sleep(1)  # plotly's transition
    path = shot(driver, out / "compare_reward.png")
    dialog.send_keys(Keys.ESCAPE)
    return path


def check_image_slider(driver, out: Path) -> Path:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    search.send_keys(Keys.CONTROL + "a", Keys.DELETE)
    search.send_keys("heldout/0000")
    dialog = enlarge_chart(driver, "heldout/0000")

    def step_images(step: int):
        imgs = [i for i in dialog.find_elements(By.CSS_SELECTOR, "img")
                if f"heldout~0000%2Bstep%2B{step}%2B" in (i.get_attribute("src") or "")]
        return imgs if len(imgs) >= 2 else None  # one image per run

    wait_for(driver, "both runs' heldout/0000 images at step 0", lambda d: step_images(0))
    slider = dialog.find_elements(By.CSS_SELECTOR, "[role=slider]")[-1]
    slider.send_keys(Keys.ARROW_RIGHT)
    imgs = wait_for(driver, "the slider moved to step 1's images", lambda d: step_images(1))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", imgs[-1])
    time.sleep(1)  # the scroll's animation
    return shot(driver, out / "image_slider.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the screenshots")
    p.add_argument("--runs", nargs="*", help="run folders (one sqlite store); default: train two tiny runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="srpo-ui-check-"))
    folders = [Path(r) for r in args.runs] if args.runs else train_two_runs(work)
    infos = [read_run(f) for f in folders]
    store = infos[0]["tracking_uri"]
    if any(i["tracking_uri"] != store for i in infos):
        raise SystemExit("ui_check: the runs are in different MLflow stores; one `mlflow ui` shows one store")
    summaries = [RunReader(store).summary(i["run_id"]) for i in infos]
    names = [s["name"] for s in summaries]
    port = free_port()
    ui = start_ui(store, port, work / "mlflow-ui.log")
    driver = browser()
    try:
        shots = [check_runs_page(driver, f"http://127.0.0.1:{port}", summaries[0]["experiment_id"], names, out),
                 check_compare_view(driver, names, out), check_image_slider(driver, out)]
    except CheckFailed as e:
        shot(driver, out / "failed.png")
        print(f"ui_check: FAILED: {e} (screenshot {out / 'failed.png'})", file=sys.stderr)
        return 1
    finally:
        driver.quit()
        stop_ui(ui)
    print("ui_check: passed; screenshots:\n" + "\n".join(f"  {s}" for s in shots) + f"\n(runs, UI log: {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
